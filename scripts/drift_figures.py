"""Drift's false- and true-alarm figures (issue 21): PSI of the scores and of each input feature,
through the real summaries (adapters/batch.py, adapters/inputs.py) and the real score monitor.

    PYTHONPATH=. python3 scripts/drift_figures.py

- periodic: 200,000 rows made of one 20-row block repeated, against the same block's 2,000 rows
  (one distribution: must not be flagged);
- shifted: the same, with the scores moved by +0.3 and feature y by +1.5 (must be flagged, y
  named and no other feature);
- realtime: 200 reference rows, then 200 rows of the same population, then 200 with y moved by
  +2 (the rows the front door hands over, through `ScoreMonitor.observe`).
"""
from __future__ import annotations

import json
import math
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters import inputs  # noqa: E402
from adapters.batch import score_summary  # noqa: E402
from adapters.manifest import parse_manifest  # noqa: E402
from control.monitor import ScoreMonitor  # noqa: E402
from control.runtime.base import ProxyResponse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEATURES = [{"name": "x", "type": "number"}, {"name": "y", "type": "number"}, {"name": "region", "type": "string"}]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="drift-figures-"))
    manifest = parse_manifest((ROOT / "tests/fixtures/monitor/drift-batch/model.yaml").read_text(), check_files=False)
    r = random.Random(7)
    scores = [round(r.random(), 4) for _ in range(20)]
    rows = [(r.gauss(0, 1), r.gauss(0, 1), "south" if i % 4 == 0 else "north") for i in range(20)]

    def job(name: str, s: list[float], data: list[tuple]) -> dict:
        (tmp / f"{name}.scores.csv").write_text("p\n" + "\n".join(map(repr, s)) + "\n")
        (tmp / f"{name}.csv").write_text("x,y,region\n" + "".join(f"{x!r},{y!r},{g}\n" for x, y, g in data))
        out = score_summary(tmp / f"{name}.scores.csv", manifest)
        out["inputs"] = inputs.summarize_file(FEATURES, tmp / f"{name}.csv")
        return out

    reference = job("reference", scores * 100, rows * 100)
    cases = {"periodic (one distribution)": job("periodic", scores * 10_000, rows * 10_000),
             "shifted (scores +0.3, y +1.5)": job("shifted", [min(1.0, s + 0.3) for s in scores] * 10_000,
                                                  [(x, y + 1.5, g) for x, y, g in rows] * 10_000)}
    for label, summary in cases.items():
        mon = ScoreMonitor(tmp / label[:8], start=False, manifest_of=lambda n, v: {"monitoring": {"reference_size": 1000}})
        mon.observe_job("m", "1", reference, job="reference")
        mon.observe_job("m", "1", summary, job="recent")
        v = mon.report("m", batch=False)["versions"]["1"]
        print(json.dumps({"batch": label, "score_psi": v["drift"]["psi"], "drifted": v["drifted"],
                          "feature_psi": {f: d["psi"] for f, d in v["inputs"]["features"].items()},
                          "features_drifted": v["inputs"]["drifted"]}))

    feats = FEATURES + [{"name": "member", "type": "boolean"}]
    mon = ScoreMonitor(tmp / "realtime", start=False, manifest_of=lambda n, v: {
        "features": feats, "monitoring": {"reference_size": 200, "window": 200}})

    def send(seed: int, y_shift: float = 0.0) -> None:
        g = random.Random(seed)
        batch = [{"x": g.gauss(0, 1), "y": g.gauss(y_shift, 1), "region": "south" if g.random() < 0.3 else "north",
                  "member": g.random() < 0.5} for _ in range(200)]
        body = json.dumps({"model": "m", "version": "1", "scores": [1 / (1 + math.exp(-b["x"])) for b in batch]})
        mon.observe("m", ProxyResponse(status=200, headers={}, body=body.encode()),
                    ("application/json", json.dumps({"rows": batch}).encode()))

    send(1)
    for label, seed, shift in (("same population", 2, 0.0), ("y +2", 3, 2.0)):
        send(seed, shift)
        v = mon.report("m", batch=False)["versions"]["1"]
        print(json.dumps({"realtime": label, "score_psi": v["drift"]["psi"], "drifted": v["drifted"],
                          "feature_psi": {f: d["psi"] for f, d in v["inputs"]["features"].items()},
                          "features_drifted": v["inputs"]["drifted"]}))


if __name__ == "__main__":
    main()
