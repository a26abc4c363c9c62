"""The operator's console in a real browser: headless Chromium driven by Selenium against a
real `dm-actor serve` with simulated devices (`dm-actor simulate`), both subprocesses.

Logs in with an administrator key, lists the devices (and searches them by prefix), opens one,
reads a resource and sees its value, writes one, observes a resource and sees notifications
arrive, and watches the live-events table. Each step is saved as a screenshot into
`$DM_ACTOR_SCREENSHOTS` (default: a pytest temporary directory; printed). Real time: the
browser and the devices are real processes. Chromium and its driver are the Debian packages
(`chromium`, `chromium-driver`; `.ci/run` installs them): nothing is downloaded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.daemon import ROOT, free_ports
from tests.tools import tool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from selenium.webdriver.remote.webdriver import WebDriver

ADMIN_KEY = "adm_console_browser_test"
APP_KEY = "ak_console_browser_app"
DEVICES = 3
WAIT = 20.0  # s: for any one thing the page should show


@pytest.fixture
def screenshots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    where = Path(os.environ.get("DM_ACTOR_SCREENSHOTS") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\nconsole screenshots: {where}")
    return where


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[str]:
    """A daemon with `DEVICES` simulated devices; yields its HTTP base URL."""
    coap, http = free_ports(2)
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "dm_actor", "serve", "--host", "127.0.0.1",
         "--coap-port", str(coap), "--http-port", str(http), "--data-dir", str(tmp_path / "data"),
         "--api-key", APP_KEY, "--admin-key", ADMIN_KEY],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    sim = None
    try:
        _wait_for_port(http, serve, tmp_path / "serve.log")
        sim = subprocess.Popen(
            [sys.executable, "-m", "dm_actor", "simulate", "--server",
             f"coap://127.0.0.1:{coap}", "--devices", str(DEVICES), "--duration", "170",
             "--sample-period", "0.5", "--progress", "0"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        yield f"http://127.0.0.1:{http}"
    finally:
        for proc in (sim, serve):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        log.close()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dm-actor exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("the daemon's HTTP port did not open")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    driver_path = tool("chromedriver", "chromium-driver")
    chromium = tool("chromium", "chromium")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _until(driver: WebDriver, what: str, check: Callable[[], object]) -> object:
    """Wait (real time, at most `WAIT`) until `check()` is truthy; fail naming `what`."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            found = check()
        except Exception:  # (an element replaced while read: try again)
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
            pytest.fail(f"timed out waiting for {what}; browser log: {logs}")
        time.sleep(0.1)


def test_console_in_a_real_browser(daemon: str, browser: WebDriver, screenshots: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(daemon + "/console/")

    def shot(name: str) -> None:
        driver.save_screenshot(str(screenshots / f"{name}.png"))

    def rows(selector: str) -> list[Any]:
        return driver.find_elements(By.CSS_SELECTOR, selector)

    # 1. log in: a wrong key is refused, the administrator key lists the devices
    _until(driver, "the login form", lambda: driver.find_element(By.ID, "key").is_displayed())
    driver.find_element(By.ID, "key").send_keys(APP_KEY)
    driver.find_element(By.ID, "login-button").click()
    _until(
        driver,
        "the refusal of an application key",
        lambda: "not an administrator" in driver.find_element(By.ID, "login-error").text,
    )
    shot("01-login-refused")
    driver.find_element(By.ID, "key").clear()
    driver.find_element(By.ID, "key").send_keys(ADMIN_KEY)
    driver.find_element(By.ID, "login-button").click()

    def device_rows() -> list[str]:
        return [r.get_attribute("data-endpoint") for r in rows("#device-table tbody tr")]

    def all_listed() -> bool:
        if len(device_rows()) < DEVICES:
            driver.find_element(By.ID, "search-form").submit()  # (devices still registering)
            return False
        return True

    _until(driver, "the devices listed", all_listed)
    assert device_rows() == [f"sim-{i}" for i in range(DEVICES)]
    assert driver.execute_script("return sessionStorage.getItem('dmActorAdminKey')") == ADMIN_KEY
    _until(
        driver,
        "the server at a glance",
        lambda: driver.find_element(By.ID, "g-devices").text == str(DEVICES),
    )
    shot("02-devices")
    # search by endpoint-name prefix
    driver.find_element(By.ID, "search").send_keys("sim-1")
    driver.find_element(By.ID, "search-form").submit()
    _until(driver, "the prefix search", lambda: device_rows() == ["sim-1"])
    shot("03-search-prefix")

    # 2. open a device: its resources with names from the models
    driver.get(daemon + "/console/#/device/sim-0")
    _until(driver, "the device's resources", lambda: rows('tr[data-path="/3303/0/5700"]'))
    row_text = driver.find_element(By.CSS_SELECTOR, 'tr[data-path="/3303/0/5700"]').text
    assert "Sensor Value" in row_text
    assert "Temperature" in driver.find_element(By.ID, "resource-table").text
    shot("04-device")

    def value(path: str) -> str:
        cell = driver.find_element(By.CSS_SELECTOR, f'tr[data-path="{path}"] td.value')
        return str(cell.text)

    def click(path: str, cls: str) -> None:
        driver.find_element(By.CSS_SELECTOR, f'tr[data-path="{path}"] button.{cls}').click()

    # 3. read a resource and see its (decoded) value, and the command's state
    click("/3/0/0", "read")
    _until(driver, "the read's value", lambda: value("/3/0/0") == "dm-actor")
    states = [r.text for r in rows("#command-table tbody tr")]
    assert any("GET /3/0/0" in s and "done" in s and "200" in s for s in states), states
    shot("05-read")

    # 4. write one, then read it back
    dimmer = "/3311/0/5851"
    field = driver.find_element(By.CSS_SELECTOR, f'tr[data-path="{dimmer}"] input.write-value')
    field.send_keys("42")
    click(dimmer, "write")

    def written() -> bool:
        texts = [r.text for r in rows("#command-table tbody tr")]
        return any(f"PUT {dimmer}" in t and "done" in t and "200" in t for t in texts)

    _until(driver, "the write's AsyncIDResponse", written)
    click(dimmer, "read")
    _until(driver, "the written value read back", lambda: value(dimmer) == "42 %")
    shot("06-write")

    # 5. observe: notifications arrive on the event tap and update the value
    temperature = "/3303/0/5700"
    click(temperature, "observe")

    def notified() -> int:
        row = driver.find_element(By.CSS_SELECTOR, f'tr[data-path="{temperature}"]')
        return int(row.get_attribute("data-notified") or 0)

    _until(driver, "two notifications", lambda: notified() >= 2)
    assert value(temperature).endswith(" Cel"), value(temperature)
    shot("07-observe")
    # execute: the Registration Update Trigger makes the device send an Update
    click("/1/0/8", "exec")

    def executed() -> bool:
        texts = [r.text for r in rows("#command-table tbody tr")]
        return any("POST /1/0/8" in t and "done" in t for t in texts)

    _until(driver, "the execute's AsyncIDResponse", executed)

    # 6. the live events: registrations, notifications, async responses; pause holds them
    driver.find_element(By.ID, "nav-events").click()

    def kinds() -> set[str]:
        return {r.get_attribute("data-kind") for r in rows("#event-table tbody tr")}

    _until(driver, "notifications in the events table", lambda: "notifications" in kinds())
    _until(driver, "the Update in the events table", lambda: "reg-updates" in kinds())
    assert "async-responses" in kinds()
    driver.find_element(By.ID, "pause").click()
    _until(
        driver,
        "events held while paused",
        lambda: (
            "held" in driver.find_element(By.ID, "event-stats").text
            and " 0 held" not in driver.find_element(By.ID, "event-stats").text
        ),
    )
    shown_while_paused = len(rows("#event-table tbody tr"))
    shot("08-events-paused")
    time.sleep(0.5)
    assert len(rows("#event-table tbody tr")) == shown_while_paused
    driver.find_element(By.ID, "pause").click()
    _until(
        driver,
        "held events shown on resume",
        lambda: len(rows("#event-table tbody tr")) > shown_while_paused,
    )
    shot("09-events")
    # stop observing (the console leaves no observation behind)
    driver.get(daemon + "/console/#/device/sim-0")
    _until(
        driver,
        "the Stop button",
        lambda: (
            driver.find_element(
                By.CSS_SELECTOR, f'tr[data-path="{temperature}"] button.observe'
            ).text
            == "Stop"
        ),
    )
    click(temperature, "observe")
    _until(
        driver,
        "the observation stopped",
        lambda: (
            driver.find_element(By.CSS_SELECTOR, f'tr[data-path="{temperature}"]').get_attribute(
                "data-observing"
            )
            == "no"
        ),
    )
