"""The explorer in a real browser: Chromium from the system packages driven by Selenium (their own browser
downloads are unreachable here). The `cleandift-rt explore` command serves the tiny ONNX model on a free
loopback port; the page loads two bundled photos through its file input, a click lands on the cat, and
the match the page reports must equal `cleandift_rt.match_points` on the same features, computed here by
a second Engine on the same file. A broken upload must show its message, the server must go on, and
Ctrl+C must stop it cleanly. The test takes the page's screenshot; with
CLEANDIFT_UPDATE_SCREENSHOTS=1 it replaces docs/explore.png (the README's picture), else it stays in tmp.

Skipped, with the reason, where Chromium, chromedriver or Selenium is missing
(`apt-get install chromium chromium-driver`, `pip install selenium`; .ci/run installs them when it can).
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import cleandift_rt as cd
from cleandift_rt.assets import photo_path
from cleandift_rt.features.preprocess import load_image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "explore.png"
MAX_SCREENSHOT_BYTES = 300_000
TAP = "us6"
WAIT = 60  # seconds any one step may take on a busy 2-core machine
STARTUP = 180  # seconds for the command to import torch, open the engine and read the frames there


@pytest.fixture()
def chromium() -> tuple[str, str]:
    """(browser, driver) paths; checked before the server starts, so a skip costs nothing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no system Chromium + chromedriver (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="Selenium drives the browser: pip install selenium")
    return browser, driver


@pytest.fixture()
def frames(tmp_path, photos):
    """A folder of 6 frames of the cat panning (the tracking tab's sequence)."""
    from cleandift_rt.tracking.synthetic import synthetic_video

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(synthetic_video(photos["cat"], "translation", frames=6, points=1, size=128).video):
        Image.fromarray(frame).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture()
def explorer(tiny_onnx, frames):
    """`cleandift-rt explore` on a free loopback port: (url, process, output lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "cleandift_rt.cli", "explore", "--engine", str(tiny_onnx["full"]),
                             "--video", str(frames), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines: queue.Queue = queue.Queue()
    output: list[str] = []

    def read():
        for line in proc.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    deadline, url = time.monotonic() + STARTUP, None
    while url is None:
        try:
            found = re.search(r"explorer: (http://127\.0\.0\.1:\d+/)", lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            proc.kill()
            pytest.fail(f"the explorer did not start within {STARTUP} s:\n" + "".join(output))
        url = found and found.group(1)
    try:
        yield url, proc, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)


def open_browser(browser: str, driver_path: str, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=880,900",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--hide-scrollbars", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    return driver


def save_screenshot(driver, tmp_path) -> None:
    """The page as a person sees it, palette-reduced to stay small in the repository; a test run leaves
    the committed picture alone unless asked to refresh it."""
    with Image.open(io.BytesIO(driver.get_screenshot_as_png())) as shot:
        small = shot.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    target = SCREENSHOT if os.environ.get("CLEANDIFT_UPDATE_SCREENSHOTS") == "1" else tmp_path / SCREENSHOT.name
    target.parent.mkdir(parents=True, exist_ok=True)
    small.save(target, optimize=True)
    assert target.stat().st_size < MAX_SCREENSHOT_BYTES


def test_click_heat_map_match_and_broken_upload_in_chromium(chromium, explorer, tiny_onnx, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium
    url, proc, output = explorer
    driver = open_browser(browser, driver_path, tmp_path / "profile")
    wait = WebDriverWait(driver, WAIT)
    try:
        driver.get(url)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        paths = [photo_path("cat"), photo_path("coffee")]
        driver.find_element(By.ID, "upload").send_keys("\n".join(str(p) for p in paths))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card img.pca[src^='data:image/png']")) == 2)
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert [c.find_element(By.CLASS_NAME, "name").text for c in cards] == ["cat.jpg (451 x 300)", "coffee.jpg (600 x 400)"]

        photo = cards[0].find_element(By.CLASS_NAME, "photo")
        ActionChains(driver).move_to_element_with_offset(photo, 60, -20).click().perform()  # from its centre
        target = cards[1].find_element(By.CLASS_NAME, "result")
        wait.until(lambda d: target.get_attribute("data-x"))
        heat = cards[1].find_element(By.CLASS_NAME, "heat")
        assert heat.is_displayed() and heat.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat) > 0
        assert cards[1].find_element(By.CLASS_NAME, "marker").is_displayed()
        assert "source" in cards[0].get_attribute("class")
        source = cards[0].find_element(By.CLASS_NAME, "result")
        x, y = float(source.get_attribute("data-x")), float(source.get_attribute("data-y"))
        assert 260 < x < 451 and 75 < y < 150  # right of and above the centre, where the click went
        shown = [float(target.get_attribute(k)) for k in ("data-x", "data-y", "data-similarity")]
        status = driver.find_element(By.ID, "status")
        assert float(re.search(r"answered in ([\d.]+) ms", status.text).group(1)) < 1000  # on the server
        assert float(status.get_attribute("data-roundtrip")) < 1000  # click to heat map on the page
        save_screenshot(driver, tmp_path)

        # the same match through the public API, on the same features from a second Engine on the same file
        engine = cd.Engine(tiny_onnx["full"])
        cat, coffee = (load_image(p) for p in paths)
        fa, fb = (engine.extract([im], taps=[TAP])[TAP][0] for im in (cat, coffee))
        want, score = cd.match_points(fa, [[x, y]], fb, image_size=((cat.height, cat.width), (coffee.height, coffee.width)))
        assert shown[:2] == pytest.approx(want[0].tolist(), abs=1e-3)
        assert shown[2] == pytest.approx(float(score[0]), abs=1e-5)

        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
        driver.find_element(By.ID, "upload").send_keys(str(broken))
        message = driver.find_element(By.ID, "message")
        wait.until(lambda d: "broken.jpg" in message.text)
        assert message.get_attribute("class") == "error"
        assert message.text.startswith("broken.jpg is not an image the explorer can read")
        assert "Traceback" not in driver.page_source
        assert len(driver.find_elements(By.CSS_SELECTOR, ".card")) == 2

        # the tracking tab: two points on the first frame, tracked through the 6 frames and played back
        frame = driver.find_element(By.ID, "trackimg")
        driver.execute_script("arguments[0].scrollIntoView()", frame)
        for dx, dy in ((-40, -30), (30, 20)):
            ActionChains(driver).move_to_element_with_offset(frame, dx, dy).click().perform()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#trackframe .marker.query")) == 2
        driver.find_element(By.ID, "track").click()
        wait.until(lambda d: "6 frames" in d.find_element(By.ID, "trackstatus").text)
        driver.find_element(By.ID, "play").click()
        wait.until(lambda d: d.find_element(By.ID, "trackimg").get_attribute("src").endswith("/frame/5"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#trackframe .marker.match, #trackframe .marker.hidden")) == 2
    finally:
        driver.quit()

    with urllib.request.urlopen(url + "api/state", timeout=WAIT) as r:  # the server goes on
        assert [im["name"] for im in json.load(r)["images"]] == ["cat.jpg", "coffee.jpg"]
    proc.send_signal(signal.SIGINT)  # Ctrl+C
    assert proc.wait(timeout=WAIT) == 0
    time.sleep(0.2)  # the reader thread takes the last line
    assert "explorer stopped" in "".join(output) and "Traceback" not in "".join(output)
