"""One real walk through the app: `streamlit run` in a subprocess driven by headless Chromium (Playwright)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SLOW_MS = 240_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    """The app served by `streamlit run` on a free port, with a data folder of its own."""
    port = free_port()
    env = dict(
        os.environ, VISIONS_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
    )
    env.pop("VISIONS_DATA_ROOTS", None)
    log = (tmp_path / "streamlit.log").open("wb")
    command = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port)]
    command += ["--server.address", "127.0.0.1", "--server.headless", "true"]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "streamlit.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "streamlit did not come up within two minutes"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def result_captions(page) -> list[str]:
    return (
        page.locator('[data-testid="stCaptionContainer"]')
        .filter(has_text=re.compile(r"^#\d+ · score"))
        .all_inner_texts()
    )


def wait_for_new_results(page, before: list[str]) -> list[str]:
    """Poll until the result grid shows a full set of captions different from `before`."""
    deadline = time.monotonic() + SLOW_MS / 1000
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidgetRunningIcon"]').count()
        stale = page.locator('[data-stale="true"]').count()
        now = result_captions(page)
        if now and now != before and not running and not stale:
            return now
        page.wait_for_timeout(300)
    raise AssertionError(f"the results did not change from {before}")


def test_demo_text_query_then_a_click_walks_to_new_results(app_url, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: run `bash scripts/ensure_chromium.sh` (apt-get as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1250})
            page.goto(app_url, timeout=SLOW_MS)
            page.get_by_role("button", name="Try the demo dataset").click(timeout=SLOW_MS)
            page.wait_for_url(re.compile(r"/search\?index=demo"), timeout=SLOW_MS)

            page.get_by_label("Describe what you are looking for").fill("a rocket launch into the sky")
            page.get_by_test_id("stBaseButton-secondaryFormSubmit").click()
            first = wait_for_new_results(page, [])
            page.wait_for_url(re.compile(r"[?&]q=a(\+|%20)rocket"), timeout=SLOW_MS)
            page.screenshot(path=tmp_path / "text_query.png", full_page=True)

            page.get_by_role("button", name="Explore from here").first.click()
            second = wait_for_new_results(page, first)
            page.wait_for_url(re.compile(r"[?&]item=\d+"), timeout=SLOW_MS)
            assert second != first
            shot = tmp_path / "walk.png"
            page.screenshot(path=shot, full_page=False)
            assert shot.stat().st_size > 10_000

            # The picture gallery (streamlit-image-select, in its own iframe) starts a walk with one click.
            url_before = page.url
            page.get_by_text("Index item", exact=True).click()
            gallery = page.frame_locator("iframe[title*='image_select']")
            gallery.locator(".image-box").nth(2).click(timeout=SLOW_MS)
            page.wait_for_url(lambda url: url != url_before and "item=" in url, timeout=SLOW_MS)
            third = wait_for_new_results(page, second)
            assert third != second
            if os.environ.get("VISIONS_UPDATE_SCREENSHOT") == "1":
                # Opt-in, so a test run never leaves the work tree changed.
                shutil.copyfile(shot, ROOT / "docs" / "screenshot.png")
        finally:
            browser.close()
