"""`python -m loadtest` (and `modelplane bench`): every DESIGN.md number against a baseline from the same run."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

#: What the benchmark needs beyond the plane itself: the `[bench]` extra.
EXTRA = ("locust", "matplotlib")


def missing_extra() -> list[str]:
    import importlib.util

    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def main(argv: Optional[list[str]] = None) -> int:
    missing = missing_extra()
    if missing:
        print(f"error: the benchmark needs the [bench] extra ({', '.join(missing)} not installed): "
              "pip install 'modelplane[bench]'", file=sys.stderr)
        return 2
    from .bench import SECTIONS, Config, run

    ap = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Benchmark an embedded plane this command starts itself (temporary state dir, GCS emulator, "
                    "control service with the example models, all on free 127.0.0.1 ports, all stopped at the "
                    "end): prints figure / target / baseline / ratio / pass, writes report.json and PNG charts.")
    ap.add_argument("--quick", action="store_true",
                    help="fewer samples, 100k-row batch instead of 1M, 1,000 models instead of 10,000 (< 2 min)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench"), help="output folder (default: %(default)s)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(Config(quick=args.quick, out=args.out, only=only))


if __name__ == "__main__":
    sys.exit(main())
