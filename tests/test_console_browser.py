"""End to end in a real browser: control service + `streamlit run console/app.py` as subprocesses,
headless Chromium driven by Selenium. Screenshots land in artifacts/console/ (or under
$MODELPLANE_ARTIFACTS) for people to look at: CI keeps the working tree's artifacts/ folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from control.emulator import free_port
from loadtest.common import wait_http

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("MODELPLANE_ARTIFACTS") or ROOT / "artifacts") / "console"
TOKEN = "browser-test-token"
MODEL = "donor-propensity"
SLOW_BATCH = ROOT / "tests" / "fixtures" / "progress" / "slow-batch"  # scores a row every 0.1 s

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _start(cmd: list[str], *, env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    try:
        wait_http(url, proc, timeout=timeout, log=log)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


@pytest.fixture(scope="module")
def servers(gcs, tmp_path_factory):
    """The control service (`control.server.serve`) and the console, each a subprocess."""
    tmp = tmp_path_factory.mktemp("browser")
    control_port, console_port = free_port(), free_port()
    models = tmp / "models"  # the examples, and a batch model slow enough to watch its progress
    shutil.copytree(MODELS, models)
    shutil.copytree(SLOW_BATCH, models / SLOW_BATCH.name)
    env = {**os.environ,
           "MODELPLANE_HOST": "127.0.0.1", "MODELPLANE_PORT": str(control_port),
           "MODELPLANE_STATE_DIR": str(tmp / "state"), "MODELPLANE_MODELS_DIR": str(models),
           "MODELPLANE_BUCKET": gcs.bucket, "MODELPLANE_TOKEN": TOKEN,
           "MODELPLANE_URL": f"http://127.0.0.1:{control_port}",
           "STORAGE_EMULATOR_HOST": gcs.endpoint, "PYTHONUNBUFFERED": "1"}
    console_env = {**env, "MODELPLANE_CONSOLE_KEY": CONSOLE_KEY}   # as `modelplane up` starts it
    control_log, console_log = tmp / "control.log", tmp / "console.log"
    procs = []
    try:
        procs.append(_start([sys.executable, "-c",
                             "from control.server import serve; serve(watch=True)"],
                            env=env, log=control_log))
        _wait_http(f"http://127.0.0.1:{control_port}/healthz", procs[-1], control_log)
        procs.append(_start([sys.executable, "-m", "console.serve", "run", str(ROOT / "console" / "app.py"),
                             "--server.headless", "true", "--server.port", str(console_port),
                             "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
                             "--server.fileWatcherType", "none"], env=console_env, log=console_log))
        _wait_http(f"http://127.0.0.1:{console_port}/_stcore/health", procs[-1], console_log)
        yield {"control": f"http://127.0.0.1:{control_port}", "console": f"http://127.0.0.1:{console_port}",
               "logs": (control_log, console_log)}
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                "--window-size=1440,1400", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


CONSOLE_KEY = "browser-test-console-key"


def _open(driver, url: str) -> None:
    """Open a console page through the link `modelplane up` prints: it carries the console's key."""
    driver.get(url + ("&" if "?" in url else "?") + f"key={CONSOLE_KEY}")


def _text_appears(driver, text: str, timeout: float = 60) -> None:
    try:
        WebDriverWait(driver, timeout).until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), text))
    except TimeoutException:
        raise AssertionError(f"{text!r} never appeared; page shows:\n{driver.find_element(By.TAG_NAME, 'body').text[:3000]}") from None


def _shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    time.sleep(1.0)  # let charts and fonts finish drawing
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def _no_deploy_button(driver) -> None:
    """console/.streamlit/config.toml sets client.toolbarMode = "viewer": Streamlit's own "Deploy"
    button (shown on loopback by default) is not in the top bar; the toolbar itself is drawn."""
    WebDriverWait(driver, 30).until(EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stToolbar']")))
    time.sleep(1.0)  # the toolbar's actions are drawn after the toolbar
    assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid='stAppDeployButton']")
    assert not driver.find_elements(By.XPATH, "//header//button[normalize-space()='Deploy']")


def _click(driver, xpath: str, timeout: float = 30):
    el = WebDriverWait(driver, timeout).until(EC.element_to_be_clickable((By.XPATH, xpath)))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    el.click()
    return el


def test_browse_models_open_one_submit_the_form_and_see_a_score(servers, browser):
    driver = browser
    _open(driver, servers["console"])
    _text_appears(driver, "Every model on the plane")
    for name in ("donor-propensity", "major-gift", "churn-risk", "member-retention"):
        _text_appears(driver, f"Open {name}")
    _shot(driver, "01-models.png")
    _no_deploy_button(driver)

    # The catalog's search box: the control service answers, the page shows the matches only.
    search = WebDriverWait(driver, 30).until(
        EC.presence_of_element_located((By.XPATH, "//input[@aria-label='Search']")))
    search.click()
    search.send_keys("DONOR", Keys.ENTER)   # name (donor-propensity) or description (major-gift)
    _text_appears(driver, "Models 1–2 of 2 matching")
    WebDriverWait(driver, 30).until(lambda d: "Open churn-risk" not in d.find_element(By.TAG_NAME, "body").text)
    assert "Open major-gift" in driver.find_element(By.TAG_NAME, "body").text
    _shot(driver, "01b-models-search.png")

    _click(driver, f"//a[.//*[normalize-space()='Open {MODEL}'] or normalize-space()='Open {MODEL}']")
    _text_appears(driver, "Fields marked * are required")
    assert f"model={MODEL}" in driver.current_url

    net_worth = WebDriverWait(driver, 30).until(
        EC.presence_of_element_located((By.XPATH, "//input[starts-with(@aria-label, 'net_worth')]")))
    net_worth.click()
    net_worth.send_keys(Keys.CONTROL, "a")
    net_worth.send_keys("250000", Keys.TAB)
    gifts = driver.find_element(By.XPATH, "//input[starts-with(@aria-label, 'gifts_last_year')]")
    gifts.click()
    gifts.send_keys(Keys.CONTROL, "a")
    gifts.send_keys("4", Keys.TAB)
    _shot(driver, "02-model-form.png")

    _click(driver, "//button[.//p[normalize-space()='Score']]")
    _text_appears(driver, "Scored by donor-propensity version 1.0.0", timeout=90)
    value = WebDriverWait(driver, 30).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stMetricValue']")))
    score = float(value.text)
    assert 0.0 <= score <= 1.0
    _shot(driver, "03-score.png")

    # The CSV tab: upload the sample, see scores beside the rows and their distribution.
    _click(driver, "//*[@role='tab'][contains(normalize-space(.), 'Score a CSV')]")
    upload = WebDriverWait(driver, 30).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stFileUploaderDropzoneInput']")))
    upload.send_keys(str(MODELS / MODEL / "sample.csv"))
    _text_appears(driver, "rows of sample.csv", timeout=90)
    WebDriverWait(driver, 30).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stVegaLiteChart'], .vega-embed")))
    _shot(driver, "04-csv-scores.png")

    # The other pages render against the live service too.
    _open(driver, servers["console"] + "/activity")
    _text_appears(driver, "Requests per second")
    _shot(driver, "05-activity.png")
    _open(driver, servers["console"] + "/jobs")
    _text_appears(driver, "Drop a dataset")
    _shot(driver, "06-jobs.png")
    assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text


def test_roll_out_a_version_with_the_slider_and_promote_it(servers, browser, tmp_path):
    import io
    import tarfile

    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {TOKEN}"
    folder = tmp_path / MODEL
    shutil.copytree(MODELS / MODEL, folder)
    manifest = folder / "model.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", "version: 1.0.3"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=MODEL)
    r = api.post(f"{servers['control']}/api/models", params={"live": "false"}, data=buf.getvalue(),
                 headers={"Content-Type": "application/gzip"}, timeout=60)
    assert r.status_code == 201 and r.json()["live"] is False, r.text
    try:
        driver = browser
        _open(driver, f"{servers['console']}/model?model={MODEL}")
        _text_appears(driver, "Fields marked * are required")
        _click(driver, "//*[@role='tab'][contains(normalize-space(.), 'Traffic')]")
        _text_appears(driver, "Roll out a version")
        # the candidate's share: its range input takes the keyboard, 20 steps of 1 %
        from selenium.webdriver.common.action_chains import ActionChains

        share = WebDriverWait(driver, 30).until(EC.presence_of_element_located(
            (By.XPATH, "//input[@type='range' and @aria-label='Share of requests it answers (%)']")))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", share)
        ActionChains(driver).send_keys(*[Keys.ARROW_RIGHT] * 20).perform()
        WebDriverWait(driver, 10).until(lambda d: share.get_attribute("value") == "20",
                                        message=f"the slider shows {share.get_attribute('value')}")
        _click(driver, "//button[.//p[normalize-space()='Apply split']]")
        _text_appears(driver, "1.0.3 answers 20% of requests.")
        traffic = api.get(f"{servers['control']}/api/models/{MODEL}/traffic", timeout=10).json()
        assert (traffic["candidate"], traffic["percent"]) == ("1.0.3", 20)
        _shot(driver, "08-traffic.png")
        _click(driver, "//button[.//p[normalize-space()='Promote 1.0.3']]")
        _text_appears(driver, "1.0.3 is live and takes every request.")
        assert api.get(f"{servers['control']}/api/models/{MODEL}/traffic", timeout=10).json()["live"] == "1.0.3"
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
    finally:
        api.post(f"{servers['control']}/api/models/{MODEL}/rollback", json={"version": "1.0.0"}, timeout=30)


def test_a_running_job_shows_a_progress_bar(servers, browser, gcs, gcs_client):
    rows = "x,delay\n" + "".join(f"{i},\n" for i in range(300))  # ~30 s of scoring
    gcs_client.bucket(gcs.bucket).blob("data/browser-progress.csv").upload_from_string(rows)
    r = requests.post(f"{servers['control']}/api/models/{SLOW_BATCH.name}/jobs",
                      json={"dataset": f"gs://{gcs.bucket}/data/browser-progress.csv"},
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    driver = browser
    _open(driver, servers["console"] + f"/jobs?batch={SLOW_BATCH.name}")
    _text_appears(driver, "/ 300 rows scored", timeout=90)
    bar = WebDriverWait(driver, 30).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stProgress']")))
    assert job_id in bar.text or job_id in driver.find_element(By.TAG_NAME, "body").text
    _shot(driver, "07-job-progress.png")


def test_a_viewer_signs_in_and_sees_no_rollback(servers, browser, tmp_path):
    """On loopback the console starts as this machine's admin; a person signs in with their own
    (viewer) token and the model page offers them no rollback, only a note of the role it needs."""
    import io
    import tarfile

    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {TOKEN}"
    made = api.post(f"{servers['control']}/api/tokens", json={"name": "browser-viewer", "role": "viewer"},
                    timeout=10)
    assert made.status_code == 201, made.text
    folder = tmp_path / MODEL   # a second version, so there is something to roll back to
    shutil.copytree(MODELS / MODEL, folder)
    manifest = folder / "model.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", "version: 1.0.4"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=MODEL)
    r = api.post(f"{servers['control']}/api/models", params={"live": "false"}, data=buf.getvalue(),
                 headers={"Content-Type": "application/gzip"}, timeout=60)
    assert r.status_code == 201, r.text

    driver = browser
    _open(driver, servers["console"])
    _text_appears(driver, "Signed in as admin — admin")
    _click(driver, "//button[.//p[normalize-space()='Sign in as someone else']]")
    _text_appears(driver, "Sign in to modelplane")
    field = WebDriverWait(driver, 30).until(
        EC.presence_of_element_located((By.XPATH, "//input[@aria-label='Your token']")))
    field.click()
    field.send_keys(made.json()["token"])
    _click(driver, "//button[.//p[normalize-space()='Sign in']]")
    _text_appears(driver, "Signed in as browser-viewer — viewer")
    _shot(driver, "09-signed-in-viewer.png")
    # in-app navigation keeps the session (a reload would start a new one)
    _click(driver, f"//a[.//*[normalize-space()='Open {MODEL}'] or normalize-space()='Open {MODEL}']")
    _text_appears(driver, "Scoring: Needs the runner role or above")
    _click(driver, "//*[@role='tab'][contains(normalize-space(.), 'Versions')]")
    _text_appears(driver, "Rolling back: Needs the deployer role or above; you are browser-viewer (viewer).")
    assert not driver.find_elements(By.XPATH, "//button[.//p[starts-with(normalize-space(), 'Roll back to')]]")
    assert not driver.find_elements(By.XPATH, "//button[.//p[normalize-space()='Score']]")
    _shot(driver, "10-viewer-versions.png")
    _click(driver, "//button[.//p[normalize-space()='Sign out']]")
    _text_appears(driver, "Sign in to modelplane")
    assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text


# -- screens that read well (issue 21, point 6) ---------------------------------------------------------

LOCAL_ECHO = ROOT / "tests" / "fixtures" / "local" / "echo"
ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")
EMOJI = ("✅", "❌", "⏳", "⚙️", "⚠️")


def _body(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _truncated(driver) -> list[str]:
    """Metric labels and values drawn cut ("Reque…", "0…"): their text overflows their box."""
    return driver.execute_script("""
        const out = [];
        for (const el of document.querySelectorAll("[data-testid='stMetricValue'], [data-testid='stMetricLabel']")) {
          for (const node of [el, ...el.querySelectorAll('*')]) {
            if (node.scrollWidth > node.clientWidth + 1 && getComputedStyle(node).overflow !== 'visible') {
              out.push(el.innerText); break;
            }
          }
        }
        return out;""")


def _overflowing(driver) -> list[str]:
    """Tables and charts whose right edge is past the page's main column (cut off at the right)."""
    return driver.execute_script("""
        const main = document.querySelector("[data-testid='stMain']") || document.body;
        const right = main.getBoundingClientRect().right + 1;
        const out = [];
        for (const el of document.querySelectorAll(
            "[data-testid='stDataFrame'], [data-testid='stVegaLiteChart'], .vega-embed, [data-testid='stCode']")) {
          const r = el.getBoundingClientRect();
          if (r.width > 0 && r.right > right) out.push(el.getAttribute('data-testid') + ' ends at ' + r.right);
        }
        // a table wider than its box scrolls sideways: its last columns are cut off at the right
        for (const el of document.querySelectorAll("[data-testid='stDataFrame'] .dvn-scroller")) {
          if (el.scrollWidth > el.clientWidth + 2) out.push('a table ' + el.scrollWidth + ' px wide in ' + el.clientWidth + ' px');
        }
        return out;""")


def _axis_texts(driver) -> list[str]:
    """The text of the charts' axes where they are drawn as SVG text (a canvas has none)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.vega-embed svg text')].map(t => t.textContent);")


def _screen_reads_well(driver, what: str) -> None:
    """What the page draws as text (a table's cells are drawn on a canvas: the AppTest tests in
    tests/test_console.py check those)."""
    text = _body(driver)
    assert not re.search(r"\bNone\b", text), f"{what} shows a raw None:\n{text[:3000]}"
    assert not ISO.search(text), f"{what} shows a raw ISO time: {ISO.search(text).group(0)}"
    for e in EMOJI:
        assert e not in text, f"{what} shows {e!r} (an emoji: drawn as an empty box without an emoji font)"
    # crash output and errors name no internal address (the control service's own URL, in the
    # sidebar and the endpoints, is where the reader reaches the plane: that one stays)
    for el in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stCode'], [data-testid='stAlert']"):
        shown = el.get_attribute("textContent") or ""
        assert not re.search(r"127\.0\.0\.1|localhost:\d", shown), f"{what} shows an internal address: {shown[:500]}"
    assert not _truncated(driver), f"{what}: metrics cut off: {_truncated(driver)}"
    assert not _overflowing(driver), f"{what}: cut off at the right: {_overflowing(driver)}"
    for label in _axis_texts(driver):
        assert not re.search(r"\b(AM|PM)\b", label), f"{what}: a 12-hour axis label {label!r}"
    assert "Traceback" not in text


def _deploy_folder(api, control: str, folder: Path, *, live: bool) -> dict:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    r = api.post(f"{control}/api/models", params={"live": str(live).lower()}, data=buf.getvalue(),
                 headers={"Content-Type": "application/gzip"}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


def _echo_version(tmp_path: Path, name: str, version: str, **params) -> Path:
    folder = tmp_path / f"{name}-{version}" / name
    shutil.copytree(LOCAL_ECHO, folder)
    manifest = folder / "model.yaml"
    manifest.write_text(manifest.read_text().replace("name: echo", f"name: {name}")
                        .replace("version: 1.0.0", f"version: {version}"))
    (folder / "params.json").write_text(json.dumps({"factor": 1, **params}))
    return folder


def _selected(driver, label: str) -> str:
    """The value a selectbox labelled `label` shows."""
    box = WebDriverWait(driver, 30).until(EC.presence_of_element_located(
        (By.XPATH, f"//div[@data-testid='stSelectbox'][.//label[normalize-space()='{label}']]")))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    return driver.execute_script("""
        const box = arguments[0];
        const input = box.querySelector('input');
        if (input && input.value) return input.value;
        const shown = box.querySelector("[data-baseweb='select'] [value], [data-baseweb='select'] div[title]");
        if (shown) return shown.getAttribute('value') || shown.getAttribute('title');
        return box.querySelector("[data-baseweb='select']").innerText;""", box).strip()


def test_screens_read_well_and_a_broken_version_is_the_versions_not_the_models(servers, browser, tmp_path,
                                                                               seen_by_models):
    """Every page: no cut-off metric, no None, no raw ISO time, no emoji, no 12-hour axis, nothing
    cut off at the right, no internal address. A version that crashes (not live) is shown on that
    version, the model stays healthy, and the defaults pick the last version that worked; a live
    version that crashes shows its output once, in a code block. A screenshot of each page."""
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {TOKEN}"
    control = servers["control"]
    flag = seen_by_models / "echo-broken"
    # echo-screens: 1.0.0 works, 1.0.1 breaks after its deploy check, 1.0.2 is live and works
    _deploy_folder(api, control, _echo_version(tmp_path, "echo-screens", "1.0.0"), live=True)
    _deploy_folder(api, control, _echo_version(tmp_path, "echo-screens", "1.0.1", crash_at_start_if=str(flag)),
                   live=False)
    _deploy_folder(api, control, _echo_version(tmp_path, "echo-screens", "1.0.2"), live=True)
    # echo-down: its only version breaks after its deploy check: the model is down
    _deploy_folder(api, control, _echo_version(tmp_path, "echo-down", "1.0.0", crash_at_start_if=str(flag)),
                   live=True)
    flag.touch()
    # a comparison of the live version against the broken one fails: the version's failure
    data = "x\n" + "".join(f"{i}\n" for i in range(30))
    uri = api.post(f"{control}/api/models/echo-screens/comparisons/datasets", data=data,
                   headers={"Content-Type": "text/csv"}, timeout=30).json()["uri"]
    started = api.post(f"{control}/api/models/echo-screens/comparisons",
                       json={"a": "1.0.2", "b": "1.0.1", "dataset": uri}, timeout=30)
    assert started.status_code == 202, started.text

    def settled():
        c = api.get(f"{control}/api/comparisons/{started.json()['id']}", timeout=10).json()
        return c if c["status"] in ("succeeded", "failed") else None
    WebDriverWait(None, 180, poll_frequency=0.5).until(lambda _: settled())
    for _ in range(200):   # until 1.0.1 stops restarting, and echo-down is failed
        versions = api.get(f"{control}/api/models/echo-screens", timeout=10).json()["versions"]
        down = api.get(f"{control}/api/models/echo-down", timeout=10).json()
        if any(v.get("crashed") for v in versions if v["version"] == "1.0.1") and down["status"] == "failed":
            break
        for url in (f"{control}/models/echo-screens/versions/1.0.1/predict", f"{control}/models/echo-down/predict"):
            try:
                api.post(url, json={"rows": [{"x": 1}]}, timeout=60)
            except requests.RequestException:
                pass
        time.sleep(0.3)
    detail = api.get(f"{control}/api/models/echo-screens", timeout=10).json()
    assert detail["status"] != "failed" and detail["error"] is None, detail
    # a job, so the Jobs page has rows
    job = api.post(f"{control}/api/models/churn-risk/jobs",
                   json={"dataset": api.post(f"{control}/api/models/churn-risk/datasets",
                                             params={"filename": "screens.csv"},
                                             data=(MODELS / "churn-risk" / "sample.csv").read_bytes(),
                                             headers={"Content-Type": "text/csv"}, timeout=30).json()["uri"]},
                   timeout=30)
    driver = browser
    try:
        # Models: cards do not stretch; the down model says so in one short line
        _open(driver, servers["console"])
        _text_appears(driver, "Open echo-screens")
        _text_appears(driver, "Open echo-down")
        _screen_reads_well(driver, "Models")
        heights = driver.execute_script("""
            return [...document.querySelectorAll("[data-testid='stPageLink']")]
              .filter(l => l.innerText.includes('Open echo-'))
              .map(l => l.closest("[data-testid='stVerticalBlock']").getBoundingClientRect().height);""")
        assert heights and max(heights) < 400, f"a model card stretched to {max(heights)} px"
        _shot(driver, "20-models.png")

        # the model with a broken version: healthy; the failure is on the version
        _open(driver, f"{servers['console']}/model?model=echo-screens")
        _text_appears(driver, "Fields marked * are required")
        assert "is not serving" not in _body(driver)
        badge = driver.find_element(By.XPATH, "//*[@data-testid='stMain']").text
        assert "failed" not in badge.split("live version")[0]
        _click(driver, "//*[@role='tab'][contains(normalize-space(.), 'Versions')]")
        _text_appears(driver, "Why 1.0.1 crashed (echo-screens still serves from 1.0.2)")
        assert _selected(driver, "Roll back to") == "1.0.0"   # the last version that worked
        _click(driver, "//*[contains(@data-testid, 'stExpander')]//summary[contains(., 'Why 1.0.1 crashed')]")
        _text_appears(driver, "cannot start")
        codes = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stCode']") if c.is_displayed()]
        assert codes and all("127.0.0.1" not in c for c in codes)
        _screen_reads_well(driver, "Model (a broken version)")
        _shot(driver, "21-model-broken-version.png")

        # the model that is down: its crash output once, in a code block, no internal address
        _open(driver, f"{servers['console']}/model?model=echo-down")
        _text_appears(driver, "echo-down is not serving")
        _text_appears(driver, "Cold starts")   # the page drawn to its end
        _text_appears(driver, "echo: cannot start")
        time.sleep(1.0)
        body = _body(driver)
        codes = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stCode']") if c.is_displayed()]
        assert len([c for c in codes if "cannot start" in c]) == 1, codes
        assert body.count("echo: cannot start") == 1, body
        height = driver.execute_script(
            "return Math.max(...[...document.querySelectorAll(\"[data-testid='stCode']\")].map(c => c.getBoundingClientRect().height))")
        assert height <= 300
        _screen_reads_well(driver, "Model (down)")
        _shot(driver, "22-model-down.png")

        # Compare: Version B is the last version that worked; the failed comparison is listed
        _open(driver, f"{servers['console']}/compare?model=echo-screens&comparison={started.json()['id']}")
        _text_appears(driver, "Past comparisons")
        assert _selected(driver, "Version B") == "1.0.0"
        _text_appears(driver, "The comparison failed:")   # the comparison's failure, on the comparison
        _screen_reads_well(driver, "Compare")
        _shot(driver, "23-compare.png")

        # Jobs and Activity
        assert job.status_code == 202, job.text
        WebDriverWait(None, 120, poll_frequency=0.5).until(lambda _: api.get(
            f"{control}/api/jobs/{job.json()['id']}", timeout=10).json()["status"] in ("succeeded", "failed"))
        _open(driver, f"{servers['console']}/jobs?batch=churn-risk")
        _text_appears(driver, job.json()["id"])
        _text_appears(driver, "Finished")
        _screen_reads_well(driver, "Jobs")
        _shot(driver, "24-jobs.png")
        for _ in range(3):
            api.post(f"{control}/models/donor-propensity/predict", data=(MODELS / MODEL / "sample.csv").read_bytes(),
                     headers={"Content-Type": "text/csv"}, timeout=60)
        _open(driver, servers["console"] + "/activity")
        _text_appears(driver, "Requests per second")
        WebDriverWait(driver, 30).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".vega-embed")))
        time.sleep(1.0)
        _screen_reads_well(driver, "Activity")
        _shot(driver, "25-activity.png")
        _click(driver, "//*[@role='tab'][contains(normalize-space(.), 'Audit trail')]")
        _text_appears(driver, "Audit chain")
        _screen_reads_well(driver, "Activity: audit trail")
        _shot(driver, "26-audit.png")
    finally:
        flag.unlink(missing_ok=True)
        for name in ("echo-screens", "echo-down"):
            api.delete(f"{control}/api/models/{name}", timeout=60)
