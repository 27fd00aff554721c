"""What every benchmark and scenario shares: the example models, valid rows for them, bench copies.

Nothing here imports locust (the locustfile runs in its own process) or starts anything.
"""
from __future__ import annotations

import csv
import math
import shutil
import statistics
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from adapters.manifest import Manifest, load_manifest

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"


def examples(models_dir: Path = MODELS_DIR) -> dict[tuple[str, str], Manifest]:
    """The example models by (kind, language): ('realtime', 'python') -> Manifest, …"""
    out: dict[tuple[str, str], Manifest] = {}
    for manifest_file in sorted(Path(models_dir).glob("*/model.yaml")):
        m = load_manifest(manifest_file)
        out.setdefault((m.kind, m.language), m)
    return out


def typed(value: str, type_: str) -> Any:
    """A CSV cell as the JSON value the feature's type calls for; '' is None (missing)."""
    if value == "":
        return None
    if type_ == "number":
        return float(value)
    if type_ == "integer":
        return int(float(value))
    if type_ == "boolean":
        return value.strip().lower() in ("true", "t", "yes", "y", "1")
    return value


def sample_rows(manifest: Manifest) -> list[dict]:
    """The manifest's sample.csv as JSON rows, passthrough columns included (None for empty
    optional cells, dropped)."""
    types = {f.name: f.type for f in [*manifest.features, *manifest.passthrough]}
    with open(manifest.sample_path, newline="", encoding="utf-8") as f:
        rows = []
        for rec in csv.DictReader(f):
            row = {k: typed(v, types[k]) for k, v in rec.items() if k in types}
            rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def sample_lines(manifest: Manifest) -> tuple[str, list[str]]:
    """(header line, data lines) of sample.csv, newline-terminated: the bricks of big datasets."""
    lines = Path(manifest.sample_path).read_text(encoding="utf-8").splitlines(keepends=True)
    lines = [ln if ln.endswith("\n") else ln + "\n" for ln in lines if ln.strip()]
    return lines[0], lines[1:]


def write_dataset(manifest: Manifest, path: Path, rows: int) -> Path:
    """A CSV of `rows` valid rows for `manifest`, made by cycling its sample rows; written in blocks."""
    header, body = sample_lines(manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = "".join(body)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(header)
        full, rest = divmod(rows, len(body))
        chunk = block * max(1, 10_000 // len(body))
        per_chunk = max(1, 10_000 // len(body))
        for _ in range(full // per_chunk):
            f.write(chunk)
        f.write(block * (full % per_chunk))
        f.write("".join(body[:rest]))
    return path


def wait_http(url: str, proc, *, timeout: float = 90, log: Optional[Path] = None) -> None:
    """Poll `url` until it answers 200; fail if `proc` (a Popen) exits or `timeout` passes,
    with the tail of its `log` if given."""
    import time

    import requests

    def tail() -> str:
        return ":\n" + log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited {proc.returncode}{tail()}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not up after {timeout}s{tail()}")


def bench_copy(manifest: Manifest, dest_root: Path, *, suffix: str, scaling: Optional[dict] = None) -> Path:
    """Copy the model folder under `dest_root` as `{name}-{suffix}` with `scaling` merged in.

    The benchmarks need a model that returns to zero quickly (idle_timeout of a second) without
    changing the example itself, so they deploy a copy under a benchmark-only name.
    """
    name = f"{manifest.name}-{suffix}"[:63].rstrip("-")
    dest = Path(dest_root) / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(manifest.folder, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".modelplane"))
    data = yaml.safe_load((dest / "model.yaml").read_text(encoding="utf-8"))
    data["name"] = name
    if scaling:
        data["scaling"] = {**(data.get("scaling") or {}), **scaling}
    (dest / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return dest


# -- statistics -----------------------------------------------------------------------

def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank-interpolated percentile (q in 0..100); NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else math.nan
