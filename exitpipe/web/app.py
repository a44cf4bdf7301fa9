"""The dashboard's ASGI app: four pages, a JSON API, a token gate and strict security headers.

Pages: ``/`` jobs, ``/jobs/<job_id>`` one job, ``/dead`` dead letters, ``/health`` the
pipeline. API: ``/api/jobs`` (``jobs list --json``) and ``/api/jobs/<job_id>`` (``jobs show
--json``). Only GET and HEAD are served: the dashboard changes nothing.

Text that came from a message (job ids, sites, reasons, routing keys, bodies) reaches a page
only through Jinja2 with autoescaping on, and the Content-Security-Policy allows no inline
script or style, so even a mistake in a template could not run what a message carried.
Endpoints are plain functions: Starlette runs them in its thread pool, where the blocking
store and broker calls belong.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from consumers.explain import why
from consumers.replay import exit_record
from consumers.store import PageQuery, StoreError
from exitpipe.web import views
from exitpipe.web.sources import Sources
from producers.errors import BrokerError
from schemas.codes import JobStatus

HERE = Path(__file__).parent
COOKIE = "exitpipe_web"
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def create_app(sources: Sources, *, token: str | None = None, refresh: int = 10) -> ASGIApp:
    """The dashboard over ``sources``; with ``token``, every request must carry it."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its file name
        undefined=jinja2.StrictUndefined,
    )
    env.filters["css"] = css_name
    env.filters["when"] = when
    templates = Jinja2Templates(env=env)
    pages = _Pages(sources, templates, refresh)
    routes = [
        Route("/", pages.jobs, name="jobs"),
        Route("/jobs/{job_id}", pages.job, name="job"),
        Route("/dead", pages.dead, name="dead"),
        Route("/health", pages.health, name="health"),
        Route("/api/jobs", pages.api_jobs),
        Route("/api/jobs/{job_id}", pages.api_job),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    gated: ASGIApp = TokenGate(app, token) if token else app
    return SecurityHeaders(gated)


class _Pages:
    """The endpoints; each reads its sources and renders one template or one JSON value."""

    def __init__(self, sources: Sources, templates: Jinja2Templates, refresh: int) -> None:
        self.sources = sources
        self.templates = templates
        self.refresh = refresh

    def _render(self, request: Request, name: str, **context: Any) -> Response:
        context.setdefault("refresh", 0)
        context["nav"] = "jobs" if name.startswith("job") else name.removesuffix(".html")
        context["statuses"] = [s.value for s in JobStatus]
        return self.templates.TemplateResponse(request, name, context)

    def jobs(self, request: Request) -> Response:
        query = _page_query(request)
        found = self._store(lambda: self.sources.store.page(_one_more(query)))
        page = views.jobs_page(found, query.size)
        params = {k: v for k, v in request.query_params.items() if k not in ("after", "token")}
        next_url = (
            f"?{urlencode({**params, 'after': page.next_after})}" if page.next_after else None
        )
        first_url = f"?{urlencode(params)}" if query.after else None
        return self._render(
            request,
            "jobs.html",
            page=page,
            query=query,
            next_url=next_url,
            first_url=first_url,
            refresh=self.refresh,
        )

    def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = self._store(lambda: self.sources.store.get(job_id))
        if job is None:
            raise HTTPException(404, f"job {job_id!r} is not in the store")
        exits, exits_error = self._exits(job_id)
        lines = views.exit_lines(job, exits)
        return self._render(
            request,
            "job.html",
            job=job,
            why=why(job),
            timeline=views.timeline(job, lines),
            exits=lines,
            exits_error=exits_error,
        )

    def dead(self, request: Request) -> Response:
        messages, error = _broker(self.sources.dead, [])
        counts = views.reason_counts(m.reason for m in messages)
        return self._render(request, "dead.html", messages=messages, counts=counts, error=error)

    def health(self, request: Request) -> Response:
        queues, error = _broker(self.sources.queues, [])
        daemons = self.sources.metrics()
        return self._render(
            request,
            "health.html",
            queues=queues,
            queues_error=error,
            daemons=daemons,
            refresh=self.refresh,
        )

    def api_jobs(self, request: Request) -> Response:
        """``jobs list --json``: ``?status=S&disagreements=1&limit=N`` as its flags."""
        params = request.query_params
        try:
            query = views.page_query({"status": params.get("status", "")})
            limit = params.get("limit")
            if limit is not None and not limit.isdigit():
                raise views.BadQuery("limit: must be a whole number")
        except views.BadQuery as exc:
            raise HTTPException(400, str(exc)) from None
        disagreements = params.get("disagreements") in ("1", "true", "on")
        jobs = self._store(
            lambda: self.sources.store.list(
                status=query.status,
                limit=int(limit) if limit is not None else None,
                disagreements=disagreements,
            )
        )
        return JSONResponse([j.as_json() for j in jobs])

    def api_job(self, request: Request) -> Response:
        """``jobs show --json``; 404 for a job the store does not know."""
        job_id = request.path_params["job_id"]
        job = self._store(lambda: self.sources.store.get(job_id))
        if job is None:
            raise HTTPException(404, f"job {job_id!r} is not in the store")
        exits, _error = self._exits(job_id)
        records = [exit_record(event, decision) for event, decision in exits]
        return JSONResponse({**job.as_json(), "exits": records})

    def _exits(self, job_id: str) -> tuple[list[Any], str | None]:
        return _broker(lambda: self.sources.decided_exits(job_id), [])

    @staticmethod
    def _store(read: Callable[[], Any]) -> Any:
        try:
            return read()
        except StoreError as exc:
            raise HTTPException(503, f"store: {exc}") from exc


def css_name(text: str) -> str:
    """``text`` as a CSS class name: ``FINISHED:ABNORMAL`` -> ``finished-abnormal``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def when(value: datetime) -> str:
    """A time as the pages show it: UTC, to the second."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _page_query(request: Request) -> PageQuery:
    try:
        return views.page_query(dict(request.query_params))
    except views.BadQuery as exc:
        raise HTTPException(400, str(exc)) from None


def _one_more(query: PageQuery) -> PageQuery:
    return PageQuery(query.status, query.disagreements, query.prefix, query.after, query.size + 1)


def _broker(read: Callable[[], Any], empty: Any) -> tuple[Any, str | None]:
    """What ``read`` returns, or ``empty`` and why the broker could not say."""
    try:
        return read(), None
    except BrokerError as exc:
        return empty, str(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
    return PlainTextResponse(f"{exc.status_code}: {exc.detail}\n", status_code=exc.status_code)


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response, and refuses every method but GET/HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            reply = PlainTextResponse("405: the dashboard is read-only\n", status_code=405)
            reply.headers["allow"] = "GET, HEAD"
            await self._with_headers(reply)(scope, receive, send)
            return
        await self.app(scope, receive, _adding_headers(send))

    @staticmethod
    def _with_headers(reply: Response) -> Response:
        reply.headers.update(SECURITY_HEADERS)
        return reply


def _adding_headers(send: Send) -> Send:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
            message["headers"] = headers
        await send(message)

    return sender


class TokenGate:
    """401 for a request without the token: ``Authorization: Bearer``, ``?token=`` or cookie.

    A page opened with ``?token=`` is redirected to itself without it, with a cookie that
    carries a digest of the token (not the token) for the links that follow, so the token
    does not linger in the address bar, the history or a Referer.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token
        self.session = hmac.new(token.encode(), b"exitpipe-web", hashlib.sha256).hexdigest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        by_query = request.query_params.get("token")
        if self._bearer(request) or _same(request.cookies.get(COOKIE, ""), self.session):
            await self.app(scope, receive, send)
        elif by_query is not None and _same(by_query, self.token):
            if request.url.path.startswith("/api/"):
                await self.app(scope, receive, send)
                return
            await self._redirect(request)(scope, receive, send)
        else:
            reply = PlainTextResponse("401: this dashboard needs its token\n", status_code=401)
            reply.headers["www-authenticate"] = 'Bearer realm="exitpipe"'
            await reply(scope, receive, send)

    def _bearer(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and _same(given.strip(), self.token)

    def _redirect(self, request: Request) -> Response:
        kept = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
        url = f"{request.url.path}?{kept}" if kept else request.url.path
        reply = RedirectResponse(url, status_code=303)
        reply.set_cookie(COOKIE, self.session, httponly=True, samesite="strict", path="/")
        return reply


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())
