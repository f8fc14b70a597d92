"""The watch page in a real browser: headless Chromium from the system's packages, driven by Selenium
through the packaged chromedriver, against a server that has scored traffic.

Set FIRM_WATCH_SCREENSHOT to a path to keep a copy of the screenshot (the docs' picture is made so).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.support import b64, running_server

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SIM = ("--engine", "bench.sim_engine:SimulatedEngine", "--edit-model", "sim", "--gen-model", "sim")


def _chromium() -> tuple[str, str] | None:
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


found = _chromium()
pytestmark = pytest.mark.skipif(
    found is None,
    reason="no Chromium and chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    assert found is not None
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1700")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(found[1]))
    try:
        yield driver
    finally:
        driver.quit()


def _traffic(url: str) -> int:
    """Scored edits (one of them the source returned unchanged, which the simulated judge scores 4) and a
    generated group; returns how many edits were scored."""
    items = [
        {"id": "unchanged-edit", "source": b64("blue"), "edited": b64("blue"), "instruction": "Make the square red."},
        {"id": "recoloured", "source": b64("green"), "edited": b64("orange"), "instruction": "Paint it orange."},
        {"id": "yellow", "source": b64("purple"), "edited": b64("yellow"), "instruction": "Make the square yellow."},
    ]
    assert httpx.post(f"{url}/v1/edit/score", json={"items": items}, timeout=60).status_code == 200
    group = {"prompt": "a red square on grey", "images": [b64("red"), b64("orange"), b64("blue")]}
    assert httpx.post(f"{url}/v1/gen/score_group", json=group, timeout=60).status_code == 200
    return len(items)


def _wait(driver: webdriver.Chrome, what: str, script: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not driver.execute_script(script):
        if time.monotonic() > deadline:
            pytest.fail(f"the page never showed {what}")
        time.sleep(0.1)


def test_the_watch_page_shows_scored_items_and_flags_an_unchanged_edit(
    browser: webdriver.Chrome, cache_dir: Path, tmp_path: Path
) -> None:
    env = {"FIRM_SIM_A": "0", "FIRM_SIM_B": "0"}
    with running_server(cache_dir, *SIM, "--watch-baseline-s", "600", tiny=False, env=env) as url:
        edits = _traffic(url)
        browser.get(f"{url}/watch")
        _wait(browser, "its data", "return document.body.dataset.loaded === 'yes'")
        _wait(browser, "the recent items", "return document.querySelectorAll('#samples .sample').length >= 6")

        # histograms: the edit critic's execution window holds every scored edit, all at 4
        chart = browser.find_element(By.CSS_SELECTOR, "svg.histogram[data-task=edit][data-dimension=execution]")
        assert chart.get_attribute("data-count") == str(edits)
        bars = chart.find_elements(By.CSS_SELECTOR, "rect.bar-window")
        assert [bar.get_attribute("data-n") for bar in bars] == ["0", "0", "0", str(edits), "0"]
        assert browser.find_elements(By.CSS_SELECTOR, "svg.histogram[data-task=gen]")
        legend = browser.find_element(By.CSS_SELECTOR, ".legend[data-task=edit]").text
        assert "baseline (first 10 min, still filling)" in legend, legend  # --watch-baseline-s, as set

        # recent items: the scored ones, with thumbnails; the unchanged edit is flagged, and alone
        samples = browser.find_elements(By.CSS_SELECTOR, "#samples .sample")
        assert len(samples) == edits + 3
        assert all(s.find_elements(By.TAG_NAME, "img") for s in samples)
        flagged = browser.find_elements(By.CSS_SELECTOR, "#samples .sample.flagged")
        assert len(flagged) == 1 and "unchanged-edit" in flagged[0].text and "UNCHANGED, HIGH SCORE" in flagged[0].text
        browser.find_element(By.CSS_SELECTOR, "#filters button[data-tag=flagged]").click()
        _wait(browser, "the flagged filter", "return document.querySelectorAll('#samples .sample').length === 1")

        # nothing was requested from anywhere but the server (images are inline data)
        sent = [
            message["params"]["request"]["url"]
            for entry in browser.get_log("performance")
            for message in [json.loads(entry["message"])["message"]]
            if message["method"] == "Network.requestWillBeSent"
        ]
        assert any(u.startswith(f"{url}/watch/data") for u in sent)
        assert all(u.startswith(f"{url}/") or u.startswith("data:") for u in sent), sent
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(name.startswith(f"{url}/") or name.startswith("data:") for name in resources), resources

        browser.find_element(By.CSS_SELECTOR, "#filters button[data-tag='']").click()
        _wait(browser, "every item again", "return document.querySelectorAll('#samples .sample').length >= 6")
        shot = tmp_path / "watch.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        if keep := os.environ.get("FIRM_WATCH_SCREENSHOT"):
            shutil.copyfile(shot, keep)
