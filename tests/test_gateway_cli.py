"""`fastserve gateway` as its own process: flags and FASTSERVE_* env, serving, clean SIGTERM."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.timeout(60)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, key=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_gateway_process_serves_and_stops_on_sigterm(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "FASTSERVE_API_KEY": "secret", "FASTSERVE_SERVED_MODEL_NAME": "tiny-cli"}
    proc = subprocess.Popen([sys.executable, "-m", "fastserve.cli", "gateway", "--model", str(tiny_model_dir),
                             "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                status, body = _get(base + "/v1/models", "secret")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.05)
        assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny-cli"
        assert _get(base + "/v1/models")[0] == 401
        assert _get(base + "/health")[0] == 503  # nothing behind it on its own memory bus
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    logs = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    events = [line["event"] for line in logs]
    assert "gateway.started" in events and "gateway.stopped" in events
    assert all(line["service"] == "gateway" for line in logs)


def test_bad_config_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastserve.cli", "gateway", "--model", str(tmp_path),
                           "--port", "1"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "has no tokenizer.json" in proc.stderr
