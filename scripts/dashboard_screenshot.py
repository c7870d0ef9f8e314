"""Makes docs/dashboard.png: `fastserve up --max-batch-size 2` (a tiny random
model), long requests and, a second later, short ones between them; the screenshot is taken when
the page shows a short job running in Q0 or Q1 while long jobs that have
sunk to Q3 or lower wait. Needs Debian's chromium and chromium-driver.

    python scripts/dashboard_screenshot.py [--out docs/dashboard.png]
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

SHOWS_IT = r"""
const marks = Array.from(document.querySelectorAll('.mark[data-level]'));
const shortRuns = marks.some(m => m.dataset.state === 'running' && +m.dataset.level <= 1 && m.title.includes('prompt 6\n'));
const longSank = marks.filter(m => +m.dataset.level >= 3 && m.title.includes('prompt 16\n')).length >= 3;
return shortRuns && longSank;
"""


async def load(base: str, stop: threading.Event) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async def one(tokens: int, prompt: int) -> None:
            body = {"model": "tiny", "prompt": [7] * prompt, "max_tokens": tokens, "ignore_eos": True}
            async with http.post(f"{base}/v1/completions", json=body) as r:
                await r.read()

        tasks = []
        for i in range(150):  # a long job every 0.6 s, a short one every 0.3 s after the first second
            if stop.is_set():
                break
            if i % 2 == 0:
                tasks.append(asyncio.create_task(one(340, 16)))  # 356 of the 384 tokens 24 blocks hold
            if i >= 3:
                tasks.append(asyncio.create_task(one(10, 6)))
            await asyncio.sleep(0.3)
        await asyncio.gather(*tasks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/dashboard.png")
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from fastserve.gpu_worker.model_maker import make_model

    model = make_model(Path(tempfile.mkdtemp()) / "tiny", preset="tiny", seed=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fastserve.cli", "up", "--model", str(model),
                               "--served-model-name", "tiny", "--port", str(port), "--max-batch-size", "2",
                               "--gpu-kv-blocks", "24", "--host-kv-blocks", "64", "--log-level", "WARNING"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,980"):
        options.add_argument(arg)
    stop = threading.Event()
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(base + "/health").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        driver.get(base + "/dashboard")
        # A still picture: marks jump to their lanes instead of gliding (the DOM is checked, not the pixels).
        driver.execute_script("const s = document.createElement('style');"
                              "s.textContent = '.mark { transition: none !important; }'; document.head.append(s);")
        worker = threading.Thread(target=lambda: asyncio.run(load(base, stop)))
        worker.start()
        deadline = time.monotonic() + 60
        found = False
        while time.monotonic() < deadline and not found:
            if driver.execute_script(SHOWS_IT):
                driver.save_screenshot(args.out)
                found = driver.execute_script(SHOWS_IT)  # still so once the picture is taken
            time.sleep(0.05)
        driver.quit()
        stop.set()
        worker.join()
    finally:
        server.terminate()
        server.wait(30)
    print(f"{args.out}: {'a short job runs ahead of long ones that sank' if found else 'NOT the wanted moment'}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
