"""TLS contexts for every listener and client (BCP 195: TLS 1.2+, modern ciphers)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from gateway.config import ClientTLS, ServerTLS
from gateway.errors import ConfigError

Resolve = Callable[[Path], Path]


def server_context(tls: ServerTLS, resolve: Resolve) -> ssl.SSLContext:
    """A server context presenting our certificate; client certificates required when
    ``require_client_cert`` (verified against ``ca``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS")
    try:
        ctx.load_cert_chain(resolve(tls.cert), resolve(tls.key))
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=str(resolve(tls.ca)))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"tls: cannot load certificate/key/CA: {exc}"]) from None
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: ClientTLS, resolve: Resolve) -> ssl.SSLContext:
    """A client context that verifies the peer against ``ca`` and presents ``cert``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(resolve(tls.ca)))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        ctx.load_cert_chain(resolve(tls.cert), resolve(tls.key))
    return ctx
