"""`huiying demo` for real (its own four processes, SQLite, a moved clock), then the board in a real
headless Chromium (Debian's chromium and chromium-driver): the pages load after a staff login, the
figures on them are the API's, the browser logs no errors, and a screenshot is saved."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import wait_for
from tests.support import free_port

pytestmark = pytest.mark.e2e
HUIYING = [sys.executable, "-m", "huiying.cli"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots"


def chromium_driver():
    """A headless Chromium, or a skip saying what is missing (a failure where CI must have it)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        message = "the board's browser test needs Debian's chromium and chromium-driver (apt-get install)"
        if os.environ.get("HUIYING_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture
def demo(rabbit_config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "HUIYING_SMTP_HOST")}
    env.update(AMQP_URI=rabbit_config["AMQP_URI"], HUIYING_VAR_DIR=str(tmp_path / "var"))
    for service in ("intake", "routing", "supervision", "notify"):
        env[f"HUIYING_{service.upper()}_ADDRESS"] = f"127.0.0.1:{free_port()}"
    try:
        run = subprocess.run(HUIYING + ["demo", "--json"], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        yield json.loads(run.stdout), run.stderr
    finally:
        subprocess.run(HUIYING + ["demo", "--stop"], env=env, capture_output=True, timeout=120)


def test_the_demo_replays_the_scenario_and_the_board_shows_it(demo):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    summary, narration = demo
    # What the scenario promises, each at least once.
    assert summary["cases"] == 76 and summary["referrals"] > 76
    assert summary["steps"]["return"] >= 2 and summary["steps"]["extension"] >= 1 and summary["steps"]["reply"] > 0
    assert summary["ratings"]["不满意"] >= 3
    for action in ("remind_department", "add_to_agenda", "open_joint_supervision", "trigger_special_inspection"):
        assert summary["decisions"].get(action, 0) >= 1, (action, summary)
    assert {"agenda", "joint_supervision", "special_inspection"} <= set(summary["agenda"])
    assert summary["notifications"].get("sent", 0) > 0
    assert "海吉星" in narration

    board, key = summary["board"], summary["staff_key"]
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {key}"

    def figures():
        overview = api.get(board.replace("/board/", "/api/v1/board/overview")).json()
        overview.pop("now")  # when it was counted
        rates = api.get(board.replace("/board/", "/api/v1/reports/departments")).json()["departments"]
        agenda = api.get(board.replace("/board/", "/api/v1/agenda")).json()["items"]
        return overview, rates, agenda

    def unchanged_for_two_seconds():
        # The demo waits for 1.5 s of empty queues; supervision's evaluation after events may
        # still be gathering then, and the page is read seconds after the API.
        before = figures()
        time.sleep(2)
        return before if figures() == before else None

    overview, rates, agenda = wait_for(unchanged_for_two_seconds, timeout=30, interval=0)

    browser = chromium_driver()
    try:
        browser.get(board)
        assert "/board/login" in browser.current_url
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.ID, "sign-in").click()
        # click() may return before the form's POST has navigated (a CI run read the login URL)
        try:
            WebDriverWait(browser, 15).until(lambda b: b.current_url.rstrip("/").endswith("/board"))
        except TimeoutException:
            page = browser.find_element(By.TAG_NAME, "body").text[:300]
            raise AssertionError(f"still at {browser.current_url}: {page}") from None

        figure = lambda element_id: int(browser.find_element(By.ID, element_id).text)  # noqa: E731
        assert figure("cases-received") == overview["cases_received"]
        assert figure("cases-open") == overview["cases_open"]
        assert figure("referrals-overdue") == overview["referrals_overdue"] > 0
        bars = browser.find_elements(By.CSS_SELECTOR, "#chart-weekly rect[data-series='overdue']")
        assert [int(b.get_attribute("data-value")) for b in bars] == [w["overdue"] for w in overview["weeks"]]
        streets = browser.find_elements(By.CSS_SELECTOR, "#chart-by_street rect")
        assert {b.get_attribute("data-code"): int(b.get_attribute("data-value")) for b in streets} == {
            s["name"]: s["cases"] for s in overview["by_street"][:12]
        }
        groups = browser.find_elements(By.CSS_SELECTOR, "#overdue tr.group")
        assert {g.get_attribute("data-department"): int(g.get_attribute("data-overdue")) for g in groups} == {
            d["department"]: d["overdue"] for d in overview["overdue_by_department"]
        }
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "board-overview.png"))

        browser.find_element(By.ID, "nav-departments").click()
        WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.ID, "rates"))
        for row in rates:
            cells = browser.find_elements(By.CSS_SELECTOR, f"#rates tr[data-department='{row['department']}'] td")
            assert int(cells[1].text) == row["referred"]
            shown = [c.text.strip() for c in cells[2:6]]
            expected = [
                "—" if row[k] is None else f"{row[k] * 100:.1f}%"
                for k in ("response_rate", "resolution_rate", "satisfaction_rate", "on_time_rate")
            ]
            assert shown == expected, row
        browser.save_screenshot(str(SCREENSHOTS / "board-departments.png"))

        browser.find_element(By.ID, "nav-agenda").click()
        WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.ID, "agenda"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#agenda tbody tr")
        assert len(rows) == len(agenda)
        inspection = next(i for i in agenda if i["kind"] == "special_inspection")
        row = browser.find_element(By.CSS_SELECTOR, f"#agenda tr[data-item='{inspection['id']}']")
        assert inspection["rule_id"] in row.text
        row.find_element(By.CSS_SELECTOR, "a.case").click()
        WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.ID, "timeline"))
        assert browser.find_elements(By.CSS_SELECTOR, "#timeline li")
        browser.save_screenshot(str(SCREENSHOTS / "board-case.png"))

        browser.find_element(By.ID, "language").click()
        WebDriverWait(browser, 15).until(lambda b: "Whole-process record" in b.page_source)

        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()
    assert (SCREENSHOTS / "board-overview.png").stat().st_size > 10_000
