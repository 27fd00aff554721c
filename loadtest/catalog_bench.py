"""The catalog benchmark: thousands of labelled models (one per customer), searched through the API
and through the console in a real browser.

- `list_models_filtered_ms` — `GET /api/models?label=customer=…&label=tier&q=…` with N registered
  models (10,000; 1,000 in quick mode), each request a filter not asked before (no cached answer),
  median; target ≤ 20 ms. Baseline: the unfiltered list of the same plane.
- `catalog_console_first_table_s` / `catalog_console_search_s` (full mode; needs chromium and
  chromedriver) — the console's Models page over the same plane in headless Chromium: navigation
  → the first page of the table shown, and a search typed in the box → its answer shown; median of
  a few loads; target ≤ 2 s each. Baseline: the same page over the benchmark's own plane (the
  example models), which is Streamlit's own cost.

Every model is a minimal valid manifest (never started) with an owner and labels, registered with
the local runtime's own `deploy` as `loadtest/registry.py` does for the listing benchmark.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from control.emulator import free_port

from . import registry
from .common import median, percentile, wait_http
from .plane import EmbeddedPlane
from .report import Figure

if TYPE_CHECKING:
    from .bench import Bench

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_APP = ROOT / "console" / "app.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CUSTOMERS = 2000
TEAMS = ("fundraising", "membership", "marketing", "finance", "events")
TIERS = ("gold", "silver", "bronze")

MANIFEST = """\
name: {name}
version: 1.0.0
kind: realtime
language: python
description: {what} for customer c{customer:04d}
owner: {team}-analytics
labels: {{customer: c{customer:04d}, team: {team}, tier: {tier}}}
command: [python3, -c, "pass"]
features:
  - {{name: x, type: number}}
scaling: {{min: 0, max: 1, target_concurrency: 8, idle_timeout: 60s}}
"""


def manifest_text(i: int) -> str:
    return MANIFEST.format(name=f"cust-{i:05d}", customer=i % CUSTOMERS, team=TEAMS[i % len(TEAMS)],
                           tier=TIERS[i % len(TIERS)], what="Donor propensity" if i % 4 == 2 else "Churn risk")


def populate(state_dir: Path, count: int, *, workers: Optional[int] = None) -> int:
    """`count` labelled models into `state_dir`, as `registry.populate` registers its fillers."""
    return registry.populate(state_dir, count, workers=workers, text_of=manifest_text)


# -- the API --------------------------------------------------------------------------------------

def time_filtered(plane: EmbeddedPlane, queries: list[dict]) -> tuple[list[float], list[int]]:
    """Milliseconds of each GET of `queries` on one keep-alive connection (the body read whole),
    and how many models each matched."""
    import requests

    times, matched = [], []
    with requests.Session() as s:
        s.headers.update(plane.auth)
        s.get(f"{plane.url}/api/models", params={"limit": 1}, timeout=120).raise_for_status()  # warm
        for params in queries:
            t0 = time.perf_counter()
            r = s.get(f"{plane.url}/api/models", params=params, timeout=120)
            r.content  # noqa: B018 — the whole body, as a client reads it
            times.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"GET /api/models {params} answered {r.status_code}: {r.text[:200]}")
            matched.append(int(r.headers["X-Total-Count"]))
    return times, matched


# -- the console in a browser --------------------------------------------------------------------

def browser_available() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def time_console(plane: EmbeddedPlane, workdir: Path, *, count: int, searches: list[str], loads: int = 3) -> dict:
    """Seconds until the Models page shows its first table, and until a typed search is answered,
    in headless Chromium (the options of tests/test_console_browser.py), each `loads` times after
    a warm-up load (the browser's cache holds Streamlit's own scripts, as for a returning user);
    search k types `searches[k]`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MODELPLANE_URL": plane.url, "MODELPLANE_TOKEN": plane.token,
           "MODELPLANE_STATE_DIR": str(workdir / "no-state"), "PYTHONUNBUFFERED": "1"}
    log = open(workdir / "console.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(CONSOLE_APP), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    driver = None
    first_table, search = [], []
    total = f"of {count:,}"
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_stcore/health", proc)
        opts = Options()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={workdir / 'chromium-profile'}",
                    "--window-size=1440,1400", "--force-device-scale-factor=1"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.set_page_load_timeout(60)
        wait = WebDriverWait(driver, 60, poll_frequency=0.02)

        def table_shown(text: str):
            return wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='stDataFrame']")
                              and text in d.find_element(By.TAG_NAME, "body").text)

        for k in range(loads + 1):
            t0 = time.perf_counter()
            driver.get(url)
            table_shown(f"Models 1–{min(count, 50)} {total}")
            took = time.perf_counter() - t0
            box = wait.until(EC.presence_of_element_located((By.XPATH, "//input[@aria-label='Search']")))
            box.click()
            t1 = time.perf_counter()
            box.send_keys(searches[k % len(searches)], Keys.ENTER)
            # the caption says "Models 1–5 of 5 matching" once the filtered page is drawn
            wait.until(lambda d: "matching" in d.find_element(By.TAG_NAME, "body").text)
            searched = time.perf_counter() - t1
            if k:  # the first load warms the browser's cache
                first_table.append(took)
                search.append(searched)
    finally:
        if driver is not None:
            driver.quit()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    return {"first_table_s": first_table, "search_s": search}


# -- the section -----------------------------------------------------------------------------------

def bench_catalog(bench: "Bench") -> None:
    count = bench.cfg.registered_models
    work = bench.tmp / "catalog"
    state = work / "state"
    t0 = time.monotonic()
    populate(state, count)
    populate_s = time.monotonic() - t0
    env = {"STORAGE_EMULATOR_HOST": bench.plane.emulator.endpoint, "MODELPLANE_STORAGE_KEY": bench.plane.emulator.key} \
        if bench.plane and bench.plane.emulator else {}
    plane = EmbeddedPlane(work, models_dir=work / "no-models", state_dir=state, emulator=False, env=env)
    t0 = time.monotonic()
    plane.start(timeout=600)
    details: dict = {"registered": count, "populate_s": round(populate_s, 1),
                     "control_start_s": round(time.monotonic() - t0, 1)}
    try:
        repeats = 21 if bench.cfg.quick else 51
        narrow = [{"label": [f"customer=c{(k * 7919) % min(count, CUSTOMERS):04d}", "tier"], "q": "donor"}
                  for k in range(repeats)]
        broad = [{"label": [f"tier={TIERS[k % 3]}", f"team!={TEAMS[k % 5]}"], "q": "donor", "limit": 100}
                 for k in range(repeats)]
        timing, matched = time_filtered(plane, narrow)
        broad_timing, broad_matched = time_filtered(plane, broad)
        repeated, _ = time_filtered(plane, [narrow[0]] * repeats)
        whole, _ = time_filtered(plane, [{}] * 7)
        details["api"] = {"narrow_ms": timing, "narrow_matched": matched, "broad_page_ms": broad_timing,
                          "broad_matched": broad_matched, "repeated_ms": repeated, "unfiltered_ms": whole}
        bench.figures.append(Figure(
            id="list_models_filtered_ms",
            title=f"GET /api/models?label=customer=…&label=tier&q=donor with {count:,} models, median",
            unit="ms", value=median(timing), baseline=median(whole),
            baseline_label=f"the whole list of {count:,}, median", target=20.0, samples=len(timing),
            notes="each request a filter not asked before (no cached answer)",
            extra={"p90_ms": percentile(timing, 90), "max_ms": max(timing),
                   "broad_page_of_100_median_ms": median(broad_timing),
                   "broad_matched_median": median(broad_matched),
                   "repeated_filter_median_ms": median(repeated), "models": count}))
        if bench.cfg.quick:
            details["browser"] = {"skipped": "quick mode (tests/test_console_browser.py searches in a browser)"}
        elif not browser_available():
            details["browser"] = {"skipped": "needs selenium, chromium and chromedriver"}
        else:
            # a different customer each time: no cached answer
            seen = time_console(plane, work / "browser", count=count,
                                searches=[f"c{(37 * k + 11) % CUSTOMERS:04d}" for k in range(4)])
            # the baseline: the same page over the benchmark's own plane (the examples: a handful)
            few = len(bench.plane.models())
            alone = time_console(bench.plane, work / "browser-few", count=few, searches=["donor", "risk", "gift"])
            details["browser"] = {"models": seen, "baseline": {"models": few, **alone}}
            for key, title in (("first_table_s", "the first table shown"),
                               ("search_s", "a typed search answered")):
                values = seen[key]
                bench.figures.append(Figure(
                    id=f"catalog_console_{key[:-2]}_s",
                    title=f"console Models page with {count:,} models in Chromium: {title}, median",
                    unit="s", value=median(values), baseline=median(alone[key]),
                    baseline_label=f"the same with {few} models, s", target=2.0, samples=len(values),
                    extra={"max_s": max(values)}))
    finally:
        plane.stop()
    bench.details["catalog"] = details
