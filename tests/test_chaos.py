"""The short chaos run (benchmarks/chaos.py --short): the four-process
deployment with two gateways on a RabbitMQ node of its own, SIGKILL of each
process and a broker stop, each restarted. No request may end with text
different from an undisturbed run, none may hang; after each restart requests
complete again. Errors are allowed only for requests whose HTTP connection was
to the gateway that was killed, and 503s (nothing accepted) while the broker is down."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from fastserve.common.testing import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_chaos_run_loses_and_corrupts_nothing(tmp_path):
    if not (shutil.which("rabbitmq-server") or Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()):
        skip_unless_ci("rabbitmq-server is not installed: the chaos run starts a broker node of its own")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import chaos
    finally:
        sys.path.pop(0)
    out = tmp_path / "chaos.json"
    code = chaos.main(["--short", "--out", str(out)])
    import json

    report = json.loads(out.read_text())
    rows = report["faults"]
    assert set(rows) == {"warmup", *chaos.FAULTS}
    for fault, row in rows.items():
        assert row["different"] == 0 and row["hung"] == 0, (fault, row)
        assert row["identical"] > 0, (fault, row)
        if fault != "warmup":
            assert "recovery_s" in row, (fault, row)  # a request sent after the restart completed
        # An error is a connection to the killed gateway, broken mid-stream (unavoidable for that
        # client), or, while the broker is down, a 503 (nothing was accepted).
        allowed = ("connection lost", "stream ended without") + (("HTTP 503",) if fault == "broker" else ())
        for reason in row["error_reasons"]:
            assert reason.startswith(allowed), (fault, row)
    assert code == 0
    assert all(c == 0 for c in report["exit_codes"].values()), report["exit_codes"]
