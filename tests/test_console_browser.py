"""End to end in a real browser: control service + `streamlit run console/app.py` as subprocesses,
headless Chromium driven by Selenium. Screenshots land in artifacts/console/ for people to look at.
"""
from __future__ import annotations

import os
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
ARTIFACTS = ROOT / "artifacts" / "console"
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
