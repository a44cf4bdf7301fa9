"""``exitpipe web`` in a real headless browser, over a store the real daemons filled.

One pipeline for the module: ``exitpipe run`` (with its metrics) fills a SQLite store from
events published through the broker, including a job where the server's verdict disagrees
with the policy, an exit whose ``reason`` is hostile markup, and dead letters whose reason
and body carry more of it. ``exitpipe web`` then serves that store, and Debian's Chromium,
driven by selenium, looks at every page the way an operator would.

Screenshots of each page go to the directory named by ``EXITPIPE_SCREENSHOTS`` (the README's
come from ``docs/screenshots``), else to a temporary one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.ui import Select, WebDriverWait

from consumers.store.factory import open_store
from schemas.codes import Code, JobStatus, Launcher, Stage
from schemas.events import ExitEvent
from schemas.topology import Names
from tests.conftest import delete_namespace
from tests.support.pipeline import count, lifecycle, now, publish_raw, send, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
HOSTILE_SCHEMA = '<script>window.__pwned=3</script><img src=x onerror="window.__pwned=4">'
SITES = ["site-1", "site-2"]
BULK = [f"web-bulk-{n}" for n in range(5)]
TOKEN = "t0ken-" + uuid.uuid4().hex


@dataclass
class Dashboard:
    """The running pipeline and dashboard, and what a test needs to look at them."""

    url: str
    env: dict[str, str]
    namespace: str
    sender: str
    browser: webdriver.Chrome
    shots: Path

    def open(self, path: str, refresh: bool = False) -> None:
        """Load a page; its auto-refresh is paused unless asked for, so elements stay put."""
        self.browser.get(self.url + path)
        pause = self.all("#pause")
        if pause and not refresh:
            pause[0].click()

    def submit(self) -> None:
        """Submit the filters and wait for the next page to replace this one."""
        old = self.find("main")
        self.find("form.filters button").click()
        WebDriverWait(self.browser, 15).until(staleness_of(old))
        pause = self.all("#pause")
        if pause:
            pause[0].click()

    def find(self, css: str) -> WebElement:
        return self.browser.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.browser.find_elements(By.CSS_SELECTOR, css)

    def pwned(self) -> Any:
        return self.browser.execute_script("return window.__pwned;")

    def screenshot(self, name: str) -> None:
        """The whole page as a PNG, shown as a person sees it (refreshing, not paused)."""
        paused = [box for box in self.all("#pause") if box.is_selected()]
        for box in paused:
            box.click()
        height = self.browser.execute_script("return document.documentElement.scrollHeight;")
        self.browser.set_window_size(1360, max(760, min(int(height) + 40, 2400)))
        self.browser.save_screenshot(str(self.shots / f"{name}.png"))
        self.browser.set_window_size(1360, 900)
        for box in paused:
            box.click()


def _need_chromium() -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    message = "no Chromium: install Debian's chromium and chromium-driver (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message + " -- CI must not skip the browser tests")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exitpipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "exitpipe.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


def _stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as an operator's service manager stops it; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()


def _http(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(reply.status), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:  # nothing listens yet
        return 0, b""


def _rows(store_url: str, job_id: str) -> list[dict[str, Any]]:
    store = open_store(store_url)
    try:
        job = store.get(job_id)
        return [] if job is None else [row.as_json() for row in job.history]
    finally:
        store.close()


def _exit(job: str, site: str, code: Code, stage: Stage, reason: str) -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=job,
        site=site,
        code=code,
        return_code=1,
        launcher=Launcher.PROCESS,
        stage=stage,
        reason=reason,
        occurred_at=now(),
    )


def _fill(amqp_url: str, ns: str, store_url: str, sender: str) -> None:
    """The events of DESIGN 1's stories, through the broker, and three dead letters."""
    config = _exit(
        "web-split", "site-1", Code.CONFIG_ERROR, Stage.STARTING, "config_fed_client.json missing"
    )
    teardown = _exit("web-split", "site-2", Code.EXECUTION_ERROR, Stage.STARTED, HOSTILE)
    send(
        amqp_url,
        ns,
        [
            lifecycle("web-done", JobStatus.SUBMITTED, SITES),
            lifecycle("web-done", JobStatus.RUNNING),
            lifecycle("web-done", JobStatus.FINISHED_COMPLETED),
            lifecycle("web-split", JobStatus.RUNNING, SITES),
            lifecycle("web-run", JobStatus.RUNNING, SITES),
            *(lifecycle(job, JobStatus.RUNNING) for job in BULK),
        ],
    )
    wait_until(lambda: len(_rows(store_url, "web-split")) == 1, 30)
    # Exits pass the classifier; sent once the job runs, they reach the store after it.
    send(amqp_url, ns, [teardown, config, config])  # config twice: one row, one duplicate
    wait_until(lambda: [r["duplicates"] for r in _rows(store_url, "web-split")] == [0, 1], 30)
    # The server's own verdict comes after exitpipe failed the job: they disagree.
    send(amqp_url, ns, [lifecycle("web-split", JobStatus.FINISHED_ABNORMAL)])
    wait_until(lambda: len(_rows(store_url, "web-split")) == 3, 30)
    names = Names(ns)
    body = json.dumps({"schema": HOSTILE_SCHEMA, "job_id": "web-x", "site": "site-1"}).encode()
    for raw in (body, body, b"{not json"):
        publish_raw(amqp_url, names.events, "exit.site-1", raw, user_id=sender)
    wait_until(lambda: count(amqp_url, names.dead_letters) == 3, 30)


@pytest.fixture(scope="module")
def dashboard(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    _need_chromium()
    ns = f"t-{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("web")
    store_url = f"sqlite:///{tmp / 'jobs.db'}"
    metrics, port = _free_port(), _free_port()
    env = {
        **os.environ,
        "EXITPIPE_AMQP_URL": amqp_url,
        "EXITPIPE_NAMESPACE": ns,
        "EXITPIPE_STORE": store_url,
        "EXITPIPE_HEARTBEAT": "5",
        "EXITPIPE_POLICY": "nvflare-2.8",
        "EXITPIPE_WEB_METRICS": f"http://127.0.0.1:{metrics}/metrics",
    }
    env.pop("EXITPIPE_WEB_TOKEN", None)
    sender = urlsplit(amqp_url).username or "guest"
    daemons = _start(["run", "--metrics-port", str(metrics)], env, tmp / "daemons.log")
    web = None
    browser = None
    try:
        wait_until(lambda: _http(f"http://127.0.0.1:{metrics}/healthz")[0] == 200, 30)
        _fill(amqp_url, ns, store_url, sender)
        web_args = ["web", "--host", "127.0.0.1", "--port", str(port), "--refresh", "2"]
        web = _start(web_args, env, tmp / "web.log")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http(url + "/api/jobs")[0] == 200, 30)
        browser = _browser(tmp / "chromium-profile")
        shots = Path(os.environ.get("EXITPIPE_SCREENSHOTS") or tmp / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        yield Dashboard(url, env, ns, sender, browser, shots)
    finally:
        if browser is not None:
            browser.quit()
        if web is not None:
            _stop(web)
        _stop(daemons)
        delete_namespace(amqp_url, ns)


def _browser(profile: Path) -> webdriver.Chrome:
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1360,900",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(60)
    return browser


def _job_row(d: Dashboard, job_id: str) -> WebElement:
    return d.find(f'tr[data-job-id="{job_id}"]')


# -- the jobs page -----------------------------------------------------------------------------


def test_the_jobs_page_shows_statuses_and_marks_the_disagreement(dashboard: Dashboard) -> None:
    d = dashboard
    d.open("/")
    assert d.browser.title.startswith("Jobs")
    done, split, run = (_job_row(d, j) for j in ("web-done", "web-split", "web-run"))
    assert "FINISHED:COMPLETED" in done.text and "≠" not in done.text
    assert "RUNNING" in run.text
    status, verdict = split.find_elements(By.CSS_SELECTOR, "td")[1:3]
    assert status.text == "FINISHED:EXECUTION_EXCEPTION"
    assert "FINISHED:ABNORMAL" in verdict.text
    mark = split.find_element(By.CSS_SELECTOR, ".disagreement")
    assert mark.is_displayed() and "disagrees" in mark.text
    assert len(d.all("tr.job .disagreement")) == 1
    # The newest update comes first: the late verdict made web-split the latest job.
    assert d.all("tr.job")[0].get_attribute("data-job-id") == "web-split"
    d.screenshot("jobs")


def test_the_jobs_page_filters_searches_pages_and_refreshes(dashboard: Dashboard) -> None:
    d = dashboard
    d.open("/")
    Select(d.find("#status")).select_by_value("RUNNING")
    d.submit()
    ids = {row.get_attribute("data-job-id") for row in d.all("tr.job")}
    assert ids == {"web-run", *BULK}

    d.open("/")
    d.find("#disagreements").click()
    d.submit()
    assert [r.get_attribute("data-job-id") for r in d.all("tr.job")] == ["web-split"]

    d.open("/?size=2")
    d.find("#q").send_keys("web-bulk")
    d.submit()
    seen = [r.get_attribute("data-job-id") for r in d.all("tr.job")]
    while d.all("#next-page"):
        old = d.find("main")
        d.find("#next-page").click()
        WebDriverWait(d.browser, 15).until(staleness_of(old))
        seen += [r.get_attribute("data-job-id") for r in d.all("tr.job")]
    assert seen == BULK  # in job id order, two by two, each once

    d.open("/", refresh=True)
    status = d.find("#refresh-status")
    wait_until(lambda: status.text.startswith("updated"), timeout=15)
    assert _job_row(d, "web-split").is_displayed()


# -- one job -----------------------------------------------------------------------------------


def test_the_job_page_shows_the_timeline_history_and_why(dashboard: Dashboard) -> None:
    d = dashboard
    d.open("/jobs/web-split")
    assert d.find("#job-status").text == "FINISHED:EXECUTION_EXCEPTION"
    assert "FINISHED:ABNORMAL" in d.find("#server-status").text
    assert d.find("#server-status .disagreement").is_displayed()
    assert d.find("#why").text == (
        "fail by nvflare-2.8:fail-on-exception (site-1 CONFIG_ERROR rc=1); "
        "server verdict FINISHED:ABNORMAL differs"
    )
    lanes = [lane.get_attribute("data-lane") for lane in d.all(".timeline .lane[data-lane]")]
    assert lanes == ["server", *SITES]

    def marks(lane: str) -> list[str]:
        found = d.all(f'.lane[data-lane="{lane}"] circle')
        return [str(m.get_attribute("class")) for m in found]

    assert marks("server") == ["ev ev-applied", "ev ev-ignored"]  # RUNNING; the late verdict
    assert marks("site-1") == ["ev ev-applied", "ev ev-duplicate"]
    assert marks("site-2") == ["ev ev-ignored"]  # EXECUTION_ERROR: not reported
    applied = d.find('.lane[data-lane="site-1"] circle.ev-applied')
    fill = applied.value_of_css_property("fill")
    ignored = d.find('.lane[data-lane="site-2"] circle.ev-ignored')
    assert fill != ignored.value_of_css_property("fill")  # the classes really colour

    rows = d.all("#history tbody tr")
    cells = [[c.text for c in r.find_elements(By.CSS_SELECTOR, "td")] for r in rows]
    assert [row[7] for row in cells] == ["applied", "applied", "ignored_terminal"]
    failure = cells[1]
    assert failure[2:6] == ["site-1", "CONFIG_ERROR (1)", "fail", failure[5]]
    assert failure[5].startswith("nvflare-2.8@") and failure[6] == "fail-on-exception"
    assert failure[9] == "1"  # one duplicate
    d.screenshot("job")


def test_a_hostile_reason_is_shown_as_text_and_never_runs(dashboard: Dashboard) -> None:
    d = dashboard
    d.open("/jobs/web-split")
    reasons = [cell.text for cell in d.all("#exits td.reason")]
    assert HOSTILE in reasons  # visible, tags and all: it was never parsed as markup
    assert d.pwned() is None
    assert d.all('img[src="x"]') == []
    scripts = [s.get_attribute("src") for s in d.all("script")]
    assert scripts == [d.url + "/static/refresh.js"]
    title = d.find('.lane[data-lane="site-2"] circle title')
    assert HOSTILE in str(title.get_attribute("textContent"))


def test_an_unknown_job_is_not_found(dashboard: Dashboard) -> None:
    assert _http(dashboard.url + "/jobs/no-such-job")[0] == 404
    status, body = _http(dashboard.url + "/api/jobs/no-such-job")
    assert status == 404 and "not in the store" in json.loads(body)["error"]


# -- dead letters and health -------------------------------------------------------------------


def test_the_dead_letter_page_shows_reason_source_sender_and_counts(dashboard: Dashboard) -> None:
    d = dashboard
    d.open("/dead")
    rows = d.all("#dead tbody tr")
    assert len(rows) == 3
    hostile = [r for r in rows if HOSTILE_SCHEMA in r.find_element(By.CSS_SELECTOR, ".reason").text]
    assert len(hostile) == 2
    first = hostile[0]
    assert first.find_element(By.CSS_SELECTOR, ".source").text == Names(d.namespace).classify
    assert first.find_element(By.CSS_SELECTOR, ".sender").text == d.sender
    assert first.find_element(By.CSS_SELECTOR, ".routing-key").text == "exit.site-1"
    preview = first.find_element(By.CSS_SELECTOR, ".preview").text
    assert preview.startswith('{"schema": "<script>window.__pwned=3</script><img src=x')
    counts = {
        r.find_element(By.CSS_SELECTOR, ".reason").text: r.find_element(By.CSS_SELECTOR, ".count")
        for r in d.all("#reasons tbody tr")
    }
    assert sorted(int(c.text) for c in counts.values()) == [1, 2]
    assert any(HOSTILE_SCHEMA in reason and c.text == "2" for reason, c in counts.items())
    assert d.pwned() is None and d.all('img[src="x"]') == []
    assert d.all("form") == [] and d.all("button") == []  # nothing to requeue or purge with
    d.screenshot("dead")
    assert count(d.env["EXITPIPE_AMQP_URL"], Names(d.namespace).dead_letters) == 3  # all kept


def test_the_health_page_shows_queues_consumers_and_rates(dashboard: Dashboard) -> None:
    d = dashboard
    names = Names(d.namespace)
    d.open("/health", refresh=True)

    def cell(queue: str, column: str) -> str:
        return d.find(f'tr[data-queue="{queue}"] .{column}').text

    assert (cell(names.classify, "consumers"), cell(names.job_state, "consumers")) == ("1", "1")
    assert cell(names.dead_letters, "messages") == "3"
    daemon = d.find("section.daemon")
    assert "classifier: connected" in daemon.text and "job-state: connected" in daemon.text
    assert int(d.find('tr[data-metric="events"] .total').text) >= 10

    # The page refreshes itself; a later look has an earlier one to compute a rate from.
    def rated() -> bool:
        try:
            return d.find('tr[data-metric="events"] .rate').text.replace(".", "").isdigit()
        except StaleElementReferenceException:  # swapped by a refresh while being read
            return False

    wait_until(rated)
    d.find("#pause").click()
    d.screenshot("health")


# -- the API and the token ---------------------------------------------------------------------


def test_the_api_answers_what_the_cli_prints(dashboard: Dashboard) -> None:
    d = dashboard
    listed = json.loads(_exitpipe("jobs", "list", "--json", env=d.env).stdout)
    assert json.loads(_http(d.url + "/api/jobs")[1]) == listed
    shown = _exitpipe("jobs", "show", "web-split", "--json", env=d.env)
    assert shown.returncode == 0, shown.stderr
    api = json.loads(_http(d.url + "/api/jobs/web-split")[1])
    assert api == json.loads(shown.stdout)
    assert [e["decision"] for e in api["exits"]] == ["ignore", "fail", "fail"]
    running = json.loads(_http(d.url + "/api/jobs?status=RUNNING")[1])
    assert {j["job_id"] for j in running} == {"web-run", *BULK}


def test_beyond_loopback_the_token_is_required(dashboard: Dashboard, tmp_path: Path) -> None:
    env = dict(dashboard.env)
    refused = _exitpipe("web", "--host", "0.0.0.0", "--port", str(_free_port()), env=env)
    assert refused.returncode == 2
    assert "EXITPIPE_WEB_TOKEN" in refused.stderr and "--host 0.0.0.0" in refused.stderr

    port = _free_port()
    log = tmp_path / "web.log"
    env["EXITPIPE_WEB_TOKEN"] = TOKEN
    web = _start(["web", "--host", "0.0.0.0", "--port", str(port)], env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http(url + "/api/jobs")[0] == 401, 30)
        assert _http(url + "/")[0] == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert _http(url + "/api/jobs", bearer)[0] == 200
        assert _http(url + "/", bearer)[0] == 200
        assert _http(url + f"/api/jobs?token={quote(TOKEN)}")[0] == 200
        assert _http(url + "/api/jobs", {"Authorization": "Bearer nope"})[0] == 401
        # A browser opens the page once with ?token=, and the links work after that.
        dashboard.open("")  # leave the other dashboard's page first
        dashboard.browser.get(f"{url}/?token={quote(TOKEN)}")
        assert TOKEN not in dashboard.browser.current_url
        dashboard.browser.find_element(By.CSS_SELECTOR, 'a[href="/jobs/web-split"]').click()
        assert dashboard.find("#job-status").text == "FINISHED:EXECUTION_EXCEPTION"
    finally:
        stopped = _stop(web)
    assert stopped == 0, log.read_text()  # SIGTERM is a clean stop
    assert TOKEN not in log.read_text()
