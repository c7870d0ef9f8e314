"""The dashboard as people see it, on a live `fastserve up` (tiny model, two
jobs per batch, a small GPU KV pool) under a bounded mix of long and short
requests: the page in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) shows jobs on more than one MLFQ level
and changing KV numbers, and leaves a screenshot as a test artifact;
`fastserve top` under tmux shows the levels and redraws.

The browser and tmux come from Debian's packages (.ci/run installs them):
under CI=true a missing one fails the test, elsewhere it is skipped with the reason."""
from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path

import pytest

from test_gateway_cli import _free_port, _get

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
KEY = "k-live"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("FASTSERVE_TEST_ARTIFACTS", "test-artifacts"))


def need(*paths: str) -> None:
    missing = [p for p in paths if not (os.path.exists(p) or shutil.which(p))]
    if missing:
        msg = f"{', '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver tmux)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


class Load:
    """Long (150 tokens) and short (6 tokens) completions, one every 150 ms,
    for at most `seconds` and `max_requests`, from a thread of its own."""

    def __init__(self, base: str, seconds: float = 150.0, max_requests: int = 600) -> None:
        self.base, self.seconds, self.max_requests = base, seconds, max_requests
        self.done = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            async def one(i: int) -> None:
                body = {"model": "tiny", "prompt": [3 + i % 500] * (24 if i % 3 else 8),
                        "max_tokens": 150 if i % 3 == 0 else 6, "ignore_eos": True}
                async with http.post(f"{self.base}/v1/completions", json=body) as r:
                    if r.status != 200:
                        self.errors.append(f"{r.status}: {await r.text()}")

            tasks, end = [], time.monotonic() + self.seconds
            for i in range(self.max_requests):
                if self.done.is_set() or time.monotonic() > end:
                    break
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(0.15)
            await asyncio.gather(*tasks)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(120)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """(base url): `fastserve up` under load."""
    port = _free_port()
    pool = tmp_path_factory.mktemp("shm")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastserve.cli", "up", "--model", str(tiny_model_dir), "--served-model-name", "tiny",
         "--port", str(port), "--api-key", KEY, "--max-batch-size", "2", "--gpu-kv-blocks", "24",
         "--policy", "sj-mlfq",  # levels to move through (the default policy orders one queue by index)
         "--host-kv-blocks", "64", "--host-kv-dir", str(pool), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if _get(base + "/health")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "fastserve up never became healthy"
        time.sleep(0.1)
    load = Load(base)
    load.thread.start()
    yield base
    load.stop()
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    assert not load.errors, load.errors[:3]


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1100"):
        options.add_argument(arg)
    # Both paths given: Selenium looks for nothing and downloads nothing.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_the_page_shows_jobs_moving_through_levels_and_kv(served):
    need(CHROMIUM, CHROMEDRIVER)
    driver = _browser()
    try:
        # The API key as a browser sends it once asked (HTTP Basic), on every request of the page.
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {
            "Authorization": "Basic " + base64.b64encode(f"viewer:{KEY}".encode()).decode()}})
        driver.get(served + "/dashboard")
        levels_seen: set[str] = set()
        kv_seen: set[str] = set()
        states_seen: set[str] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (len(levels_seen) > 1 and len(kv_seen) > 2):
            marks = driver.execute_script(
                "return Array.from(document.querySelectorAll('.mark[data-level]:not(.gone)'))"
                ".map(m => [m.dataset.level, m.dataset.state])")
            levels_seen.update(level for level, _ in marks)
            states_seen.update(state for _, state in marks)
            kv_seen.update(driver.execute_script(
                "return Array.from(document.querySelectorAll('.kv-gpu')).map(e => e.textContent)"))
            time.sleep(0.3)
        status = driver.find_element("id", "status").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert status == "live"
    assert len(levels_seen) > 1, f"jobs seen on levels {levels_seen} only"
    assert len(kv_seen - {""}) > 2, f"GPU KV stayed at {kv_seen}"
    assert "running" in states_seen
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_in_tmux_shows_the_levels_and_redraws(served):
    need("tmux")
    socket = f"fastserve-test-{os.getpid()}"  # a tmux server of our own
    tmux = ["tmux", "-L", socket]
    subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "160", "-y", "60",
                    f"{sys.executable} -m fastserve.cli top --url {served} --api-key {KEY}"], check=True)
    try:
        screens: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(set(screens)) < 3:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True,
                                    check=True).stdout
            if "Q0" in screen:
                screens.append(screen)
            time.sleep(0.5)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    assert screens, "fastserve top never showed the levels"
    last = screens[-1]
    for text in ("Q0", "Q1", "GPU KV", "per second", "iteration", "replica default"):
        assert text in last, (text, last)
    assert len(set(screens)) >= 3, "the screen did not redraw"
