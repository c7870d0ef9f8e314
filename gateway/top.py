"""`fastserve top`: the dashboard's essentials in a terminal, for operators on
SSH. Reads a gateway's /dashboard/stream (gateway/dashboard.py) and redraws
in place: per replica the MLFQ levels with a mark per listed job, KV use,
per-second rates and the iteration split; the recent requests' latencies."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"running": "bold green", "in_flight": "green", "waiting": "grey50", "moving": "magenta",
               "host": "yellow"}
MAX_MARKS = 60  # per level, on one line


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f}s" if s >= 1 else f"{s * 1e3:.1f}ms"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}ms"


def _bar(used: int, total: int, width: int = 24) -> Text:
    filled = round(width * used / total) if total else 0
    return Text("█" * filled, style="green") + Text("░" * (width - filled), style="grey30")


def render_replica(r: dict) -> Panel:
    levels = Table(box=None, padding=(0, 1), show_edge=False)
    for col, kw in (("level", {}), ("quantum", {"justify": "right"}), ("jobs", {"justify": "right"}),
                    ("marks (running, in flight, waiting, moving, on host)", {})):
        levels.add_column(col, **kw)
    for lv in r["levels"]:
        marks = Text()
        for job in lv["jobs"][:MAX_MARKS]:
            marks.append("■", style=STATE_STYLE.get(job["state"], ""))
        hidden = lv["more"] + max(len(lv["jobs"]) - MAX_MARKS, 0)
        if hidden:
            marks.append(f" +{hidden}", style="grey50")
        levels.add_row(f"Q{lv['level']}", "∞" if lv["quantum"] is None else _seconds(lv["quantum"]),
                       str(lv["num_jobs"]), marks)
    kv, rates, loop = r["kv"], r["rates"], r["loop"]
    side = Text.assemble(
        "GPU KV  ", _bar(kv["gpu_used"], kv["gpu_total"]), f" {kv['gpu_used']}/{kv['gpu_total']}\n",
        "host KV ", _bar(kv["host_used"], kv["host_total"]), f" {kv['host_used']}/{kv['host_total']}\n",
        f"copies in flight: {kv['offloading']} to host, {kv['uploading']} to GPU\n",
        "per second: " + "  ".join(f"{k} {rates[k]:.1f}" for k in (
            "admitted", "finished", "tokens", "preemptions", "demotions", "promotions", "offloads", "uploads")),
        f"\niteration {_ms(loop['iteration_ms'])}: schedule {_ms(loop['schedule_ms'])}  step {_ms(loop['step_ms'])}"
        f"  bus {_ms(loop['bus_ms'])}")
    title = (f"replica {r['replica']} · {r['instance_id']} · {r['policy']} / KV {r['kv_policy']} · "
             f"iteration {r['iteration']} · {r['num_jobs']} jobs, {r['num_running']} running")
    return Panel(Group(levels, side), title=title, title_align="left")


def render(view: dict, status: str = "live") -> Group:
    parts: list = [Text(f"fastserve top · {view['model']} · gateway {view['gateway']} · {status} · "
                        f"{time.strftime('%H:%M:%S')}", style="bold")]
    if not view["replicas"]:
        parts.append(Text("no scheduler has reported yet", style="grey50"))
    parts += [render_replica(r) for r in view["replicas"]]
    lat = view["latency"]

    def dist(d: dict) -> str:
        return f"p50 {_seconds(d['p50'])}  p90 {_seconds(d['p90'])}  p99 {_seconds(d['p99'])}" if d["count"] else "-"

    slo = f"  (SLO {_seconds(view['replicas'][0]['slo'])})" if view["replicas"] else ""
    parts.append(Text(f"recent requests ({lat['requests']}): TTFT {dist(lat['ttft'])} · "
                      f"normalized latency {dist(lat['norm_latency'])} per token{slo}"))
    return Group(*parts)


def _events(url: str, api_key: str | None):
    """The views of a gateway's /dashboard/stream, as they come."""
    req = urllib.request.Request(url.rstrip("/") + "/dashboard/stream")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        for line in resp:
            if line.startswith(b"data: "):
                yield json.loads(line[6:])


def run(url: str, api_key: str | None) -> int:
    last: dict | None = None
    with Live(Text(f"connecting to {url} ..."), screen=True, auto_refresh=False) as live:
        try:
            while True:
                try:
                    for view in _events(url, api_key):
                        last = view
                        live.update(render(view), refresh=True)
                    status = "the gateway closed the stream"
                except urllib.error.HTTPError as exc:
                    if exc.code == 401:
                        live.stop()
                        print(f"fastserve top: {url} wants an API key (--api-key or FASTSERVE_API_KEY)")
                        return 2
                    status = f"HTTP {exc.code}"
                except (OSError, ValueError) as exc:
                    status = f"{type(exc).__name__}: {exc}"
                live.update(render(last, f"reconnecting ({status})") if last else
                            Text(f"reconnecting to {url}: {status}"), refresh=True)
                time.sleep(1.0)
        except KeyboardInterrupt:
            return 0

