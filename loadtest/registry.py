"""Registers many models cheaply for the listing benchmark: the local runtime's own `deploy`, on a state dir.

Every model is a minimal but valid manifest (one feature, never started), so what is measured
afterwards is the control service listing N registered models, not N running ones.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

MANIFEST = """\
name: {name}
version: 1.0.0
kind: realtime
language: python
description: listing benchmark filler {i}
command: [python3, -c, "pass"]
features:
  - {{name: x, type: number}}
scaling: {{min: 0, max: 1, target_concurrency: 8, idle_timeout: 60s}}
"""


def filler_text(i: int) -> str:
    """The manifest of filler model `i`."""
    return MANIFEST.format(name=f"filler-{i:05d}", i=i)


def _deploy_range(state_dir: str, start: int, stop: int, text_of: Callable[[int], str] = filler_text) -> int:
    import yaml

    from adapters.manifest import Manifest
    from control.runtime.local import LocalRuntime
    from control.settings import Settings

    settings = Settings(state_dir=Path(state_dir), models_dir=Path(state_dir) / "no-models")
    runtime = LocalRuntime(settings)
    try:
        with tempfile.TemporaryDirectory(prefix="mp-filler-") as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            for i in range(start, stop):
                text = text_of(i)
                (folder / "model.yaml").write_text(text, encoding="utf-8")
                # The store parses the frozen copy's model.yaml itself; validating the dict here
                # (not parsing the YAML twice) halves the cost of registering 10,000 models.
                manifest = Manifest.model_validate(yaml.safe_load(text))
                manifest._folder = folder
                manifest._file = folder / "model.yaml"
                # a catalog of models that never run: registered in the store, not deploy-checked
                # (a deploy starts each new version once to score its sample)
                runtime.store.add(manifest, make_live=True)
    finally:
        runtime.close()
    return stop - start


def populate(state_dir: Path, count: int, *, workers: int | None = None,
             text_of: Callable[[int], str] = filler_text) -> int:
    """Deploy `count` models into `state_dir`, model `i` with the manifest `text_of(i)` (a
    module-level function: the workers are processes); returns `count`.

    Worker processes each deploy into a state dir of their own, and the finished model
    folders are then moved into `state_dir/models/`: a runtime starting on a shared state dir
    clears unfinished deploys it finds there, which would include another worker's deploy in
    flight. Model folders hold no absolute paths, so they move as they are.
    """
    state_dir = Path(state_dir)
    (state_dir / "models").mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    step = -(-count // workers)
    ranges = [(i, min(i + step, count)) for i in range(0, count, step)]
    if len(ranges) == 1:
        return _deploy_range(str(state_dir), *ranges[0], text_of)
    parts = [state_dir / f".populate-{k}" for k in range(len(ranges))]
    with ProcessPoolExecutor(max_workers=len(ranges)) as pool:
        done = sum(pool.map(_deploy_range, [str(p) for p in parts], [a for a, _ in ranges],
                            [b for _, b in ranges], [text_of] * len(ranges)))
    for part in parts:
        for folder in (part / "models").iterdir():
            if not folder.name.startswith("."):
                os.replace(folder, state_dir / "models" / folder.name)
        shutil.rmtree(part)
    return done


if __name__ == "__main__":
    print(populate(Path(sys.argv[1]), int(sys.argv[2])))
