"""The HTTP application of a gateway process (FastAPI): /healthz, /readyz and /metrics
always, and, with ``dashboard:`` configured, the dashboard's page and its /api views.

- /healthz, /readyz, /metrics answer as they always did (same bodies, codes and content
  types), with no credential: probes and Prometheus scrape them.
- ``/`` and ``/static/*`` are the page: HTML, JavaScript, CSS and the chart library, no
  data.  The page asks for a token (kept in the tab's sessionStorage) and reads the views
  from /api with it, as an ``Authorization: Bearer`` header: no cookie, so another site's
  form or script cannot act with the user's credential (no CSRF to defend against).
- ``/api/*``: each request is authenticated (bearer token, or a verified client
  certificate named in the tokens file; 401 with ``WWW-Authenticate`` otherwise), and
  audited: one ``query`` record per view read, one ``security-alert`` per refusal, one
  ``job-replay`` per replay.  Replaying a dead letter is a POST for an operator (403 for
  a viewer).
- ``/openapi.json`` is the schema (no interactive docs: they load scripts from a CDN).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.dashboard import views
from gateway.dashboard.auth import Principal, Tokens
from gateway.security.audit import Auditor, records
from gateway.services.certwatch import CERT_WARN_DAYS, CertWatch
from gateway.store.findings import RunFilter
from gateway.store.queue import Queue
from gateway.store.space import SpaceGuard

log = structlog.get_logger(__name__)

STATIC = Path(__file__).with_name("static")  # the page: HTML, JavaScript, CSS, Chart.js
STUDIES = 25  # recent studies on the timeline view, by default
MAX_STUDIES = 200
DAY = 86400.0

#: The page's Content-Security-Policy: nothing but this origin (no CDN, no inline script).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@dataclass(frozen=True)
class Health:
    """What /readyz and /metrics report, from the process that serves them."""

    ready: Callable[[], dict[str, bool]]
    refresh: Callable[[], None]  # the gauges read when /metrics is
    render: Callable[[], bytes]  # the metrics, in Prometheus text format
    details: Callable[[], dict[str, object]] | None = None


@dataclass(frozen=True)
class Sources:
    """What the dashboard reads, and where it records who read it."""

    queue: Queue
    certwatch: CertWatch
    destinations: Callable[[], Mapping[str, Literal["dicom", "hl7"]]]  # the running config's
    tokens: Tokens
    audit: Auditor
    clock: Callable[[], float] = field(default=time.time)
    space: SpaceGuard | None = None  # the volumes' free space, and the floor


class _SecurityHeaders:
    """Headers every answer carries (plain ASGI middleware: no buffering of bodies)."""

    def __init__(self, app: ASGIApp, https: bool) -> None:
        self.app = app
        self.headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"content-security-policy", CSP.encode()),
        ]
        if https:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, with_headers)


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


def client_subject(request: Request) -> frozenset[tuple[str, str]] | None:
    """The verified client certificate's subject, as the server's protocol put it in the
    ASGI scope (``extensions.tls``; see :mod:`gateway.dashboard.server`)."""
    tls = request.scope.get("extensions", {}).get("tls", {})
    pairs = tls.get("client_subject")
    return frozenset(pairs) if pairs else None


class FindingsFigures:
    """The findings view, added up again only when a run in its window was added or purged.

    Adding up is linear in the runs of the window (1.4 s for 40,000 runs, 20,000 studies
    and their reports, on the 2-core development machine; 3 ms when nothing changed), and
    every open page asks every five seconds; the runs' count and oldest and newest times
    are one indexed query.  Concurrent pages wait for one adding-up rather than each
    doing its own."""

    MAX_AGE = 300.0  # seconds: added up again at least this often all the same

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[float, tuple[tuple[int, float | None, float | None], views.FindingsView]]
        self._held = {}

    def view(self, queue: Queue, days: float, now: float) -> views.FindingsView:
        since = now - days * DAY
        with self._lock:
            mark = queue.findings_mark(since)
            held = self._held.get(days)
            if held is not None and held[0] == mark and now - held[1].generated_at < self.MAX_AGE:
                return held[1].model_copy(update={"generated_at": now})  # current as of now
            view = views.findings_view(queue.findings_runs(RunFilter(since=since)), days, now)
            if len(self._held) >= 8:  # windows asked for by hand: keep a few
                self._held.clear()
            self._held[days] = (mark, view)
            return view


def create_app(health: Health, dashboard: Sources | None = None, *, https: bool = False) -> FastAPI:
    """The application: health endpoints, and the dashboard when *dashboard* is given."""
    app = FastAPI(
        title="AI gateway",
        version="1",
        summary="Health, metrics and the read-only dashboard of the DICOM/HL7 AI gateway",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(StarletteHTTPException)
    async def _errors(request: Request, exc: StarletteHTTPException) -> Response:
        body = {"error": "not found"} if exc.status_code == 404 else {"error": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    def healthz() -> Response:
        return Response(b'{"status": "ok"}\n', media_type="application/json")

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Listeners bound, store writable (503 otherwise)",
        responses={503: {"description": "not ready"}},
    )
    def readyz() -> Response:
        checks = health.ready()
        ok = all(checks.values())
        answer: dict[str, object] = {"ready": ok, "checks": checks}
        if health.details is not None:
            answer["details"] = health.details()
        body = json.dumps(answer).encode() + b"\n"
        return Response(body, status_code=200 if ok else 503, media_type="application/json")

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}}},
    )
    def metrics() -> Response:
        health.refresh()
        return Response(health.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    if dashboard is not None:
        _dashboard_routes(app, dashboard)
    app.add_middleware(_SecurityHeaders, https=https)
    return app


def _sources(request: Request) -> Sources:
    src: Sources = request.app.state.sources
    return src


def _actor(request: Request, who: Principal | None) -> dict[str, str]:
    return records.dashboard_user(
        who.name if who else "?",
        _client(request),
        role=who.role if who else None,
        cert_subject=who.cert_subject if who else None,
    )


def _refuse(request: Request, who: Principal | None, status: int, reason: str) -> HTTPException:
    """The refusal to raise, audited."""
    _sources(request).audit(
        records.dashboard_refused(_actor(request, who), request.url.path, status, reason)
    )
    headers = {"WWW-Authenticate": 'Bearer realm="gateway"'} if status == 401 else None
    return HTTPException(status, reason, headers=headers)


#: Documents the scheme in the OpenAPI schema; the header is read by :func:`principal`.
BEARER = HTTPBearer(auto_error=False, description="a token of the dashboard's tokens file")


def principal(
    request: Request,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Principal:
    """Who asks: the holder of the bearer token, else of the verified client certificate;
    401 (audited) when neither is in the tokens file."""
    tokens = _sources(request).tokens
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if header:
        if scheme.lower() != "bearer" or not token.strip():
            raise _refuse(request, None, 401, "the Authorization header is not 'Bearer TOKEN'")
        who = tokens.by_token(token.strip())
        if who is None:
            raise _refuse(request, None, 401, "unknown token")
        return who
    subject = client_subject(request)
    if subject is not None:
        who = tokens.by_certificate(subject)
        if who is None:
            raise _refuse(request, None, 401, "client certificate not in the tokens file")
        return who
    raise _refuse(request, None, 401, "no token and no client certificate")


def reader(
    request: Request, response: Response, who: Annotated[Principal, Depends(principal)]
) -> Principal:
    """An authenticated caller; the view it reads is audited (one record per request) and
    not to be cached (``Cache-Control: no-store`` on the view's answer)."""
    _sources(request).audit(records.dashboard_view(_actor(request, who), request.url.path))
    response.headers.update(NO_STORE)
    return who


def operator(request: Request, who: Annotated[Principal, Depends(principal)]) -> Principal:
    """An authenticated operator (403, audited, for a viewer)."""
    if not who.operator:
        raise _refuse(request, who, 403, "replaying dead letters needs the operator role")
    return who


Reader = Annotated[Principal, Depends(reader)]
Operator = Annotated[Principal, Depends(operator)]
Src = Annotated[Sources, Depends(_sources)]
NO_STORE = {"Cache-Control": "no-store"}


class _Error(BaseModel):
    error: str


#: What every /api view may answer besides its view.
REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"model": _Error, "description": "no valid token or client certificate"},
}


def _dashboard_routes(app: FastAPI, sources: Sources) -> None:
    app.state.sources = sources
    figures = FindingsFigures()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get(
        "/api/whoami", tags=["dashboard"], responses=REFUSALS, summary="The caller's name and role"
    )
    def whoami(who: Reader) -> views.WhoAmI:
        return views.WhoAmI(name=who.name, role=who.role, via=who.via)

    @app.get(
        "/api/queue",
        tags=["dashboard"],
        responses=REFUSALS,
        summary="Queue depth by stage and lane",
    )
    def queue(who: Reader, src: Src) -> views.QueueView:
        space = src.space
        return views.queue_view(
            src.queue.counts(),
            src.queue.job_groups(),
            src.clock(),
            volumes=space.volumes() if space else (),
            min_free=space.min_free if space else 0,
        )

    @app.get(
        "/api/studies", tags=["dashboard"], responses=REFUSALS, summary="Recent studies' timelines"
    )
    def studies(
        who: Reader,
        src: Src,
        limit: Annotated[int, Query(ge=1, le=MAX_STUDIES)] = STUDIES,
    ) -> views.StudiesView:
        return views.studies_view(src.queue.study_timelines(limit), src.clock())

    @app.get(
        "/api/dead",
        tags=["dashboard"],
        responses=REFUSALS,
        summary="Dead letters with their last error",
    )
    def dead(who: Reader, src: Src) -> views.DeadView:
        return views.dead_view(src.queue.dead_jobs(), src.clock(), who.operator)

    @app.post(
        "/api/dead/{job_id}/replay",
        tags=["dashboard"],
        summary="Put one dead letter back in the queue (operators)",
        responses={
            **REFUSALS,
            403: {"model": _Error, "description": "not an operator"},
            404: {"model": _Error, "description": "no dead letter with this id"},
        },
    )
    def replay(
        request: Request, job_id: Annotated[int, PathParam(ge=1)], who: Operator, src: Src
    ) -> views.Replayed:
        actor = _actor(request, who)
        job = src.queue.job(job_id)
        if job is None or job.state.value != "dead":
            src.audit(records.jobs_replayed(actor, [job_id], 0))
            raise HTTPException(404, f"job {job_id} is not a dead letter")
        n = src.queue.replay([job_id], src.clock())
        src.audit(records.jobs_replayed(actor, [job_id], n))
        log.info("dashboard.replayed", job_id=job_id, user=who.name, replayed=n)
        return views.Replayed(job_id=job_id, replayed=n == 1)

    @app.get(
        "/api/destinations",
        tags=["dashboard"],
        responses=REFUSALS,
        summary="Per destination: last success, retries, oldest undelivered",
    )
    def destinations(who: Reader, src: Src) -> views.DestinationsView:
        now = src.clock()
        return views.destinations_view(src.destinations(), src.queue.job_groups(), now)

    @app.get(
        "/api/certificates",
        tags=["dashboard"],
        responses=REFUSALS,
        summary="Days left on each certificate",
    )
    def certificates(who: Reader, src: Src) -> views.CertificatesView:
        return views.certificates_view(src.certwatch.days_left(), CERT_WARN_DAYS, src.clock())

    @app.get(
        "/api/findings",
        tags=["dashboard"],
        responses=REFUSALS,
        summary="Findings statistics and concordance with the reports",
    )
    def findings(
        who: Reader,
        src: Src,
        days: Annotated[float, Query(gt=0, le=3660)] = 90.0,
    ) -> views.FindingsView:
        return figures.view(src.queue, days, src.clock())
