"""The web UI in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium): sign in with a key, find the order that waits for approval,
approve it through the form made from its wait's type, watch it complete, read its
history. A screenshot of each page is saved under ``test-artifacts/``."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from ledgerflow.server import create_app

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "orders"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30.0

if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import serve  # noqa: E402  (examples/orders/serve.py)


def _browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return f"{path} is missing: apt-get install chromium chromium-driver"
    return None


@pytest.fixture
def browser() -> Iterator[object]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str, list[str]]]:
    url = f"sqlite:///{tmp_path / 'orders.db'}"
    secret, ids = asyncio.run(serve.prepare(url, orders=2))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        create_app(serve.engine(url)), host="127.0.0.1", port=port, log_level="warning"
    )
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not running.started:
        assert thread.is_alive(), "the server did not start"
        assert time.monotonic() < deadline, "the server did not start in time"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", secret, ids
    finally:
        running.should_exit = True
        thread.join(timeout=WAIT)


def test_an_approver_signs_in_approves_an_order_and_reads_its_history(
    browser: object, server: tuple[str, str, list[str]]
) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    driver = browser
    base, secret, ids = server
    until = WebDriverWait(driver, WAIT).until
    ARTIFACTS.mkdir(exist_ok=True)

    def click(by: str, value: str) -> None:
        """Click what ``(by, value)`` finds once it can be: the list's live refresh
        replaces its rows, so an element found a moment ago may be gone."""

        def clicked(d: WebDriver) -> bool:
            d.find_element(by, value).click()
            return True

        WebDriverWait(
            driver,
            WAIT,
            ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
        ).until(clicked)

    def snap(name: str) -> None:
        driver.save_screenshot(str(ARTIFACTS / f"ui-{name}.png"))

    # Signed out, the UI sends the user to sign in; a wrong key is refused.
    driver.get(f"{base}/ui")
    until(shown.title_contains("Sign in"))
    driver.find_element(By.ID, "key").send_keys("lfk_wrong")
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    until(shown.presence_of_element_located((By.CSS_SELECTOR, "[role=alert]")))
    driver.find_element(By.ID, "key").send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    until(shown.title_contains("Workflows"))

    # Find the order: filter by its id; it is running, waiting for approval.
    order = ids[0]
    driver.find_element(By.ID, "text").send_keys(order)
    Select(driver.find_element(By.ID, "status")).select_by_value("running")
    driver.find_element(By.CSS_SELECTOR, "form.filters button").click()
    until(shown.url_contains("status=running"))
    until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "table.list tbody tr")) == 1)
    snap("list")
    click(By.LINK_TEXT, order)
    until(shown.text_to_be_present_in_element((By.CSS_SELECTOR, "main"), "Waiting for"))
    assert "signal 'approval'" in driver.find_element(By.CSS_SELECTOR, ".summary").text

    # The form is made from the wait's type: approver (text), decision (a choice).
    form = driver.find_element(By.CSS_SELECTOR, "form[action*='/signals/approval']")
    decision = Select(form.find_element(By.NAME, "f.decision"))
    assert [o.text for o in decision.options][1:] == ["approve", "reject"]
    # Submitted without an approver: the browser's own check stops it (required).
    assert form.find_element(By.NAME, "f.approver").get_attribute("required") is not None
    form.find_element(By.NAME, "f.approver").send_keys("ana")
    decision.select_by_visible_text("approve")
    form.find_element(By.NAME, "reason").send_keys("within budget")
    snap("approval-form")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    until(shown.text_to_be_present_in_element((By.CSS_SELECTOR, ".notice"), "Signal sent"))

    # The page follows the instance (live refresh) until it completes.
    until(shown.text_to_be_present_in_element((By.CSS_SELECTOR, ".summary .status"), "completed"))
    summary = driver.find_element(By.CSS_SELECTOR, ".summary").text
    assert "placed" in summary  # the result: the order was placed
    # Its history: the approval, who sent it and why, then the steps.
    timeline = driver.find_element(By.CSS_SELECTOR, "ol.timeline").text
    assert "wf.signal" in timeline
    assert f"by key:{secret.split('_')[1]}" in timeline
    assert "“within budget”" in timeline
    assert "wf.step_done" in timeline
    assert timeline.index("wf.signal") < timeline.rindex("wf.step_done")
    snap("completed")
    # Operator buttons are gone once it completed; the other order still waits.
    assert not driver.find_elements(By.CSS_SELECTOR, "form[action*='/actions/']")
    driver.get(f"{base}/ui/workflows?status=running")
    until(shown.presence_of_element_located((By.LINK_TEXT, ids[1])))
    assert not driver.find_elements(By.LINK_TEXT, order)
