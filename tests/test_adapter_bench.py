"""The adapter bench runs end to end and reports each issue-11 figure beside its same-run baseline
(tiny sample sizes: this checks the harness, not the figures)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_adapter_bench_reports_five_figures_with_baselines(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "loadtest.adapter_bench", "--requests", "60", "--requests-100", "30",
                           "--start-runs", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for tag in ("[1] added p50, 1 row", "[2] throughput at 8 clients", "[3] added p50, 100 rows",
                "[4] adapter idle RSS", "[5] start to ready"):
        assert tag in proc.stdout, proc.stdout
    report = json.loads(out.read_text())
    one, eight = report["results"]
    assert one["concurrency"] == 1 and eight["concurrency"] == 8 and one["rows_per_request"] == 1
    assert report["rows_100"]["rows_per_request"] == 100
    for r in (one, eight, report["rows_100"]):
        assert r["direct_p50_ms"] > 0 and r["adapter_p50_ms"] > 0 and r["direct_rps"] > 0 and r["adapter_rps"] > 0
    assert 5 < report["rss"]["adapter_idle_rss_mib"] < 1000 and report["rss"]["model_idle_rss_mib"] > 5
    start = report["start"]
    assert 0 < start["bare_interpreter_s"] and 0 < start["model_alone_start_to_ready_s"] < start["adapter_start_to_ready_s"]
