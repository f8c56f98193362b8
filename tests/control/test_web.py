"""Issue 12: the web page in a real headless Chromium (Debian's chromium + chromium-driver,
driven by selenium), served by the daemon over its TLS + token listener: it lists two running
guests, a click on pause changes the shown state and that guest stops ticking while the
other goes on; the console view shows the guest's output. A screenshot is saved under
test-artifacts/."""
from __future__ import annotations

import shutil
import tempfile
import time

import pytest

from .ctlhelp import ARTIFACTS, kernel, ticks
from .test_openapi import TOKEN, tls_daemon  # noqa: F401  (the TLS daemon fixture)

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.fail("chromium and chromium-driver are not installed (make web-test-deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="avchrome")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1280,800",
                 "--ignore-certificate-errors"):      # the test's self-signed certificate
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(cond, timeout: float = 30, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.2)


def _rows(drv) -> dict[str, dict]:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        out = {}
        for tr in drv.find_elements(By.CSS_SELECTOR, "#domains tbody tr"):
            name = tr.get_attribute("data-name")
            out[name] = {"state": tr.find_element(By.CSS_SELECTOR, "td.state").text, "row": tr}
        return out
    except StaleElementReferenceException:      # redrawn meanwhile (once a second)
        return {}


def test_web_page_lists_pauses_and_shows_console(tls_daemon, browser):
    from selenium.webdriver.common.by import By
    d = tls_daemon
    for name in ("webA", "webB"):
        d.api("POST", "/api/v1/domains", {"kernel": kernel(), "memory": 8, "name": name,
                                          "cmdline": "ticks=100000 period_ms=50"})
    d.wait_console("webA", r"timer: tick 3 ")
    d.wait_console("webB", r"timer: tick 3 ")
    browser.get(f"{d.url}/#token={TOKEN}")
    rows = _wait(lambda: (r := _rows(browser)) and {"webA", "webB"} <= set(r) and r, what="two guests listed")
    for name in ("webA", "webB"):
        assert rows[name]["state"].split()[0] in ("running", "blocked"), rows[name]["state"]
    # pause webA with its button
    _wait(lambda: _click(browser, "webA", "pause"), what="pause button")
    _wait(lambda: _rows(browser).get("webA", {}).get("state", "").startswith("paused"), what="shown paused")
    assert d.api("GET", "/api/v1/domains/webA")["status"] == "paused"
    time.sleep(0.3)
    a0, b0 = ticks(d.console_text("webA")), ticks(d.console_text("webB"))
    time.sleep(1.5)
    a1, b1 = ticks(d.console_text("webA")), ticks(d.console_text("webB"))
    assert a1 == a0, (a0, a1)                       # the paused guest stopped ticking
    assert b1 >= b0 + 10, (b0, b1)                  # the other goes on (50 ms period)
    # the console view of webB
    _wait(lambda: _click(browser, "webB", "console"), what="console button")
    _wait(lambda: "timer: tick" in browser.find_element(By.ID, "console-out").text, what="console output")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    # unpause: shown running again and ticking again
    _wait(lambda: _click(browser, "webA", "unpause"), what="unpause button")
    _wait(lambda: _rows(browser).get("webA", {}).get("state", "").split()[:1] in (["running"], ["blocked"]),
          what="shown running")
    d.wait_console("webA", rf"timer: tick {a1 + 5} ", timeout=30)
    for name in ("webA", "webB"):
        d.api("DELETE", f"/api/v1/domains/{name}")


def _click(drv, name: str, action: str) -> bool:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        row = drv.find_element(By.CSS_SELECTOR, f'#domains tbody tr[data-name="{name}"]')
        row.find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]').click()
        return True
    except (NoSuchElementException, StaleElementReferenceException):
        return False
