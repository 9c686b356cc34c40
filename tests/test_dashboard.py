"""The dashboard at `GET /ui`, driven in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium) against a real proxy with real upstreams and traffic.

The proxy runs on an event loop in a thread of its own, so that the browser can be driven
with Selenium's blocking calls; the test reaches it only over HTTP, like the browser does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from conftest import HOST, ProxyFactory, SampleFactory, proxy_config
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.keys import Keys

from proxy.admin.ui import POLICY
from proxy.config import parse_config
from proxy.runtime import Proxy
from proxy.tools.sample import SampleSettings, start

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN_ENV = "TURNOUT_DASHBOARD_TEST_TOKEN"
TOKEN = "s3cret-dashboard-token"
WAIT = 10.0
SHOWN_WITHIN = 1.0  # a split changed through the API is on the page this soon (seen: 0.03-0.25 s)
CLIENTS = 4
ADMIN_LINE = re.compile(r"turnout: admin API on http://[^:]+:(\d+)")
ARTEFACTS = Path(__file__).resolve().parent.parent / "reports" / "dashboard"


# the proxy, on a loop of its own ---------------------------------------------------------


class Running:
    """A proxy with a token-protected admin API, blue and green upstreams and steady traffic,
    served by an event loop in a background thread."""

    def __init__(
        self,
        admin_port: int = 0,
        admin_tls: dict[str, str] | None = None,
        ca: Path | None = None,
    ) -> None:
        self.admin_port = admin_port
        self.admin_tls = admin_tls
        self.client_tls = None if ca is None else ssl.create_default_context(cafile=str(ca))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stop = asyncio.Event()
        self.sent = 0
        self.proxy: Proxy = self.run(self._start())

    def run(self, coro: Any, timeout: float = WAIT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> Proxy:
        self.runners = []
        urls = []
        for name in ("blue", "green"):
            runner, port = await start(SampleSettings(name=name), HOST, 0)
            self.runners.append(runner)
            urls.append(f"http://{HOST}:{port}")
        data = proxy_config(
            [urls[0]],
            [urls[1]],
            admin={
                "host": HOST,
                "port": self.admin_port,
                "token_env": TOKEN_ENV,
                "tls": self.admin_tls,
            },
            health_check={"interval": "1s"},
            rollout={
                "strategy": "adaptive",
                "steps": [10, 50, 100],
                "interval": "60s",
                "threshold": {"max_p99": "5s", "min_requests": 20},
            },
        )
        proxy = Proxy(parse_config(data))
        await proxy.start()
        await proxy.start_admin()
        self.session = aiohttp.ClientSession()
        url = f"http://{HOST}:{proxy.port}/"
        self.clients = [asyncio.create_task(self._client(url)) for _ in range(CLIENTS)]
        return proxy

    async def _client(self, url: str) -> None:
        while not self.stop.is_set():
            try:
                async with self.session.get(url) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass
            self.sent += 1
            await asyncio.sleep(0.01)

    async def _close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.clients, return_exceptions=True)
        await self.session.close()
        await self.proxy.shutdown(timeout=1.0)
        for runner in self.runners:
            await runner.cleanup()

    def close(self) -> None:
        self.run(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()

    @property
    def admin(self) -> str:
        scheme = "https" if self.admin_tls else "http"
        return f"{scheme}://{HOST}:{self.proxy.admin_port}"

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One admin API call with the right token, as any client makes it."""
        request = urllib.request.Request(
            self.admin + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=WAIT, context=self.client_tls) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def status(self) -> dict[str, Any]:
        code, answer = self.api("GET", "/status")
        assert code == 200, answer
        status: dict[str, Any] = answer
        return status


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN_ENV, TOKEN)
        proxy = Running()
        try:
            yield proxy
        finally:
            proxy.close()


# the browser ------------------------------------------------------------------------------


def start_browser(*, insecure_certs: bool = False) -> Any:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(f"the dashboard tests need {CHROMIUM} and {CHROMEDRIVER} (.ci/run)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1366,900"):
        options.add_argument(arg)
    options.add_argument("--disable-dev-shm-usage")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.accept_insecure_certs = insecure_certs
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    return driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


def until(condition: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    """Poll `condition` until it returns something true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def text(driver: Any, element_id: str) -> str:
    value: str = driver.execute_script(
        "const el = document.getElementById(arguments[0]); return el ? el.textContent : '';",
        element_id,
    )
    return value


def fresh_page(driver: Any, running: Running, token: str | None) -> None:
    """The dashboard in a tab with no history, holding `token` (as if typed before)."""
    # The token goes in from an open page of the same origin: the dashboard itself, loaded
    # without it, would ask for /status and log the 401, maybe after any point we could pick.
    driver.get(running.admin + "/healthz")
    driver.execute_script(
        "sessionStorage.clear();"
        "if (arguments[0]) sessionStorage.setItem('turnout.token', arguments[0]);",
        token,
    )
    driver.get_log("browser")  # what the earlier pages logged is not this page's
    driver.get(running.admin + "/ui")
    if token is not None:
        until(lambda: text(driver, "contact") == "live", what="the page is live")
        until(lambda: text(driver, "upstreams").count("http://") == 2, what="the upstream table")


def leave_rollout(running: Running) -> None:
    """End a rollout another test left in progress: the split is the operator's again."""
    if running.status()["rollout"]["state"] in ("progressing", "insufficient_data", "paused"):
        code, answer = running.api("POST", "/rollout/abort")
        assert code == 200, answer


# tests ----------------------------------------------------------------------------------------


def test_the_page_loads_live_data_with_no_console_errors(browser: Any, running: Running) -> None:
    fresh_page(browser, running, TOKEN)
    until(lambda: text(browser, "state") in ("idle", "aborted", "rolled_back", "progressing"))
    assert "token set for this tab" in text(browser, "auth")
    assert text(browser, "stable") == "blue"
    # Live figures, not a page's own data: the table carries the proxy's counters.
    assert (
        int(
            browser.execute_script("return document.querySelectorAll('#upstreams tbody tr').length")
        )
        == 2
    )
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []


def test_a_split_changed_through_the_api_shows_on_the_page(browser: Any, running: Running) -> None:
    leave_rollout(running)
    fresh_page(browser, running, TOKEN)
    for green in (37.5, 12.0):
        code, answer = running.api("PUT", "/split", {"green": green})
        assert code == 200, answer
        changed = time.monotonic()

        def on_page(shown: str = f"{green:.1f}% green") -> bool:
            return text(browser, "split").startswith(shown)

        until(
            on_page,
            timeout=SHOWN_WITHIN,
            what=f"split {green} on the page",
        )
        assert time.monotonic() - changed < SHOWN_WITHIN


def test_rollback_from_the_page_rolls_back(browser: Any, running: Running, tmp_path: Path) -> None:
    leave_rollout(running)
    code, answer = running.api("PUT", "/split", {"green": 0})
    assert code == 200, answer
    code, answer = running.api("POST", "/rollout/start", {"strategy": "adaptive"})
    assert code == 200, answer
    fresh_page(browser, running, TOKEN)
    until(lambda: running.status()["split"]["green"] == 10.0, what="the rollout's first step")
    until(lambda: text(browser, "state") == "progressing", what="the page shows progressing")
    until(lambda: "10.0% green" in text(browser, "split"), what="the first step on the page")
    until(lambda: "step 1" in text(browser, "events"), what="the step event in the log")
    until(
        lambda: (
            int(
                browser.execute_script(
                    "return Number(document.getElementById('chart-rate').dataset.points || 0)"
                )
            )
            >= 6
        ),
        what="a few seconds of traffic on the chart",
    )
    for path in (tmp_path / "rollout.png", ARTEFACTS / "rollout-in-progress.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(path))

    browser.find_element("id", "rollback").click()
    assert "moves traffic" in confirm(browser)
    until(lambda: text(browser, "state") == "rolled_back", what="the page shows rolled_back")
    assert "rolled back by token@" in text(browser, "reason")
    assert running.status()["rollout"]["state"] == "rolled_back"
    assert running.status()["split"]["green"] == 0.0
    assert "rollback: done" in text(browser, "action-result")
    # Refused: the API's own words on the page.
    browser.find_element("id", "pause").click()
    until(lambda: "refused" in text(browser, "action-result"), what="the refusal")
    assert text(browser, "action-result") == (
        "pause refused: 409 cannot pause: the rollout is rolled_back"
    )


def confirm(driver: Any) -> str:
    """Accept the confirmation the page asks for; what it asked."""
    return answer(driver, accept=True)


def answer(driver: Any, accept: bool) -> str:
    """Accept or dismiss the confirmation the page asks for; what it asked."""
    alert = until(lambda: _alert(driver), what="the confirmation")
    question: str = alert.text
    if accept:
        alert.accept()
    else:
        alert.dismiss()
    return question


def test_shift_drain_and_undrain_from_the_page(browser: Any, running: Running) -> None:
    leave_rollout(running)
    fresh_page(browser, running, TOKEN)
    browser.find_element("id", "shift-green").send_keys("30")
    browser.find_element("id", "shift-over").send_keys("1s")
    browser.find_element("id", "shift").click()
    assert confirm(browser) == "Shift the split to 30% green over 1s?"
    until(lambda: running.status()["split"]["green"] == 30.0, what="the ramp to 30")
    until(lambda: text(browser, "split").startswith("30.0% green"), what="30 on the page")
    assert "ramp from" in text(browser, "events")

    row = "#upstreams tr[data-key='green/0']"
    browser.find_element("css selector", f"{row} button").click()
    assert confirm(browser) == "Drain green/0? This moves traffic."
    until(lambda: running.status()["pools"]["green"]["upstreams"][0]["draining"], what="drain")
    until(lambda: "drain" in browser.find_element("css selector", f"{row} td:nth-child(3)").text)
    button = browser.find_element("css selector", f"{row} button")
    until(lambda: button.text == "Undrain", what="the button turns to Undrain")
    button.click()
    assert confirm(browser) == "Undrain green/0? This moves traffic."
    until(lambda: not running.status()["pools"]["green"]["upstreams"][0]["draining"])
    until(lambda: browser.find_element("css selector", f"{row} td:nth-child(3)").text == "up")

    # The stable pool's last upstream: the API refuses, the page asks whether to force it.
    row = "#upstreams tr[data-key='blue/0']"
    browser.find_element("css selector", f"{row} button").click()
    assert confirm(browser) == "Drain blue/0? This moves traffic."
    forced = answer(browser, accept=False)
    assert forced.startswith("409 would empty the stable pool: blue/0 is the last upstream")
    assert forced.endswith("Drain anyway?")
    until(lambda: "drain blue/0 refused: 409" in text(browser, "action-result"))
    assert not running.status()["pools"]["blue"]["upstreams"][0]["draining"]
    browser.find_element("css selector", f"{row} button").click()
    confirm(browser)
    assert answer(browser, accept=True) == forced
    until(lambda: running.status()["pools"]["blue"]["upstreams"][0]["draining"], what="forced")
    assert running.api("POST", "/pools/blue/upstreams/0/undrain")[0] == 200


def _alert(driver: Any) -> Any:
    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return None


def test_a_supervisor_page_shows_its_workers(
    browser: Any, running: Running, tmp_path: Path
) -> None:
    """Under `turnout run --workers 2` the page says how many workers run and restarted; a
    single process shows no such line."""
    fresh_page(browser, running, TOKEN)
    assert not browser.find_element("id", "workers").is_displayed()
    path = tmp_path / "workers.yaml"
    dead = f"http://{HOST}:9"  # no upstream needed to show the processes
    path.write_text(json.dumps(proxy_config([dead], [dead], admin={"host": HOST, "port": 0})))
    out = tmp_path / "workers.out"
    env = {k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"}
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(path), "--workers", "2"],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    try:
        found = until(lambda: ADMIN_LINE.search(out.read_text()), timeout=30, what="admin line")
        browser.get(f"http://{HOST}:{found[1]}/ui")
        until(lambda: text(browser, "workers") == "2 ready · 0 restarts", what="the workers")
        assert browser.find_element("id", "workers").is_displayed()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_wrong_token_shows_the_401_message(browser: Any, running: Running) -> None:
    fresh_page(browser, running, None)
    until(lambda: "needs a token" in text(browser, "auth-error"), what="the token prompt")
    assert "read-only" in text(browser, "auth")
    assert browser.find_element("id", "rollback").get_attribute("disabled") is not None
    field = browser.find_element("id", "token")
    field.send_keys("not-the-token")
    browser.find_element("id", "token-use").click()
    until(lambda: "refused the token" in text(browser, "auth-error"), what="the 401 message")
    message = text(browser, "auth-error")
    assert "401 unauthorized: missing or wrong bearer token" in message
    # Typed once (from the keyboard alone), kept for the tab: the right one makes it live.
    browser.find_element("id", "token").send_keys(TOKEN + Keys.ENTER)
    until(lambda: browser.find_element("id", "auth-error").get_attribute("hidden") is not None)
    until(lambda: text(browser, "stable") == "blue", what="the page shows data")


def test_without_a_token_configured_actions_work_directly(browser: Any, running: Running) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(TOKEN_ENV)
        open_admin = Running()
    try:
        fresh_page(browser, open_admin, None)
        until(lambda: "no token configured" in text(browser, "auth"), what="no token needed")
        assert browser.find_element("id", "auth-error").get_attribute("hidden") is not None
        browser.find_element("id", "strategy-choice").send_keys("lazy")
        browser.find_element("id", "start").click()
        assert confirm(browser) == "Start a lazy rollout? It moves traffic to the candidate."
        until(lambda: text(browser, "state") == "progressing", what="the lazy rollout")
        assert open_admin.status()["rollout"]["strategy"] == "lazy"
        browser.find_element("id", "abort").click()  # moves no traffic: no question asked
        until(lambda: text(browser, "state") == "aborted", what="aborted")
        assert "abort: done (progressing → aborted" in text(browser, "action-result")
    finally:
        open_admin.close()


def chart_points(driver: Any, chart: str = "chart-rate") -> int:
    script = "return Number(document.getElementById(arguments[0]).dataset.points || 0)"
    return int(driver.execute_script(script, chart))


def test_a_reload_keeps_the_picture(browser: Any, running: Running) -> None:
    fresh_page(browser, running, TOKEN)
    until(lambda: chart_points(browser) >= 4, what="a few points")
    before = chart_points(browser)
    events = text(browser, "events")
    browser.refresh()  # returns once the page has loaded: too soon for more than a poll or two
    assert chart_points(browser) >= before
    assert text(browser, "events").startswith(events[:40])


def test_the_page_says_when_it_lost_contact_and_comes_back(browser: Any, running: Running) -> None:
    first = Running()
    try:
        fresh_page(browser, first, TOKEN)
        port = first.proxy.admin_port
    finally:
        first.close()
    until(lambda: "lost contact since" in text(browser, "contact"), what="lost contact")
    assert "reconnecting" in text(browser, "contact")
    second = Running(admin_port=port)  # the proxy back on the same address
    try:
        until(lambda: text(browser, "contact") == "live", what="live again")
        code, answer = second.api("PUT", "/split", {"green": 42})
        assert code == 200, answer
        # The event stream is back too: the new proxy's events reach the log.
        until(lambda: "split 0% → 42% green" in text(browser, "events"), what="a new event")
        until(lambda: text(browser, "split").startswith("42.0% green"), what="the new split")
    finally:
        second.close()


def test_the_page_works_over_admin_tls(running: Running, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key, ca_path = tmp_path / "admin.pem", tmp_path / "admin.key", tmp_path / "ca.pem"
    leaf = ca.issue_cert(HOST)
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_path))
    over_tls = Running(admin_tls={"cert": str(cert), "key": str(key)}, ca=ca_path)
    # A browser of its own, that trusts the test CA's certificate, and quits before the proxy
    # stops (its idle TLS connections would otherwise wait for its close_notify).
    browser = start_browser(insecure_certs=True)
    try:
        assert over_tls.admin.startswith("https://")
        fresh_page(browser, over_tls, TOKEN)
        assert browser.current_url == over_tls.admin + "/ui"
        until(lambda: chart_points(browser) >= 2, what="samples over TLS")
        code, answer = over_tls.api("PUT", "/split", {"green": 5})
        assert code == 200, answer
        until(lambda: "→ 5% green" in text(browser, "events"), what="the event stream over TLS")
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
    finally:
        browser.quit()
        over_tls.close()


def test_the_chart_gains_points_while_traffic_flows(browser: Any, running: Running) -> None:
    fresh_page(browser, running, TOKEN)

    def points() -> int:
        return int(
            browser.execute_script(
                "return Number(document.getElementById('chart-rate').dataset.points || 0)"
            )
        )

    first = until(points, what="a first point")
    sent = running.sent
    until(lambda: points() >= first + 3, what="three more points")
    assert running.sent > sent
    until(
        lambda: (
            "req/s" in text(browser, "legend")
            and not text(browser, "legend").startswith("blue: 0 req/s, ")
        ),
        what="a non-zero rate",
    )


async def test_the_page_is_served_without_the_token_under_a_strict_policy(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    blue, green = await sample("blue"), await sample("green")
    admin = {"host": HOST, "port": 0, "token_env": TOKEN_ENV}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN_ENV, TOKEN)
        proxy = await make_proxy(proxy_config([blue.url], [green.url], admin=admin))
        port = await proxy.start_admin()
    base = f"http://{HOST}:{port}"
    async with session.get(base + "/status") as resp:
        assert resp.status == 401  # the data needs the token; the page does not
    for path, kind in (
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ):
        async with session.get(base + path) as resp:
            assert resp.status == 200, path
            assert resp.content_type == kind
            assert resp.headers["Content-Security-Policy"] == POLICY
            assert "default-src 'self'" in POLICY
            assert "unsafe-inline" not in POLICY
            body = await resp.text()
    async with session.get(base + "/ui") as resp:
        page = await resp.text()
    # No inline script or style for the policy to refuse, and relative URLs only.
    assert "<script>" not in page
    assert "style=" not in page
    assert "<style" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    async with session.get(base + "/ui/", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (302, "../ui")
    async with session.get(base + "/ui/") as resp:
        assert resp.status == 200
        assert resp.url.path == "/ui"
    # Only the page and its assets are open; anything else there is the API's, behind the token.
    async with session.get(base + "/ui/secrets.txt") as resp:
        assert resp.status == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with session.get(base + "/ui/secrets.txt", headers=bearer) as resp:
        assert resp.status == 404
    assert body


def test_status_carries_what_the_page_draws(running: Running) -> None:
    status = running.status()
    rollout = status["rollout"]
    assert rollout["threshold"] == {
        "max_error_rate": 0.01,
        "max_p99_ms": 5000.0,
        "max_p99_ratio": 1.5,
        "min_requests": 20,
    }
    assert rollout["interval"] == 60.0
    recent = status["recent"]
    assert recent["seconds"] == 5.0
    until(lambda: running.status()["recent"]["blue"]["requests"] > 0, what="recent traffic")
