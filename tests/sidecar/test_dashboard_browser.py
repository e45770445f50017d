"""The dashboard in a real browser (Debian's headless Chromium through chromedriver).

A real sidecar process, real upstreams: the test breaks one upstream and watches the page
show that service's breaker open, heals it and watches it close; a hot reload adds a
service; a sidecar restart is survived; and the page never asks anything of any host but
the admin listener. The breaker test runs on both engines (`--engine envoy`: the same page
over the `/state` and metrics riprap reads from Envoy's admin API). Skipped, with the
reason, only where Chromium or its driver (or, for the Envoy run, the Envoy binary) is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]

ENGINES = [
    pytest.param("python", id="python"),
    pytest.param("envoy", id="envoy"),
]

POLICY = """\
app shop
service pay {{
    timeout 1s
    endpoint {pay}
    breaker failures 3 open 2s
}}
service inv {{
    endpoint {inv}
}}
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _requested_urls(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _card_attr(driver: Any, service: str, attr: str) -> str | None:
    cards = driver.find_elements(By.CSS_SELECTOR, f'details.svc[data-service="{service}"]')
    return cards[0].get_attribute(attr) if cards else None


def _wait(what: str, predicate: Callable[[], bool], timeout: float,
          tick: Callable[[], None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"the dashboard did not show {what} within {timeout} s")


def _engine_args(engine: str) -> tuple[str, ...]:
    """The `riprap run` flags for `engine`; the Envoy run is skipped without an Envoy binary."""
    if engine == "python":
        return ()
    from sidecar.engines.envoy.process import EnvoyNotFound, find_envoy

    try:
        find_envoy()
    except EnvoyNotFound as exc:
        pytest.skip(f"the Envoy engine needs its binary: {exc}")
    return ("--engine", "envoy")


@pytest.mark.parametrize("engine", ENGINES)
def test_breaker_opens_and_closes_on_the_page(browser: Any, upstreams: Any, sidecar_proc: Any,
                                              module_tmp: Path, engine: str) -> None:
    pay, inv = upstreams(f"pay-{engine}"), upstreams(f"inv-{engine}")
    policy = module_tmp / f"shop-{engine}.riprap"
    policy.write_text(POLICY.format(pay=pay.url, inv=inv.url))
    side = sidecar_proc(policy, *_engine_args(engine)).start(timeout=30)
    # Envoy's figures reach the page through riprap's once-a-second read of Envoy's admin
    # API, then the dashboard's once-a-second sample: up to about two seconds later
    lag = 0.0 if engine == "python" else 3.0
    try:
        admin = side.admin_url
        browser.get("about:blank")
        _requested_urls(browser)  # drain what the browser fetched for itself before the page
        browser.get(admin + "/")
        _wait("the pay service", lambda: _card_attr(browser, "pay", "data-breaker") == "closed", 10)
        assert browser.find_element(By.ID, "conn").get_attribute("data-conn") == "live"

        def call() -> None:
            try:
                side.client.get("/pay/x", timeout=2)
            except httpx.HTTPError:
                pass

        # docs/dashboard.png is made so, by the Python engine's run only
        shot = os.environ.get("RIPRAP_DASHBOARD_SCREENSHOT") if engine == "python" else None
        if shot:  # a history first, so that the charts in the docs' picture have a shape
            end = time.monotonic() + 10
            while time.monotonic() < end:
                call()
                side.client.get("/inv/y", timeout=2)
                time.sleep(0.02)
        pay.set(mode="refuse")  # the payment replica dies
        _wait("pay's breaker open", lambda: _card_attr(browser, "pay", "data-breaker") == "open",
              8 + lag, tick=call)
        breaker = browser.find_element(
            By.CSS_SELECTOR, 'details.svc[data-service="pay"] [data-role="breaker"]')
        assert breaker.text.startswith("open"), breaker.text  # in words, not colour alone
        first = browser.find_elements(By.CSS_SELECTOR, "details.svc")[0]
        assert first.get_attribute("data-service") == "pay"  # the troubled service comes first
        time.sleep(1.5 if shot else 0)
        browser.save_screenshot(shot or str(module_tmp / f"dashboard-open-{engine}.png"))

        pay.recover()
        _wait("pay's breaker closed again",
              lambda: _card_attr(browser, "pay", "data-breaker") == "closed", 12 + lag, tick=call)

        # a hot reload that adds a service: its card appears without reloading the page
        inv2 = upstreams(f"search-{engine}")
        policy.write_text(POLICY.format(pay=pay.url, inv=inv.url)
                          + f"service search {{\n    endpoint {inv2.url}\n}}\n")
        _wait("the new service", lambda: _card_attr(browser, "search", "data-service") == "search",
              8 + 2 * lag)

        urls = _requested_urls(browser)
        assert any(u.endswith("/dashboard.json") for u in urls)
        off = [u for u in urls if not u.startswith((admin + "/", "data:"))]
        assert off == [], f"the page asked for something off the admin listener: {off}"
    finally:
        side.stop()


def test_page_reconnects_after_a_sidecar_restart(browser: Any, upstreams: Any,
                                                 sidecar_proc: Any, module_tmp: Path) -> None:
    pay, inv = upstreams("pay2"), upstreams("inv2")
    policy = module_tmp / "restart.riprap"
    policy.write_text(POLICY.format(pay=pay.url, inv=inv.url))
    side = sidecar_proc(policy).start()
    port, admin_port = side.port, side.admin_port
    try:
        browser.get(side.admin_url + "/")
        _wait("live data", lambda: browser.find_element(By.ID, "conn").get_attribute("data-conn") == "live", 10)
    finally:
        side.stop()
    _wait("the lost connection",
          lambda: browser.find_element(By.ID, "conn").get_attribute("data-conn") == "reconnecting", 6)
    again = sidecar_proc(policy)
    again.port, again.admin_port = port, admin_port
    again.client = httpx.Client(base_url=again.url, trust_env=False, timeout=20)
    again.admin = httpx.Client(base_url=again.admin_url, trust_env=False, timeout=10)
    again.start()
    try:
        _wait("live data again",
              lambda: browser.find_element(By.ID, "conn").get_attribute("data-conn") == "live", 10)
        assert _card_attr(browser, "pay", "data-service") == "pay"
    finally:
        again.stop()
