"""The benchmark's output: figures with target and baseline, a printed table, report.json and PNG charts."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class Figure:
    """One measured number held against a DESIGN.md target and a baseline measured in the same run.

    `target` is compared with `op` (`<=`, `>=` or `==`); `ratio` is value / baseline unless the figure
    says otherwise (`ratio_of`), and `passed` is None for figures without a target.
    """

    id: str
    title: str
    unit: str
    value: float
    baseline: float
    baseline_label: str
    target: Optional[float] = None
    op: str = "<="
    target_label: str = ""
    ratio: Optional[float] = None
    ratio_of: str = "value / baseline"
    samples: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.ratio is None and _finite(self.value) and _finite(self.baseline) and self.baseline:
            self.ratio = self.value / self.baseline
        if not self.target_label and self.target is not None:
            sign = {"<=": "≤", ">=": "≥"}.get(self.op, self.op)
            self.target_label = f"{sign} {_fmt(self.target)} {self.unit}".strip()

    @property
    def passed(self) -> Optional[bool]:
        if self.target is None:
            return None
        if not _finite(self.value):
            return False
        if self.op == "==":
            return self.value == self.target
        if self.op == ">=":
            return self.value >= self.target
        return self.value <= self.target

    def to_json(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        return _clean(out)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _clean(obj: Any) -> Any:
    """JSON without NaN/inf (they become null: 'not measured' must be visible, not a parse error)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def table(figures: list[Figure]) -> str:
    """The figures as a Markdown table (printed, and pasted into docs/BENCHMARKS.md)."""
    rows = [("figure", "value", "target", "baseline", "ratio", "pass")]
    for f in figures:
        verdict = {True: "pass", False: "MISS", None: "—"}[f.passed]
        rows.append((f.title, f"{_fmt(f.value)} {f.unit}".strip(), f.target_label or "—",
                     f"{_fmt(f.baseline)} {f.unit} ({f.baseline_label})".strip() if f.baseline_label else _fmt(f.baseline),
                     f"{f.ratio:.2f}×" if _finite(f.ratio) else "—", verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(path: Path, *, figures: list[Figure], details: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "figures": [f.to_json() for f in figures], "details": _clean(details)}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")


# -- charts -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_chart(path: Path, latency: dict) -> Optional[Path]:
    """p50 and p99 against concurrency for each path (direct model, adapter, control route + adapter).

    `latency` = {path label: {concurrency: {"p50_ms", "p99_ms"}}}.
    """
    if not latency:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for (label, by_c), color in zip(latency.items(), colors):
        cs = sorted(int(c) for c in by_c)
        ax.plot(cs, [by_c[c]["p50_ms"] if c in by_c else by_c[str(c)]["p50_ms"] for c in cs], "-o", color=color,
                label=f"{label} p50")
        ax.plot(cs, [by_c[c]["p99_ms"] if c in by_c else by_c[str(c)]["p99_ms"] for c in cs], "--s", color=color,
                alpha=0.7, label=f"{label} p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    all_c = sorted({int(c) for by_c in latency.values() for c in by_c})
    ax.set_xticks(all_c)
    ax.set_xticklabels([str(c) for c in all_c])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency (ms), 1-row request")
    ax.set_title("Latency percentiles against concurrency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cold_start_chart(path: Path, cold: dict) -> Optional[Path]:
    """Distribution of cold starts through the plane beside the model process alone.

    `cold` = {model label: {"plane_s": [...], "alone_s": [...], "target_s": float}}.
    """
    if not cold:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    data, labels, positions = [], [], []
    pos = 1
    for label, d in cold.items():
        for kind in ("alone_s", "plane_s"):
            data.append(d.get(kind) or [math.nan])
            labels.append(f"{label}\n{'model alone → /health' if kind == 'alone_s' else 'plane: zero → first score'}")
            positions.append(pos)
            pos += 1
        if d.get("target_s"):
            ax.hlines(d["target_s"], pos - 2.4, pos - 0.6, colors="#c44e52", linestyles="dashed")
            ax.text(pos - 0.6, d["target_s"], f" target {d['target_s']:g} s", color="#c44e52", fontsize=7, va="bottom",
                    ha="right")
        pos += 0.5
    ax.boxplot(data, positions=positions, widths=0.6, showfliers=False)
    for p, values in zip(positions, data):
        ax.plot([p] * len(values), values, "o", alpha=0.6, color="#4c72b0", markersize=4)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.set_title("Cold start: scaled to zero → first score")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
