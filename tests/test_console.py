"""The console's pages, run with Streamlit's AppTest against a real control service.

The control service is the real one (`control.server.ControlServer` in a thread,
the local runtime, the example models under ./models, the GCS emulator, the bucket watcher).
Only the browser is missing: AppTest runs each page's script and we assert on what it renders.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

from control.emulator import free_port

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(ROOT / "console" / "app.py")
TOKEN = "console-test-token"
REALTIME = "donor-propensity"
BATCH = "churn-risk"
TIMEOUT = 90

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plane(gcs, tmp_path_factory):
    """The control service with the four example models, a token, and the bucket watcher."""
    from control.server import ControlServer
    from control.settings import Settings

    state = tmp_path_factory.mktemp("console-state")
    settings = Settings(host="127.0.0.1", port=0, state_dir=state, models_dir=MODELS, token=TOKEN,
                        bucket=gcs.bucket, watch_interval=0.5, threads=16)
    server = ControlServer(settings, watch=True).start()
    try:
        API.get(f"{server.url}/healthz", timeout=10).raise_for_status()
        yield server
    finally:
        server.stop()


#: What a client holding the token sends (every API call needs it).
API = requests.Session()
API.headers["Authorization"] = f"Bearer {TOKEN}"


@pytest.fixture
def console(plane, monkeypatch, tmp_path):
    """A factory of AppTests pointed at the plane (or at `url`, with `token`), served on
    loopback unless `address` says otherwise; no state-dir token unless `state_dir` is given."""
    from streamlit import config

    def make(*, url: str | None = None, token: str | None = TOKEN, address: str = "127.0.0.1",
             state_dir: Path | None = None) -> AppTest:
        monkeypatch.setenv("MODELPLANE_URL", url or plane.url)
        monkeypatch.setenv("MODELPLANE_STATE_DIR", str(state_dir or tmp_path / "no-state"))
        if token is None:
            monkeypatch.delenv("MODELPLANE_TOKEN", raising=False)
        else:
            monkeypatch.setenv("MODELPLANE_TOKEN", token)
        config.set_option("server.address", address)
        return AppTest.from_file(APP, default_timeout=TIMEOUT)

    yield make
    config.set_option("server.address", "127.0.0.1")


def open_page(at: AppTest, page: str, **query: str) -> AppTest:
    """Run the app once (so st.navigation registers its pages), then open `page` with `query`."""
    at.run()
    if page != "views/models.py":
        at.switch_page(page)
    at.query_params.update(query)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    """Everything textual the page shows, for `in` checks."""
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [e.value for e in at.error] + [w.value for w in at.warning] + [i.value for i in at.info]
    parts += [s.value for s in at.success] + [t.value for t in at.title]
    return "\n".join(str(p) for p in parts)


def frames(at: AppTest) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe]


def frame_with(at: AppTest, column: str) -> pd.DataFrame:
    for f in frames(at):
        if column in f.columns:
            return f
    raise AssertionError(f"no table with a {column!r} column; tables: {[list(f.columns) for f in frames(at)]}")


def metric(at: AppTest, label: str):
    found = [m for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; metrics: {[m.label for m in at.metric]}"
    return found[0]


def sample(name: str) -> bytes:
    return (MODELS / name / "sample.csv").read_bytes()


# -- Models ----------------------------------------------------------------------------------

def test_models_page_lists_every_model_with_status(console):
    at = open_page(console(), "views/models.py")
    table = frame_with(at, "Model")
    assert set(table["Model"]) >= {"donor-propensity", "major-gift", "churn-risk", "member-retention"}
    rows = table.set_index("Model")
    assert rows.loc[REALTIME, "Kind"] == "realtime · python" and rows.loc[BATCH, "Kind"] == "batch · python"
    assert rows.loc["major-gift", "Kind"] == "realtime · r"
    # Realtime models with scaling.min 0 start scaled to zero: the console says idle, with its icon.
    assert rows.loc[REALTIME, "Status"] in ("○ idle", "◐ starting", "● ready")
    for status in rows["Status"]:
        assert status.split(" ")[-1] in ("ready", "idle", "starting", "failed")
    assert any(m.label == "Idle" for m in at.metric)
    # A card per model, with a link to its page.
    links = [p.proto.label for p in at.get("page_link")]
    assert f"Open {REALTIME}" in links and f"Open {BATCH}" in links
    assert not at.error


# -- Model page: form, CSV, problems, versions ---------------------------------------------------

def test_model_page_shows_schema_and_a_generated_form(console):
    at = open_page(console(), "views/model.py", model=REALTIME)
    assert at.title[0].value == REALTIME
    schema = frame_with(at, "Feature")
    assert list(schema["Feature"]) == ["net_worth", "gifts_last_year", "region", "years_since_first_gift",
                                      "board_member"]
    assert schema.set_index("Feature").loc["years_since_first_gift", "Required"] == "optional"
    labels = {w.label for w in [*at.number_input, *at.selectbox, *at.checkbox]}
    # Required fields are starred; optional ones say so.
    assert {"net_worth *", "gifts_last_year *", "region *", "years_since_first_gift (optional)",
            "board_member *"} <= labels
    region = next(s for s in at.selectbox if s.label == "region *")
    assert region.options == ["west", "east", "north", "south"]
    assert next(n for n in at.number_input if n.label.startswith("years_since")).value is None


def test_form_submit_shows_a_score(console):
    at = open_page(console(), "views/model.py", model=REALTIME)
    next(n for n in at.number_input if n.label == "net_worth *").set_value(250000.0)
    next(n for n in at.number_input if n.label == "gifts_last_year *").set_value(3)
    next(s for s in at.selectbox if s.label == "region *").set_value("west")
    next(c for c in at.checkbox if c.label == "board_member *").check()
    at.button(key="FormSubmitter:predict-donor-propensity-Score").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    score = float(metric(at, "propensity").value)
    assert 0.0 <= score <= 1.0
    assert "Scored by **donor-propensity** version **1.0.0**" in texts(at)


def test_csv_upload_scores_rows_with_chart_and_download(console):
    at = open_page(console(), "views/model.py", model=REALTIME)
    at.file_uploader(key=f"csv-{REALTIME}").set_value(("donors.csv", sample(REALTIME), "text/csv"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    scored = frame_with(at, "propensity")
    inputs = pd.read_csv(io.BytesIO(sample(REALTIME)))
    assert len(scored) == len(inputs)
    assert list(scored.columns[:len(inputs.columns)]) == list(inputs.columns)
    assert scored["propensity"].astype(float).between(0, 1).all()
    assert at.get("vega_lite_chart"), "no distribution chart"
    assert [b for b in at.get("download_button") if "Download scores" in b.proto.label]
    assert f"Scored {len(inputs):,} rows of donors.csv." in texts(at)


def test_bad_csv_shows_the_problem_table_not_a_traceback(console):
    bad = (b"net_worth,gifts_last_year,region,years_since_first_gift,board_member\n"
           b"1000,2,west,,false\n"
           b"lots,1,mars,3,maybe\n")
    at = open_page(console(), "views/model.py", model=REALTIME)
    at.file_uploader(key=f"csv-{REALTIME}").set_value(("bad.csv", bad, "text/csv"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("The model rejected bad.csv" in e.value for e in at.error)
    problems = frame_with(at, "Error")
    assert {"Row", "Field", "Error", "Value"} <= set(problems.columns)
    by_field = problems.set_index("Field")
    # Rows are numbered from 1 everywhere (the API as the console, as a spreadsheet does): the
    # console shows the API's numbers as they are, and the value of that row.
    assert set(problems["Row"]) == {2}
    assert {"net_worth", "region", "board_member"} <= set(by_field.index)
    assert by_field.loc["region", "Value"] == "mars"
    assert "not allowed" in by_field.loc["region", "Error"]


def deploy_version(plane, tmp_path, version: str, *, live: bool = True) -> dict:
    """Deploy `version` of the realtime example through the API, as `modelplane deploy` does."""
    import shutil
    import tarfile

    folder = tmp_path / REALTIME
    shutil.copytree(MODELS / REALTIME, folder)
    manifest = folder / "model.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", f"version: {version}"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=REALTIME)
    r = API.post(f"{plane.url}/api/models", params={"live": str(live).lower()}, data=buf.getvalue(), timeout=60,
                 headers={"Content-Type": "application/gzip"})
    assert r.status_code == 201, r.text
    return r.json()


def test_versions_and_rollback_with_confirmation(console, plane, tmp_path):
    deploy_version(plane, tmp_path, "1.0.1")
    try:
        at = open_page(console(), "views/model.py", model=REALTIME)
        versions = frame_with(at, "State").set_index("Version")
        assert versions.loc["1.0.1", "State"] == "● live"
        at.button(key=f"rollback-{REALTIME}").click().run()
        # Nothing happens until confirmed.
        assert API.get(f"{plane.url}/api/models/{REALTIME}", timeout=10).json()["version"] == "1.0.1"
        assert any("Make **1.0.0** live instead of **1.0.1**?" in w.value for w in at.warning)
        at.button(key=f"rollback-yes-{REALTIME}").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert any("Version 1.0.0 is live." in s.value for s in at.success)
        assert API.get(f"{plane.url}/api/models/{REALTIME}", timeout=10).json()["version"] == "1.0.0"
        versions = frame_with(at, "State").set_index("Version")
        assert versions.loc["1.0.0", "State"] == "● live"
    finally:
        API.post(f"{plane.url}/api/models/{REALTIME}/rollback", json={"version": "1.0.0"}, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"})


def test_traffic_tab_rolls_out_with_a_slider_and_promotes(console, plane, tmp_path):
    assert deploy_version(plane, tmp_path, "1.0.2", live=False)["live"] is False
    try:
        at = open_page(console(), "views/model.py", model=REALTIME)
        split = frame_with(at, "Share of requests").set_index("Version")
        assert split.loc["1.0.0", "Share of requests"] == "100%" and "1.0.2" not in split.index
        at.selectbox(key=f"rollout-version-{REALTIME}").select("1.0.2")
        at.slider(key=f"rollout-percent-{REALTIME}").set_value(30)
        at.slider(key=f"rollout-shadow-{REALTIME}").set_value(10)
        at.button[[b.label for b in at.button].index("Apply split")].click().run()
        assert not at.exception, [e.value for e in at.exception]
        t = API.get(f"{plane.url}/api/models/{REALTIME}/traffic", timeout=10).json()
        assert (t["candidate"], t["percent"], t["shadow"]) == ("1.0.2", 30, 10)
        assert any("1.0.2 answers 30% of requests, shadow 10%." in s.value for s in at.success)
        split = frame_with(at, "Share of requests").set_index("Version")
        assert (split.loc["1.0.0", "Share of requests"], split.loc["1.0.2", "Share of requests"]) == ("70%", "30%")
        # the shadow: every live request copied to 1.0.2, compared on the page like a comparison
        assert API.post(f"{plane.url}/api/models/{REALTIME}/rollout",
                        json={"version": "1.0.2", "percent": 0, "shadow": 100}, timeout=30).status_code == 200
        rows = pd.read_csv(io.BytesIO(sample(REALTIME))).head(5)
        body = rows.to_csv(index=False).encode()
        for _ in range(4):
            r = API.post(f"{plane.url}/models/{REALTIME}/predict", data=body, timeout=60,
                         headers={"Content-Type": "text/csv", "Accept": "application/json"})
            assert r.status_code == 200 and r.json()["version"] == "1.0.0", r.text
        deadline = time.monotonic() + 60
        while API.get(f"{plane.url}/api/models/{REALTIME}/shadow", timeout=10).json()["requests"] < 4:
            assert time.monotonic() < deadline, "the shadow copies were never recorded"
            time.sleep(0.2)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert "Shadow: 1.0.2 beside 1.0.0" in texts(at)
        assert metric(at, "Rows compared").value == "20" and metric(at, "Identical rows").value == "20"
        specs = [c.proto.spec for c in at.get("arrow_vega_lite_chart") + at.get("vega_lite_chart")]
        assert any("Scores of 1.0.0 and 1.0.2 on the same rows" in spec for spec in specs), specs
        at.button(key=f"promote-{REALTIME}").click().run()
        assert not at.exception, [e.value for e in at.exception]
        t = API.get(f"{plane.url}/api/models/{REALTIME}/traffic", timeout=10).json()
        assert (t["live"], t["candidate"]) == ("1.0.2", None)
        assert any("1.0.2 is live and takes every request." in s.value for s in at.success)
    finally:
        API.post(f"{plane.url}/api/models/{REALTIME}/rollback", json={"version": "1.0.0"}, timeout=30)


# -- Jobs ------------------------------------------------------------------------------------

def _wait_for_job(at: AppTest, dataset: str, *, timeout: float = 120) -> pd.Series:
    """Rerun the Jobs page until the job on `dataset` has finished; its row in the table."""
    deadline = time.monotonic() + timeout
    while True:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        try:
            jobs = frame_with(at, "Job")
        except AssertionError:
            jobs = pd.DataFrame(columns=["Job", "Status"])
        mine = jobs[jobs["Dataset"].astype(str).str.endswith(dataset)] if len(jobs) else jobs
        done = mine[mine["Status"].str.endswith(("succeeded", "failed"))]
        if len(done):
            return done.iloc[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"the job on {dataset} did not finish in {timeout}s: {jobs.to_dict('records')}; "
                                 f"{texts(at)}")
        time.sleep(1)


def test_dropped_dataset_runs_through_the_bucket_and_offers_results(console, plane):
    at = open_page(console(), "views/jobs.py", batch=BATCH)
    assert at.selectbox(key="batch").value == BATCH
    at.file_uploader(key=f"dataset-{BATCH}").set_value(("console-drop.csv", sample(BATCH), "text/csv"))
    at.run()
    at.button(key=f"upload-{BATCH}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any(f"incoming/{BATCH}/console-drop.csv" in s.value for s in at.success)
    job = _wait_for_job(at, f"incoming/{BATCH}/console-drop.csv")
    assert job["Status"] == "● succeeded", job.to_dict()
    assert job["Dataset"].endswith(f"incoming/{BATCH}/console-drop.csv")
    at.run()
    # it came through the bucket event, not a direct submit (the job's detail says which)
    assert any(f"**Job `{job['Job']}`**" in m.value and m.value.endswith("· event") for m in at.markdown), \
        [m.value for m in at.markdown if "**Job" in m.value]
    results = frame_with(at, "churn_probability")
    assert len(results) == len(pd.read_csv(io.BytesIO(sample(BATCH))))
    assert [b for b in at.get("download_button") if "Download scores" in b.proto.label]


def test_a_realtime_model_runs_on_a_dropped_file_from_the_jobs_page(console, plane):
    """The Jobs page offers realtime models too: the file's job streams it through the replicas."""
    at = open_page(console(), "views/jobs.py", batch=REALTIME)
    assert REALTIME in at.selectbox(key="batch").options and BATCH in at.selectbox(key="batch").options
    assert at.selectbox(key="batch").value == REALTIME
    at.file_uploader(key=f"dataset-{REALTIME}").set_value(("console-rt.csv", sample(REALTIME), "text/csv"))
    at.run()
    at.button(key=f"upload-{REALTIME}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    job = _wait_for_job(at, f"incoming/{REALTIME}/console-rt.csv")
    assert job["Status"] == "● succeeded", job.to_dict()
    at.run()
    results = frame_with(at, "propensity")
    assert len(results) == len(pd.read_csv(io.BytesIO(sample(REALTIME))))


def test_gs_uri_job_that_fails_shows_reason_and_log_tail(console, plane, gcs_client, gcs):
    blob = gcs_client.bucket(gcs.bucket).blob("datasets/console-broken.csv")
    blob.upload_from_string("not,the,right,columns\n1,2,3,4\n", content_type="text/csv")
    at = open_page(console(), "views/jobs.py", batch=BATCH)
    at.text_input(key=f"uri-{BATCH}").input(f"gs://{gcs.bucket}/datasets/console-broken.csv")
    at.run()
    at.button(key=f"run-{BATCH}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Job `" in s.value for s in at.success), texts(at)
    job = _wait_for_job(at, "datasets/console-broken.csv")
    assert job["Status"] == "✕ failed", job.to_dict()
    at.run()
    api = API.get(f"{plane.url}/api/jobs/{job['Job']}", timeout=10).json()
    assert api["error"]
    assert any("The job failed:" in e.value and api["error"] in e.value for e in at.error), texts(at)
    assert "**Log tail**" in texts(at)
    if api["log_tail"]:
        assert at.code[0].value == api["log_tail"]
    else:
        assert "The job wrote no log output before it failed." in texts(at)


# -- Activity --------------------------------------------------------------------------------

def test_activity_page_charts_history(console, plane):
    for _ in range(3):
        r = API.post(f"{plane.url}/models/{REALTIME}/predict", data=sample(REALTIME),
                          headers={"Content-Type": "text/csv"}, timeout=60)
        assert r.status_code == 200, r.text
    at = open_page(console(), "views/activity.py")
    assert not at.error, [e.value for e in at.error]
    totals = frame_with(at, "Cold starts").set_index("Model")
    assert totals.loc[REALTIME, "Requests"] >= 3
    assert totals.loc[REALTIME, "Cold starts"] >= 1
    assert len(at.get("vega_lite_chart")) >= 4
    assert "Requests per second" in texts(at)


# -- Control service down, wrong token --------------------------------------------------------

PAGES = ["views/models.py", "views/model.py", "views/jobs.py", "views/activity.py"]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_says_when_the_control_service_is_unreachable(console, page):
    dead = f"http://127.0.0.1:{free_port()}"
    at = open_page(console(url=dead), page)
    errors = [e.value for e in at.error]
    assert any("Control service unreachable" in e and dead in e for e in errors), errors


@pytest.mark.parametrize("page", PAGES)
def test_every_page_says_when_the_token_is_wrong(console, page):
    at = open_page(console(token="not-the-token"), page)
    errors = [e.value for e in at.error]
    assert any("Token rejected" in e and "MODELPLANE_TOKEN" in e and "401" in e for e in errors), errors


def test_with_a_wrong_token_no_page_shows_data(console):
    at = open_page(console(token="not-the-token"), "views/models.py")
    assert not at.dataframe and REALTIME not in texts(at)


def test_with_no_token_the_banner_says_where_to_find_one(console):
    at = open_page(console(token=None), "views/models.py")
    assert any("No token" in e.value and ".modelplane/token" in e.value for e in at.error)
    assert not at.dataframe


def test_on_loopback_the_console_reads_the_state_dir_token(console, tmp_path):
    """What `modelplane up` leaves: no MODELPLANE_TOKEN, a 0600 token file in the state dir."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "token").write_text(TOKEN + "\n")
    at = open_page(console(token=None, state_dir=state), "views/models.py")
    assert not at.error, [e.value for e in at.error]
    assert REALTIME in frame_with(at, "Model")["Model"].tolist()


def _sign_in(at: AppTest, token: str) -> AppTest:
    at.text_input(key="sign-in-token").input(token)
    next(b for b in at.button if b.label == "Sign in").click().run()
    return at


def test_beyond_loopback_the_console_asks_each_browser_for_the_token(console):
    """Reachable from other machines, the console never acts with the server's token (here in
    its environment) for whoever opens it: nothing shows until the right token is given."""
    at = console(address="0.0.0.0", token=TOKEN)
    at.run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Sign in to modelplane"]
    assert not at.dataframe and REALTIME not in texts(at)
    _sign_in(at, "not-the-token")
    assert any("Token rejected" in e.value for e in at.error)
    assert not at.dataframe
    _sign_in(at, TOKEN)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert REALTIME in frame_with(at, "Model")["Model"].tolist()
    # another browser session starts signed out
    other = console(address="0.0.0.0", token=TOKEN)
    other.run()
    assert [t.value for t in other.title] == ["Sign in to modelplane"]

# -- Who is signed in, and what their role lets them do ---------------------------------------

X_OWNER = "fundraising-analytics"    # owns donor-propensity (REALTIME) and major-gift
Y_OWNER = "membership-analytics"     # owns churn-risk (BATCH) and member-retention


@pytest.fixture(scope="module")
def named(plane):
    """Named tokens an admin created through the API: name -> token."""
    made = {}
    for name, role, owner in (("vera", "viewer", None), ("rui", "runner", None), ("dana", "deployer", X_OWNER),
                              ("yan", "deployer", Y_OWNER), ("ada", "admin", None)):
        body = {"name": name, "role": role, **({"owner": owner} if owner else {})}
        r = API.post(f"{plane.url}/api/tokens", json=body, timeout=10)
        assert r.status_code == 201, r.text
        made[name] = r.json()["token"]
    return made


@pytest.fixture(scope="module")
def two_versions(plane, tmp_path_factory):
    """A second, not live, version of the realtime example: rollback and rollout have something to offer."""
    deploy_version(plane, tmp_path_factory.mktemp("second-version"), "1.0.7", live=False)
    return "1.0.7"


def button_keys(at: AppTest) -> set:
    return {b.key for b in at.button}


def button_labels(at: AppTest) -> set:
    return {b.label for b in at.button}


def sidebar_text(at: AppTest) -> str:
    return "\n".join(str(m.value) for m in list(at.sidebar.markdown) + list(at.sidebar.caption))


def test_a_viewer_sees_no_scoring_rollback_or_rollout(console, named, two_versions):
    at = open_page(console(token=named["vera"]), "views/model.py", model=REALTIME)
    assert not at.error, [e.value for e in at.error]
    assert "Signed in as **vera — viewer**" in sidebar_text(at)
    keys, labels = button_keys(at), button_labels(at)
    assert f"rollback-{REALTIME}" not in keys and "Score" not in labels and "Apply split" not in labels
    assert not [u for u in at.get("file_uploader") if u.proto.id.endswith(f"csv-{REALTIME}")]
    notes = texts(at)
    assert "Scoring: Needs the runner role or above; you are vera (viewer)." in notes
    assert "Rolling back: Needs the deployer role or above; you are vera (viewer)." in notes
    # what a viewer may read still shows
    assert "1.0.7" in frame_with(at, "State")["Version"].tolist()
    # no job submission either
    jobs = open_page(console(token=named["vera"]), "views/jobs.py", batch=BATCH)
    assert f"upload-{BATCH}" not in button_keys(jobs) and f"run-{BATCH}" not in button_keys(jobs)
    assert "Needs the runner role or above" in texts(jobs)


def test_a_runner_scores_but_does_not_roll_back(console, named, two_versions):
    at = open_page(console(token=named["rui"]), "views/model.py", model=REALTIME)
    assert "Signed in as **rui — runner**" in sidebar_text(at)
    assert "Score" in button_labels(at)
    assert f"rollback-{REALTIME}" not in button_keys(at) and "Apply split" not in button_labels(at)
    assert "Rolling back: Needs the deployer role or above; you are rui (runner)." in texts(at)
    next(b for b in at.button if b.label == "Score").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert metric(at, "propensity").value  # the runner's score came back
    jobs = open_page(console(token=named["rui"]), "views/jobs.py", batch=BATCH)
    assert f"run-{BATCH}" in button_keys(jobs)
    cmp = open_page(console(token=named["rui"]), "views/compare.py", model=REALTIME)
    assert f"cmp-run-{REALTIME}" not in button_keys(cmp)
    assert "Starting a comparison: Needs the deployer role or above" in texts(cmp)


def test_an_owner_limited_deployer_changes_only_its_owners_models(console, named, two_versions):
    mine = open_page(console(token=named["dana"]), "views/model.py", model=REALTIME)
    assert f"Signed in as **dana — deployer, models of {X_OWNER}**" in sidebar_text(mine)
    assert f"rollback-{REALTIME}" in button_keys(mine) and "Apply split" in button_labels(mine)
    assert "Score" in button_labels(mine)
    # the same model, to a deployer of another owner: read only
    theirs = open_page(console(token=named["yan"]), "views/model.py", model=REALTIME)
    assert f"rollback-{REALTIME}" not in button_keys(theirs) and "Score" not in button_labels(theirs)
    assert "Apply split" not in button_labels(theirs)
    assert f"yan may change only models of {Y_OWNER}; {REALTIME} belongs to {X_OWNER}." in texts(theirs)
    # and dana may not run jobs of membership-analytics' batch model, which yan may
    jobs = open_page(console(token=named["dana"]), "views/jobs.py", batch=BATCH)
    assert f"run-{BATCH}" not in button_keys(jobs)
    assert f"dana may change only models of {X_OWNER}; {BATCH} belongs to {Y_OWNER}." in texts(jobs)
    assert f"run-{BATCH}" in button_keys(open_page(console(token=named["yan"]), "views/jobs.py", batch=BATCH))


def test_a_refusal_of_the_service_shows_its_message(console, named, two_versions, monkeypatch, plane):
    """Should the console offer what the service refuses (here: it cannot tell who is signed in),
    the 403 shows as the service's own words, not a stack trace."""
    from console.client import ControlClient, ControlError

    def unknown(self):
        raise ControlError("no whoami here", status=404)

    monkeypatch.setattr(ControlClient, "whoami", unknown)
    at = open_page(console(token=named["vera"]), "views/model.py", model=REALTIME)
    at.button(key=f"rollback-{REALTIME}").click().run()
    at.button(key=f"rollback-yes-{REALTIME}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert any("Not allowed" in e and "vera holds the role viewer" in e and "needs deployer" in e
               for e in errors), errors
    assert API.get(f"{plane.url}/api/models/{REALTIME}", timeout=10).json()["version"] != "1.0.7"


def test_on_loopback_sign_in_as_someone_else_and_sign_out(console, named, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "token").write_text(TOKEN + "\n")
    at = open_page(console(token=None, state_dir=state), "views/models.py")
    assert "Signed in as **admin — admin**" in sidebar_text(at)
    assert "with this machine's token" in sidebar_text(at)
    at.sidebar.button(key="sign-in-other").click().run()
    assert [t.value for t in at.title] == ["Sign in to modelplane"]
    assert "your token (from your admin, or `modelplane token create`)" in "\n".join(m.value for m in at.markdown)
    assert not at.dataframe
    _sign_in(at, "not-a-token")
    assert any("Token rejected" in e.value for e in at.error)
    _sign_in(at, named["dana"])
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert f"Signed in as **dana — deployer, models of {X_OWNER}**" in sidebar_text(at)
    assert REALTIME in frame_with(at, "Model")["Model"].tolist()
    at.sidebar.button(key="sign-out").click().run()
    assert [t.value for t in at.title] == ["Sign in to modelplane"] and not at.dataframe
    # back to the machine's token, without typing it
    at.button(key="sign-in-local").click().run()
    assert "Signed in as **admin — admin**" in sidebar_text(at)


def test_beyond_loopback_a_named_token_signs_in_and_out(console, named):
    at = console(address="0.0.0.0", token=TOKEN)
    at.run()
    assert [t.value for t in at.title] == ["Sign in to modelplane"]
    assert not [b for b in at.button if b.key == "sign-in-local"]   # never the machine's token here
    _sign_in(at, named["vera"])
    at.run()
    assert "Signed in as **vera — viewer**" in sidebar_text(at)
    at.sidebar.button(key="sign-out").click().run()
    assert [t.value for t in at.title] == ["Sign in to modelplane"] and not at.dataframe


def test_activity_shows_the_audit_trail_with_filters_and_its_chain_check(console, named, plane):
    # a refused rollback, recorded as denied
    r = requests.post(f"{plane.url}/api/models/{REALTIME}/rollback", json={}, timeout=10,
                      headers={"Authorization": f"Bearer {named['vera']}"})
    assert r.status_code == 403, r.text
    at = open_page(console(token=named["vera"]), "views/activity.py")
    assert not at.exception, [e.value for e in at.exception]
    trail = frame_with(at, "Request")
    assert list(trail.columns[:8]) == ["When", "Who", "Role", "Action", "What", "Outcome", "Status", "Request"]
    created = trail[trail["Action"] == "token.create"]
    assert {"vera", "rui", "dana"} <= {w.split("→ ")[-1] for w in created["What"]}
    assert set(created["Who"]) == {"admin"}
    assert not trail["When"].str.contains("T").any()   # local time, not raw ISO
    assert any("Audit chain intact" in s.value and "records" in s.value for s in at.success)
    # filter: who and outcome
    at.text_input(key="audit-who").input("vera").run()
    at.selectbox(key="audit-outcome").select("denied").run()
    trail = frame_with(at, "Request")
    assert len(trail) >= 1 and set(trail["Who"]) == {"vera"} and set(trail["Outcome"]) == {"denied"}
    row = trail.iloc[0]
    assert (row["Action"], row["Status"], row["Role"]) == ("rollback", "403", "viewer")
    assert row["What"].startswith(REALTIME) and row["Request"]
    # filter: since a day (local): today keeps them, tomorrow has none yet
    import datetime as dt
    today = dt.date.today()
    at.date_input(key="audit-since").set_value(today).run()
    assert set(frame_with(at, "Request")["Who"]) == {"vera"}
    at.date_input(key="audit-since").set_value(today + dt.timedelta(days=1)).run()
    assert "No audit records match." in texts(at)
    at.date_input(key="audit-since").set_value(None).run()
    # filter: action and model, then nothing matches
    at.text_input(key="audit-who").input("").run()
    at.selectbox(key="audit-outcome").select("any").run()
    at.selectbox(key="audit-action").select("rollback").run()
    at.text_input(key="audit-model").input(REALTIME).run()
    assert set(frame_with(at, "Request")["Action"]) == {"rollback"}
    at.selectbox(key="audit-action").select("token.revoke").run()
    assert not [f for f in frames(at) if "Request" in f.columns]
    assert "No audit records match." in texts(at)
    # a viewer gets no tokens tab
    assert "Tokens" not in [t.label for t in at.tabs]


def test_an_admin_lists_creates_and_revokes_tokens(console, named, plane):
    at = open_page(console(token=named["ada"]), "views/activity.py")
    assert "Tokens" in [t.label for t in at.tabs]
    listed = frame_with(at, "By").set_index("Name")
    assert listed.loc["dana", "Owner"] == X_OWNER and listed.loc["vera", "Role"] == "viewer"
    at.text_input(key="token-name").input("zoe")
    at.selectbox(key="token-role").select("runner")
    at.text_input(key="token-owner").input(Y_OWNER)
    next(b for b in at.button if b.label == "Create token").click().run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [c.value for c in at.code if str(c.value).startswith("mp_")]
    assert len(shown) == 1, [c.value for c in at.code]
    me = requests.get(f"{plane.url}/api/whoami", headers={"Authorization": f"Bearer {shown[0]}"}, timeout=10)
    assert me.json() == {**me.json(), "name": "zoe", "role": "runner", "owner": Y_OWNER}
    assert any("copy it now" in s.value for s in at.success)
    at.run()   # shown once only
    assert not [c for c in at.code if str(c.value).startswith("mp_")]
    at.selectbox(key="token-revoke-pick").select("zoe")
    at.button(key="token-revoke").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "zoe" not in frame_with(at, "By")["Name"].tolist()
    gone = requests.get(f"{plane.url}/api/whoami", headers={"Authorization": f"Bearer {shown[0]}"}, timeout=10)
    assert gone.status_code == 401


# -- a CSV over the model's max_rows ----------------------------------------------------------

SPLIT_MODEL = "echo-split"


@pytest.fixture(scope="module")
def split_model(plane, tmp_path_factory):
    """The local runtime's echo fixture (score = x) as `echo-split`, limits.max_rows 20, up to 3 replicas."""
    import shutil
    import tarfile

    import yaml

    folder = tmp_path_factory.mktemp("split") / SPLIT_MODEL
    shutil.copytree(ROOT / "tests" / "fixtures" / "local" / "echo", folder)
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest.update(name=SPLIT_MODEL, limits={"max_rows": 20})
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=SPLIT_MODEL)
    r = API.post(f"{plane.url}/api/models", data=buf.getvalue(), timeout=120, headers={"Content-Type": "application/gzip"})
    assert r.status_code == 201, r.text
    yield SPLIT_MODEL
    API.delete(f"{plane.url}/api/models/{SPLIT_MODEL}", timeout=60)


def test_csv_over_max_rows_is_scored_in_chunks_with_progress(console, split_model):
    """70 rows against max_rows 20: four requests (one would be refused, 413), a progress bar,
    every score beside its row in the file's order, and the whole result to download."""
    values = [(i * 37) % 101 / 4 for i in range(70)]
    data = ("x\n" + "".join(f"{v}\n" for v in values)).encode()
    at = open_page(console(), "views/model.py", model=split_model)
    at.file_uploader(key=f"csv-{split_model}").set_value(("big.csv", data, "text/csv"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    scored = frame_with(at, "y")
    assert list(scored["x"].astype(float)) == values
    assert list(scored["y"].astype(float)) == values
    bars = at.get("progress")
    assert bars and "Scored 70 rows in 4 requests" in bars[-1].proto.text
    assert bars[-1].proto.value == 100
    assert "Scored 70 rows of big.csv." in texts(at)
    assert [b for b in at.get("download_button") if "Download scores" in b.proto.label]


def test_csv_over_max_rows_names_the_bad_row_of_the_whole_file(console, split_model):
    values = [str(i) for i in range(70)]
    values[47] = "lots"                          # in the third request
    data = ("x\n" + "".join(f"{v}\n" for v in values)).encode()
    at = open_page(console(), "views/model.py", model=split_model)
    at.file_uploader(key=f"csv-{split_model}").set_value(("bad.csv", data, "text/csv"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("The model rejected bad.csv" in e.value and "rows 41–60 of the file" in e.value for e in at.error)
    problems = frame_with(at, "Error")
    assert list(problems["Value"]) == ["lots"]   # the value found at the row the problem names, in the whole file


def test_split_csv_and_join_keep_rows_and_passthrough_columns_in_order():
    """The console's split keeps quoted newlines inside one row and bounds each body; the join
    keeps the answers' passthrough columns (COMMON decision 1), shown before the score."""
    import csv

    from console.client import join_answers, split_csv
    from console.views.model import scored_table

    rows = [[f"c{i}", f'two\nlines "{i}"' if i % 4 == 0 else str(i)] for i in range(30)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows([["customer_id", "note"], *rows])
    chunks = split_csv(buf.getvalue().encode() + b"\r\n", 7, 120)
    got = []
    for offset, n, body in chunks:
        assert offset == len(got) and 1 <= n <= 7 and len(body) <= 120
        got += list(csv.reader(io.StringIO(body.decode(), newline="")))[1:]
    assert got == rows
    with pytest.raises(ValueError, match="row 2 alone is larger"):
        split_csv(b"x\n1\n" + b"9" * 200 + b"\n", 10, 100)

    answers = [{"model": "m", "version": "1", "scores": [0.5, 0.25], "passthrough": {"customer_id": ["c0", "c1"]}},
               {"model": "m", "version": "1", "scores": [0.75], "passthrough": {"customer_id": ["c2"]}}]
    joined = join_answers(answers)
    assert joined == {"model": "m", "version": "1", "scores": [0.5, 0.25, 0.75],
                      "passthrough": {"customer_id": ["c0", "c1", "c2"]}}
    table = scored_table(pd.DataFrame({"customer_id": ["c0", "c1", "c2"], "x": ["1", "2", "3"]}), joined, "y")
    assert list(table.columns) == ["customer_id", "y", "x"]
    assert table.values.tolist() == [["c0", 0.5, "1"], ["c1", 0.25, "2"], ["c2", 0.75, "3"]]


# -- screens that read well (issue 21) ------------------------------------------------------------

def test_one_time_style_one_number_style_and_a_dash_for_nothing():
    import re

    from console import common

    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", common.fmt_time("2026-12-07T21:03:04Z"))
    assert re.fullmatch(r"\d{2}:\d{2}:\d{2}", common.fmt_time("2026-12-07T21:03:04.123456+00:00", clock=True))
    assert common.fmt_time(None) == common.fmt_time("") == "—" and common.fmt_time("yesterday") == "?"
    assert common.fmt_count(3_000_000) == common.fmt_int(3_000_000) == "3,000,000"
    assert common.fmt_count(None) == common.fmt_count(float("nan")) == "—"
    frame = pd.DataFrame({"Requests": [3_000_000, 12], "Rows": [None, 2_000_000.0], "Error": [None, "x"],
                          "p50 (ms)": [1.25, None]})
    html = common.styled(frame).to_html()
    assert "3,000,000" in html and "2,000,000" in html and "3000000" not in html
    assert "None" not in html and "nan" not in html.lower().replace("span", "")


def test_crash_output_is_one_sentence_then_the_output_once_without_internal_addresses():
    from console import common

    text = ("echo@1.0.1: replica 3 exited with status 1 before it was ready; 3 crashes in a row, so it is not "
            "restarted again (deploy a fix or roll back). Adapter output (tail):\n"
            "adapter for echo@1.0.1 on http://127.0.0.1:41235, model at http://127.0.0.1:39001\n"
            "echo: cannot start\nmodelplane-adapter: model echo@1.0.1 exited with status 4")
    summary, output = common.crash_parts(text)
    assert "\n" not in summary and "cannot start" not in summary and summary.startswith("echo@1.0.1: replica 3")
    assert output.count("echo: cannot start") == 1 and output.count("\n") == 2   # its lines kept
    assert "127.0.0.1" not in summary + output and "(internal address)" in output
    assert len(common.first_line(text, 60)) <= 60
    # the adapter's closing repetition of its model's stderr (already in the output) is dropped
    repeated = text + "; its last stderr lines:\necho: cannot start\n"
    assert common.crash_parts(repeated)[1].count("echo: cannot start") == 1


def test_defaults_pick_the_last_version_that_worked():
    from console import common

    versions = [{"version": "1.0.3", "failed": True}, {"version": "1.0.2", "live": True},
                {"version": "1.0.1", "crashed": True, "crash_error": "x"}, {"version": "1.0.0"}]
    others = ["1.0.1", "1.0.0"]            # what "Roll back to" offers (not the deploy-check failure)
    assert others[common.last_working(versions, others)] == "1.0.0"
    assert others[common.last_working(versions, others, prefer="1.0.1")] == "1.0.0"   # not a broken one
    b = ["1.0.3", "1.0.1", "1.0.0"]        # Compare's Version B beside A = 1.0.2
    assert b[common.last_working(versions, b)] == "1.0.0"
    assert common.last_working([{"version": "2"}, {"version": "1"}], ["2", "1"]) == 0   # the newest that works


def test_activity_charts_have_a_24_hour_axis_and_legends_below(console, plane):
    import json as _json

    r = API.post(f"{plane.url}/models/{REALTIME}/predict", data=sample(REALTIME),
                 headers={"Content-Type": "text/csv"}, timeout=60)
    assert r.status_code == 200, r.text
    at = open_page(console(), "views/activity.py")
    charts = at.get("vega_lite_chart")
    assert charts
    for chart in charts:
        spec = _json.loads(chart.proto.spec)
        layers = [spec] + spec.get("layer", [])
        x = next(layer["encoding"]["x"] for layer in layers if "encoding" in layer)
        assert x["type"] == "temporal" and x["axis"]["format"] == "%H:%M"   # 24-hour, as the footer
        colour = next(layer["encoding"]["color"] for layer in layers if "encoding" in layer)
        assert colour["legend"]["orient"] == "bottom"
    assert "24-hour" in texts(at)


def test_histograms_overlay_in_two_colours_that_do_not_blend():
    from console import common
    from console.comparison import distribution_chart

    report = {"labels": {"a": "1.0.0", "b": "2.0.0"},
              "histogram": {"edges": [0, 0.5, 1], "1.0.0": [3, 7], "2.0.0": [5, 5]}}
    spec = distribution_chart(report).to_dict()
    first, second = spec["layer"]
    assert first["mark"]["type"] == "rect" and first["mark"].get("opacity", 1) < 1   # filled, below
    assert second["mark"]["filled"] is False          # an outline on top: nothing translucent over a fill
    scale = first["encoding"]["color"]["scale"]
    assert scale["range"] == list(common.PAIR) and len(set(common.PAIR)) == 2
    assert first["encoding"]["color"]["legend"]["orient"] == "bottom"



LOCAL_ECHO = ROOT / "tests" / "fixtures" / "local" / "echo"


def _echo(plane, tmp_path: Path, name: str, version: str, *, live: bool, **params) -> None:
    import json as _json
    import shutil
    import tarfile

    folder = tmp_path / f"{name}-{version}" / name
    shutil.copytree(LOCAL_ECHO, folder)
    manifest = folder / "model.yaml"
    manifest.write_text(manifest.read_text().replace("name: echo", f"name: {name}")
                        .replace("version: 1.0.0", f"version: {version}"))
    (folder / "params.json").write_text(_json.dumps({"factor": 1, **params}))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=name)
    r = API.post(f"{plane.url}/api/models", params={"live": str(live).lower()}, data=buf.getvalue(), timeout=120,
                 headers={"Content-Type": "application/gzip"})
    assert r.status_code == 201, r.text


def test_a_crashed_version_is_shown_on_it_and_the_defaults_skip_it(console, plane, tmp_path, seen_by_models):
    """1.0.1 crashes whenever it is called by its own URL (as a comparison does): the model, live on
    1.0.2, shows no "not serving" banner; the version says it crashed, its output once in a code
    block; "Roll back to" and Compare's "Version B" pre-select 1.0.0, the last one that worked."""
    name, flag = "echo-apptest", seen_by_models / "echo-apptest-broken"
    _echo(plane, tmp_path, name, "1.0.0", live=True)
    _echo(plane, tmp_path, name, "1.0.1", live=False, crash_at_start_if=str(flag))
    _echo(plane, tmp_path, name, "1.0.2", live=True)
    flag.touch()
    try:
        deadline = time.monotonic() + 120
        while True:
            versions = API.get(f"{plane.url}/api/models/{name}", timeout=10).json()["versions"]
            if any(v.get("crashed") for v in versions if v["version"] == "1.0.1"):
                break
            assert time.monotonic() < deadline, versions
            try:
                API.post(f"{plane.url}/models/{name}/versions/1.0.1/predict", json={"rows": [{"x": 1}]}, timeout=60)
            except requests.RequestException:
                pass
            time.sleep(0.2)
        at = open_page(console(), "views/model.py", model=name)
        assert not any("not serving" in e.value for e in at.error), [e.value for e in at.error]
        state = frame_with(at, "State").set_index("Version")["State"]
        assert state["1.0.2"] == "● live" and state["1.0.1"] == "✗ crashed: not restarted" and state["1.0.0"] == ""
        assert at.selectbox(key=f"rollback-target-{name}").value == "1.0.0"
        outputs = [c.value for c in at.code if "cannot start" in c.value]
        assert len(outputs) == 1 and "127.0.0.1" not in outputs[0]
        for shown in [e.value for e in at.error] + [w.value for w in at.warning]:
            assert "cannot start: " not in shown   # the output is in the code block, not the banner
        assert not any(ch in texts(at) for ch in ("✅", "❌"))
        at = open_page(console(), "views/compare.py", model=name)
        assert at.selectbox(key=f"cmp-a-{name}").value == "1.0.2"
        assert at.selectbox(key=f"cmp-b-{name}").value == "1.0.0"
        at = open_page(console(), "views/models.py")
        rows = frame_with(at, "Model").set_index("Model")
        assert rows.loc[name, "Status"] != "✕ failed" and rows.loc[name, "Notes"] == ""
    finally:
        flag.unlink(missing_ok=True)
        API.delete(f"{plane.url}/api/models/{name}", timeout=60)


@pytest.mark.parametrize("page", ["views/models.py", "views/activity.py"])
def test_tables_show_a_dash_not_none_where_a_value_is_missing(console, page):
    """Streamlit writes "None" in a missing cell unless told otherwise: every table says "—"."""
    at = open_page(console(), page, model=REALTIME)
    assert at.dataframe, f"{page} shows no table"
    for frame in at.dataframe:
        assert frame.proto.placeholder == "—", page
