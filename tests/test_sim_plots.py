"""`fastserve sim --out`: the JSON and, beside it, the report's plots (latency
and TTFT against the rate per policy, jobs per queue over one run); without
matplotlib the JSON is still written and the message says how to get plots."""
import json
import sys


from fastserve.cli import main

ARGS = ["sim", "--policy", "sj-mlfq,fcfs", "--workload", "alpaca", "--rate", "40", "--num-jobs", "120",
        "--sweep-rates"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_writes_json_and_plots_beside_it(tmp_path):
    out = tmp_path / "sweep.json"
    assert main([*ARGS, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"sj-mlfq", "fcfs"}
    assert report["sj-mlfq"]["max_rate_at_slo"] > 0 and len(report["fcfs"]["sweep_points"]) >= 3
    for name in ("sweep.png", "sweep.occupancy.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 20_000, name


def test_without_matplotlib_the_json_is_written_and_the_message_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "sweep.json"
    assert main([*ARGS, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sj-mlfq"]["max_rate_at_slo"] > 0
    assert not list(tmp_path.glob("*.png"))
    assert "pip install 'fastserve[plot]'" in capsys.readouterr().err
    assert main([*ARGS, "--plot", str(tmp_path / "x.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err
