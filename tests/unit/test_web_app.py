"""The dashboard app over in-memory fakes: pages, the JSON API, escaping, the token gate.

Requests go straight to the ASGI app (``_get``), with no server and no HTTP client.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest

from consumers.dead_letters import DeadMessage
from consumers.policy import load_policy
from consumers.replay import exit_record
from consumers.store.memory import MemoryStore
from exitpipe.cli import main
from exitpipe.commands.web import is_loopback
from exitpipe.web.app import COOKIE, SECURITY_HEADERS, create_app
from exitpipe.web.sources import DaemonHealth, QueueStat, Sources
from producers.errors import BrokerUnreachable
from schemas.codes import Code, JobStatus, Launcher
from schemas.events import ExitEvent
from tests.strategies import T0, lifecycle, ticking_clock, transition

S = JobStatus
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
ESCAPED = "&lt;script&gt;window.__pwned=1&lt;/script&gt;&lt;img src=x onerror=&#34;"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    cookies: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def _get(app: Any, url: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
    parts = urlsplit(url)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": parts.path,
        "raw_path": parts.path.encode(),
        "query_string": parts.query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
    }
    sent: list[dict[str, Any]] = []

    async def call() -> None:
        done, requested = asyncio.Event(), [False]

        async def receive() -> dict[str, Any]:
            if not requested[0]:
                requested[0] = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()  # the client goes away once the whole response is in
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        await app(scope, receive, send)

    asyncio.run(call())
    start = next(m for m in sent if m["type"] == "http.response.start")
    raw = [(k.decode(), v.decode()) for k, v in start["headers"]]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    cookies = [v for k, v in raw if k == "set-cookie"]
    return Reply(start["status"], dict(raw), body, cookies)


def _exit(job: str, site: str, code: Code, reason: str | None = None) -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=job,
        site=site,
        code=code,
        return_code=1,
        launcher=Launcher.PROCESS,
        reason=reason,
        occurred_at=T0 + timedelta(seconds=3),
    )


def _dead(reason: str, routing_key: str = "exit.site-1") -> DeadMessage:
    return DeadMessage(
        tag=1,
        message_id=str(uuid.uuid4()),
        reason=reason,
        source="ns.classify",
        count=0,
        routing_key=routing_key,
        body=f'{{"job_id": "{HOSTILE}"}}'.encode(),
        properties=None,
        sender="ns-site-site-1",
    )


@pytest.fixture
def store() -> MemoryStore:
    store = MemoryStore(clock=ticking_clock())
    store.apply_batch(
        [
            lifecycle("job-a", S.RUNNING, ["site-1", "site-2"]),
            transition("job-a", site="site-1"),
            lifecycle("job-a", S.FINISHED_ABNORMAL),
        ]
    )
    for n in range(5):
        store.apply_batch([lifecycle(f"run-{n}", S.RUNNING)])
    return store


def _sources(store: MemoryStore, **kw: Any) -> Sources:
    exits = {"job-a": [_exit("job-a", "site-2", Code.EXECUTION_ERROR, HOSTILE)]}
    defaults: dict[str, Any] = {
        "store": store,
        "policy": load_policy("nvflare-2.8"),
        "exits": lambda job_id: exits.get(job_id, []),
        "dead": lambda: [_dead(f"schema: unknown schema '{HOSTILE}'")] * 2 + [_dead("body: x")],
        "queues": lambda: [QueueStat("ns.classify", 4, 1), QueueStat("ns.job-state", None, None)],
        "metrics": lambda: [
            DaemonHealth("http://127.0.0.1:9101/metrics", None, {"classifier": True}, {"events": 9})
        ],
    }
    return Sources(**{**defaults, **kw})


@pytest.fixture
def app(store: MemoryStore) -> Any:
    return create_app(_sources(store))


# -- pages -------------------------------------------------------------------------------------


def test_the_jobs_page_marks_the_disagreement(app: Any) -> None:
    page = _get(app, "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    row = page.text.split('data-job-id="job-a"')[1].split("</tr>")[0]
    assert "FINISHED:EXECUTION_EXCEPTION" in row and "FINISHED:ABNORMAL" in row
    assert "disagrees" in row
    assert page.text.count("≠ disagrees") == 1


def test_the_jobs_page_filters_searches_and_pages(app: Any) -> None:
    assert 'data-job-id="job-a"' not in _get(app, "/?status=RUNNING").text
    only = _get(app, "/?disagreements=1").text
    assert only.count('data-job-id="') == 1 and 'data-job-id="job-a"' in only
    first = _get(app, "/?q=run-&size=2").text
    assert first.count('data-job-id="run-') == 2 and 'id="next-page"' in first
    link = first.split('id="next-page"')[0].rsplit('href="', 1)[1].split('"')[0]
    rest = _get(app, "/" + link.replace("&amp;", "&")).text
    assert [f'data-job-id="run-{n}"' in rest for n in range(5)] == [False, False, True, True, False]
    assert 'id="first-page"' in rest and 'id="next-page"' in rest
    assert 'id="next-page"' not in _get(app, "/?q=run-").text
    assert _get(app, "/?status=NOPE").status == 400


def test_the_job_page_shows_status_timeline_history_why_and_exits(app: Any) -> None:
    page = _get(app, "/jobs/job-a")
    assert page.status == 200
    text = page.text
    assert 'id="job-status" class="status status-finished-execution-exception"' in text
    for lane in ("server", "site-1", "site-2"):
        assert f'data-lane="{lane}"' in text
    timeline = text.split('id="timeline"')[1].split("</div>\n</div>")[0]
    assert timeline.count('class="ev ev-applied"') == 2  # RUNNING and the failure
    assert timeline.count('class="ev ev-ignored"') == 2  # the server's verdict, site-2's exit
    assert "nvflare-2.8@1" in text and "fail-on-exception" in text
    assert "fail by nvflare-2.8:fail-on-exception (site-1 EXCEPTION rc=101)" in text


def test_message_text_is_escaped_everywhere(app: Any) -> None:
    for path in ("/jobs/job-a", "/dead"):
        text = _get(app, path).text
        assert "<script>window" not in text and "<img src=x" not in text, path
        assert ESCAPED in text, path


def test_the_dead_letter_page_counts_per_reason(app: Any) -> None:
    text = _get(app, "/dead").text
    assert 'class="count">2<' in text and 'class="count">1<' in text
    assert text.count('class="source">ns.classify<') == 3
    assert 'class="sender">ns-site-site-1<' in text
    assert "requeue" not in text.split("<main")[1].split("<code>")[0]  # no button, only words
    assert "<form" not in text and "<button" not in text


def test_the_health_page_shows_queues_and_daemons(app: Any) -> None:
    text = _get(app, "/health").text
    assert 'data-queue="ns.classify"' in text and 'class="messages">4<' in text
    assert 'data-queue="ns.job-state" class="missing"' in text
    assert "classifier: connected" in text and 'class="total">9<' in text


def test_a_broker_away_is_said_on_the_page(store: MemoryStore) -> None:
    def away() -> Any:
        raise BrokerUnreachable("broker amqp://guest:***@127.0.0.1:1/%2F unreachable")

    app = create_app(_sources(store, dead=away, queues=away, exits=lambda _: away()))
    for path in ("/dead", "/health", "/jobs/job-a"):
        reply = _get(app, path)
        assert reply.status == 200 and "unreachable" in reply.text, path
    assert _get(app, "/api/jobs/job-a").json()["exits"] == []


def test_every_response_has_the_security_headers_and_nothing_but_get_is_served(app: Any) -> None:
    for path in ("/", "/jobs/job-a", "/api/jobs", "/nope", "/static/style.css"):
        reply = _get(app, path)
        assert {k: reply.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, path
    for method in ("POST", "PUT", "DELETE"):
        reply = _get(app, "/dead", method=method)
        assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"


def test_static_files_need_no_build(app: Any) -> None:
    assert "setInterval" in _get(app, "/static/refresh.js").text
    assert ".ev-applied" in _get(app, "/static/style.css").text


# -- the API -----------------------------------------------------------------------------------


def test_api_jobs_is_jobs_list_json(app: Any, store: MemoryStore) -> None:
    assert _get(app, "/api/jobs").json() == [j.as_json() for j in store.list()]
    running = [j.as_json() for j in store.list(status=S.RUNNING, limit=2)]
    assert _get(app, "/api/jobs?status=RUNNING&limit=2").json() == running
    disagree = [j.as_json() for j in store.list(disagreements=True)]
    assert _get(app, "/api/jobs?disagreements=1").json() == disagree
    assert _get(app, "/api/jobs?limit=x").status == 400


def test_api_job_is_jobs_show_json_and_404_for_an_unknown_job(app: Any, store: MemoryStore) -> None:
    shown = _get(app, "/api/jobs/job-a").json()
    job = store.get("job-a")
    assert job is not None
    assert {k: v for k, v in shown.items() if k != "exits"} == json.loads(json.dumps(job.as_json()))
    (exit_,) = shown["exits"]
    assert set(exit_) == set(exit_record(_exit("j", "s", Code.SUCCESS), _decision()))
    assert (exit_["site"], exit_["decision"], exit_["rule"]) == ("site-2", "ignore", "default")
    missing = _get(app, "/api/jobs/nope")
    assert missing.status == 404 and "not in the store" in missing.json()["error"]
    assert _get(app, "/jobs/nope").status == 404


def _decision() -> Any:
    from consumers.policy import decide

    return decide(_exit("j", "s", Code.SUCCESS), load_policy("nvflare-2.8"))


# -- the token ---------------------------------------------------------------------------------


def test_with_a_token_every_request_needs_it(store: MemoryStore) -> None:
    app = create_app(_sources(store), token="s3cret-token")
    for path in ("/", "/jobs/job-a", "/dead", "/api/jobs", "/static/style.css"):
        assert _get(app, path).status == 401, path
    assert _get(app, "/", {"Authorization": "Bearer wrong"}).status == 401
    assert _get(app, "/?token=wrong").status == 401
    assert _get(app, "/", {"Authorization": "Bearer s3cret-token"}).status == 200
    assert _get(app, "/api/jobs?token=s3cret-token").status == 200


def test_a_page_opened_with_the_token_drops_it_from_the_address(store: MemoryStore) -> None:
    app = create_app(_sources(store), token="s3cret-token")
    reply = _get(app, "/?status=RUNNING&token=s3cret-token")
    assert reply.status == 303 and reply.headers["location"] == "/?status=RUNNING"
    (cookie,) = reply.cookies
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert "s3cret-token" not in cookie
    session = cookie.split(";")[0]
    assert _get(app, "/?status=RUNNING", {"Cookie": session}).status == 200
    assert _get(app, "/", {"Cookie": f"{COOKIE}=forged"}).status == 401


# -- the command -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.org", False),
    ],
)
def test_only_loopback_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_binding_beyond_loopback_without_a_token_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXITPIPE_WEB_TOKEN", raising=False)
    assert main(["web", "--host", "0.0.0.0", "--port", "1", "--store", "memory://"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "EXITPIPE_WEB_TOKEN" in err


def test_the_token_is_never_shown_by_config_show(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXITPIPE_WEB_TOKEN", "s3cret-token")
    assert main(["config", "show", "--json"]) == 0
    out = capsys.readouterr().out
    assert "s3cret-token" not in out and json.loads(out)["web_token"].startswith("***")
