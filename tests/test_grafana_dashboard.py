"""deploy/grafana/fastserve-dashboard.json queries only metrics the gateway exports."""
import json
import re
from pathlib import Path

from fastserve.common.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "fastserve-dashboard.json"


def test_every_panel_queries_an_exported_metric():
    dash = json.loads(DASHBOARD.read_text())
    exported = set()
    for family in Metrics("m").registry.collect():
        exported.update(sample.name for sample in family.samples)
        exported.update({family.name, f"{family.name}_bucket", f"{family.name}_total"})
    queried = {name for panel in dash["panels"] for target in panel["targets"]
               for name in re.findall(r"fastserve:[a-z0-9_]+", target["expr"])}
    assert queried and queried <= exported, queried - exported
    documented = (DASHBOARD.parents[2] / "docs" / "services.md").read_text()
    families = {n.removesuffix("_bucket").removesuffix("_total") for n in queried}
    assert all(f in documented for f in families), [f for f in families if f not in documented]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
