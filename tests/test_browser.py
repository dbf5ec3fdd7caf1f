"""JupyterLab opens notebook 00 in a real headless browser and shows its stored outputs.

Uses Debian's Chromium (`apt-get install chromium`) driven by Playwright; the browser is never
downloaded. The README's screenshot is made by this test:
    DMN_SAVE_SCREENSHOT=1 .venv/bin/pytest tests/test_browser.py     # -> figures/jupyterlab_00_overview.png
(otherwise the screenshot goes to pytest's temporary folder, so a test run leaves the tree clean).
"""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / "figures" / "jupyterlab_00_overview.png"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's Chromium: `sudo apt-get install chromium` (CI installs it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    port, token = _free_port(), "dmn-course-test"
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT / 'notebooks'}",
         "--allow-root", f"--ServerApp.runtime_dir={tmp_path}"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path)},
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()[-2000:])
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/00_overview.ipynb?token={token}&reset"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_notebook_00_renders_with_its_outputs(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(jupyterlab, timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            outputs = page.locator(".jp-OutputArea-output")
            # JupyterLab renders the stored outputs progressively: wait until several are in.
            page.wait_for_function("document.querySelectorAll('.jp-OutputArea-output').length >= 5",
                                   timeout=90_000)
            assert outputs.count() >= 5, "notebook 00 shows too few outputs: were they stored?"
            images = page.locator(".jp-OutputArea-output img")
            assert images.count() >= 1, "notebook 00's figures are not displayed"
            title = page.locator(".jp-MarkdownOutput h1").first.inner_text()
            assert "Overview" in title
            no_news = page.get_by_role("button", name="No")  # JupyterLab's "get news?" toast
            if no_news.count():
                no_news.first.click()
            images.first.scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            target = SCREENSHOT if os.environ.get("DMN_SAVE_SCREENSHOT") else tmp_path / SCREENSHOT.name
            page.screenshot(path=str(target))
        finally:
            browser.close()
