"""The HTTP server of a gateway process: uvicorn, in a thread, serving
:func:`gateway.dashboard.web.create_app` on ``gateway.http``.

- The socket is bound (and listening) when the server is made, so a port in use is an
  error at start and a port given as 0 has its number at once (:attr:`HTTPServer.port`).
- Plain HTTP without ``dashboard:``; with it, HTTPS with ``dashboard.tls`` (BCP 195
  context from :func:`gateway.security.tls.server_context`), a client certificate asked
  for (optional) and verified against ``dashboard.tls.ca``.
- uvicorn's HTTP/1.1 protocol, with the verified client certificate's subject put into
  each request's ASGI scope (``extensions.tls``: ``client_cert_name``, as the ASGI TLS
  extension names it, and ``client_subject``, the attribute pairs), which uvicorn itself
  does not do.
- uvicorn does not touch the process's logging or signals (``log_config=None``; signal
  handlers are only installed from the main thread, and this is not it).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Literal

import structlog
import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.config import Config, ServerTLS
from gateway.dashboard.auth import Tokens
from gateway.dashboard.web import Health, Sources, create_app
from gateway.security.audit import Auditor
from gateway.security.tls import peer_subject, server_context, subject_text
from gateway.services.certwatch import CertWatch
from gateway.store.store import Store

log = structlog.get_logger(__name__)

START_TIMEOUT = 10.0  # seconds for uvicorn to start serving the bound socket
STOP_TIMEOUT = 5.0


class _ClientCertProtocol(H11Protocol):
    """uvicorn's h11 protocol, telling the application who the TLS client is."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        subject = peer_subject(transport.get_extra_info("ssl_object"))
        if subject is None:
            return
        inner = self.app
        tls = {"client_cert_name": subject_text(subject), "client_subject": sorted(subject)}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault("extensions", {})["tls"] = tls
            await inner(scope, receive, send)

        self.app = app


def _server_tls(cfg: Config) -> ServerTLS | None:
    if cfg.dashboard is None:
        return None
    tls = cfg.dashboard.tls
    return ServerTLS(port=0, cert=tls.cert, key=tls.key, ca=tls.ca, require_client_cert=False)


def dashboard_context(cfg: Config) -> ssl.SSLContext | None:
    """The HTTPS context of ``dashboard.tls`` (None without a dashboard): client
    certificates asked for, not required (a browser with a token has none)."""
    tls = _server_tls(cfg)
    return None if tls is None else server_context(tls, cfg.path)


def reload_certificate(ctx: ssl.SSLContext, cfg: Config) -> bool:
    """Load renewed ``dashboard.tls`` files (same paths) into the running context *ctx*,
    for new connections; files that do not load together leave the running certificate
    in place (``tls.reload_failed``)."""
    tls = _server_tls(cfg)
    if tls is None:
        return False
    try:
        server_context(tls, cfg.path)  # all files load together, or none
        ctx.load_cert_chain(cfg.path(tls.cert), cfg.path(tls.key))
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=str(cfg.path(tls.ca)))
    except Exception as exc:
        log.error(
            "tls.reload_failed",
            listener="dashboard",
            error=str(exc)[:300],
            outcome="the running certificate is kept",
        )
        return False
    log.info("tls.reloaded", listener="dashboard")
    return True


def dashboard_sources(
    cfg: Config, current: Callable[[], Config], store: Store, certwatch: CertWatch, audit: Auditor
) -> Sources:
    """What the dashboard of *cfg* reads (requires ``cfg.dashboard``); *current* is the
    running config (destinations change with a reload)."""
    assert cfg.dashboard is not None
    tokens = Tokens(cfg.path(cfg.dashboard.tokens_file))

    def destinations() -> dict[str, Literal["dicom", "hl7"]]:
        return {
            name: "dicom" if dest.dicom is not None else "hl7"
            for name, dest in current().destinations.items()
        }

    return Sources(store.queue, certwatch, destinations, tokens, audit, space=store.space)


def http_server(
    cfg: Config,
    current: Callable[[], Config],
    store: Store,
    certwatch: CertWatch,
    audit: Auditor,
    health: Health,
) -> HTTPServer:
    """The server on ``gateway.http``: health and metrics, and the dashboard (over HTTPS)
    when the config has one; *current* is the running config (see
    :func:`dashboard_sources`)."""
    sources = (
        dashboard_sources(cfg, current, store, certwatch, audit)
        if cfg.dashboard is not None
        else None
    )
    http = cfg.gateway.http
    return HTTPServer(http.host, http.port, health, sources, dashboard_context(cfg))


class HTTPServer:
    """/healthz, /readyz, /metrics and (with *sources*) the dashboard on *host*:*port*."""

    def __init__(
        self,
        host: str,
        port: int,
        health: Health,
        sources: Sources | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sources = sources
        self.ssl_context = ssl_context
        self.app: FastAPI = create_app(health, sources, https=ssl_context is not None)
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(address)
            self._sock.listen(128)
        except BaseException:
            self._sock.close()
            raise
        config = uvicorn.Config(
            self.app,
            http=_ClientCertProtocol,
            loop="asyncio",
            lifespan="off",
            log_config=None,
            log_level="warning",  # its start and stop lines are ours to log
            access_log=False,  # probes every few seconds would flood the log
            server_header=False,
            timeout_graceful_shutdown=2,
            ssl_context_factory=(
                (lambda _config, _default: ssl_context) if ssl_context is not None else None
            ),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def scheme(self) -> str:
        return "https" if self._server.config.is_ssl else "http"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)

    def reload(self, cfg: Config) -> None:
        """SIGHUP: read the tokens file again, and the certificate files of *cfg*'s
        ``dashboard.tls`` (renewed in place)."""
        if self.sources is not None:
            self.sources.tokens.reload()
        if self.ssl_context is not None:
            reload_certificate(self.ssl_context, cfg)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(STOP_TIMEOUT)
        self._sock.close()
