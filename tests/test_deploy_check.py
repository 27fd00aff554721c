"""A deploy cannot break a working model: a new version takes traffic only once it has started,
become ready and scored its sample (as `modelplane validate` does); otherwise the deploy is a
422 with the reason and the tail of its log, the live version keeps serving untouched, and the
failed version is recorded as failed and never takes a request.

Real control service (front door + API), real adapter and model processes, real HTTP. Every
wait polls a condition with a deadline.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from control.cli import main
from control.errors import Conflict
from control_helpers import TOKEN, api, running, settings_for, token_file, wait_until
from test_local_runtime import make_model
from test_rollout import tar_of

SCALING = {"min": 0, "max": 2, "target_concurrency": 8, "idle_timeout": "60s"}
SAMPLE = "x\n1\n2\n3\n"


def echo(tmp_path: Path, version: str, *, fixture: str = "echo", **params) -> Path:
    """The echo fixture (score = x * factor) with a sample, as version `version`."""
    folder = make_model(tmp_path, fixture, name="echo", version=version, scaling=SCALING, sample="sample.csv",
                        params={"factor": 1, **params} if fixture == "echo" else None)
    (folder / "sample.csv").write_text(SAMPLE)
    return folder


def post_deploy(server, folder: Path, *, live: bool = True):
    return api.post(f"{server.url}/api/models", params={"live": str(live).lower()}, data=tar_of(folder),
                    headers={"Content-Type": "application/gzip"}, timeout=120)


class Poller:
    """Predicts in a thread, one after another, recording every answer, until stopped."""

    def __init__(self, server):
        self.server = server
        self.answers: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = api.post(f"{self.server.url}/models/echo/predict", json={"rows": [{"x": 2}]}, timeout=30)
                self.answers.append((r.status_code, r.text))
            except Exception as e:  # noqa: BLE001 — a failure is what the test looks for
                self.answers.append((0, repr(e)))

    def __enter__(self) -> "Poller":
        self._thread.start()
        wait_until(lambda: len(self.answers) >= 3, 60, what="the first predicts")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def processes_of(state_dir: Path, version: str) -> list[int]:
    """Pids of echo `version`: processes whose command line names its frozen folder or that run
    in it (the model), or that write to one of its replica logs (the adapter, which may have
    been a spare started before it knew its folder)."""
    state = Path(state_dir).resolve()
    frozen = str(state / "models" / "echo" / version)
    logs = str(state / "logs" / "replicas" / "echo" / f"{version}-")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
            fds = []
            for fd in os.listdir(f"/proc/{entry}/fd"):
                try:
                    fds.append(os.readlink(f"/proc/{entry}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            continue
        if frozen in cmdline or cwd.startswith(frozen) or any(t.startswith(logs) for t in fds):
            pids.append(int(entry))
    return pids


def model(server) -> dict:
    r = api.get(f"{server.url}/api/models/echo")
    assert r.status_code == 200, r.text
    return r.json()


BROKEN = {
    # what is wrong with 2.0.0, how to build it, and what the 422 and the log tail must say
    "crashes at start": (lambda tmp: echo(tmp, "2.0.0", fixture="broken"),
                         "exited with status", "cannot load params.json"),
    "scores its sample wrongly": (lambda tmp: echo(tmp, "2.0.0", factor=2, drop_one=True),
                                  "answered 502: model echo answered 2 score(s) for 3 row(s)", "model echo is ready"),
    "never becomes ready": (lambda tmp: echo(tmp, "2.0.0", factor=2, never_ready=True),
                            "was not ready within 3s", "started model echo@2.0.0"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_version_is_refused_and_the_live_one_keeps_every_request(tmp_path, case):
    build, reason, in_log = BROKEN[case]
    settings = settings_for(tmp_path, deploy_check_timeout=3)
    with running(settings) as server:
        r = post_deploy(server, echo(tmp_path, "1.0.0"))
        assert r.status_code == 201 and r.json()["live"] is True, r.text
        with Poller(server) as poller:
            r = post_deploy(server, build(tmp_path))
            n_during = len(poller.answers)
            wait_until(lambda: len(poller.answers) >= n_during + 3, 60, what="predicts after the deploy")
        # 422: the reason, and the tail of the model's log
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["version"] == "2.0.0" and reason in body["reason"], body
        assert "2.0.0 failed its deploy check, so 1.0.0 stays live" in body["error"]
        assert in_log in body["log_tail"], body["log_tail"]
        # every predict, before, during and after, answered by 1.0.0
        assert poller.answers and all(status == 200 for status, _ in poller.answers), \
            [a for a in poller.answers if a[0] != 200][:3]
        assert all('"version":"1.0.0"' in text.replace(" ", "") for _, text in poller.answers)
        # 1.0.0 is live and takes every request; 2.0.0 is listed as failed, with why
        detail = model(server)
        assert detail["version"] == "1.0.0" and detail["status"] != "failed"
        assert [(t["version"], t["percent"]) for t in detail["traffic"]["targets"]] == [("1.0.0", 100)]
        versions = {v["version"]: v for v in detail["versions"]}
        assert versions["2.0.0"]["failed"] is True and versions["2.0.0"]["live"] is False
        assert reason in versions["2.0.0"]["error"] and in_log in versions["2.0.0"]["error"]
        assert versions["1.0.0"]["failed"] is False and versions["1.0.0"]["live"] is True
        # nothing of 2.0.0 keeps running
        assert not processes_of(settings.state_dir, "2.0.0")
        assert len(processes_of(settings.state_dir, "1.0.0")) >= 2   # 1.0.0's adapter and model do run
        # and it never takes traffic: no rollout, no rollback to it, not even by its own URL
        r = api.post(f"{server.url}/api/models/echo/rollout", json={"version": "2.0.0", "percent": 10})
        assert r.status_code == 409 and "failed its deploy check" in r.json()["error"], r.text
        r = api.post(f"{server.url}/api/models/echo/rollback", json={"version": "2.0.0"})
        assert r.status_code == 409 and "failed its deploy check" in r.json()["error"], r.text
        r = api.post(f"{server.url}/models/echo/versions/2.0.0/predict", json={"rows": [{"x": 1}]})
        assert r.status_code == 409, r.text
        assert model(server)["version"] == "1.0.0"
        assert not processes_of(settings.state_dir, "2.0.0")


def test_the_cli_says_why_and_shows_the_log_tail(tmp_path, monkeypatch, capsys):
    settings = settings_for(tmp_path, deploy_check_timeout=3)
    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)
    with running(settings) as server:
        flags = ["--url", server.url, "--token-file", token_file(TOKEN)]
        assert main(["deploy", str(echo(tmp_path, "1.0.0")), *flags]) == 0
        assert main(["deploy", str(echo(tmp_path, "2.0.0", fixture="broken")), *flags]) == 1
        err = capsys.readouterr().err
        assert "echo 2.0.0 failed its deploy check, so 1.0.0 stays live: it exited with status" in err
        assert "its log ends with:" in err and "cannot load params.json" in err
        assert main(["status", "echo", *flags]) == 0
        text = capsys.readouterr().out
        assert "2.0.0 failed its deploy check (it takes no traffic):" in text and "cannot load params.json" in text
        assert re.search(r"^2\.0\.0\s+\S+\s+failed$", text, re.M) and re.search(r"^1\.0\.0\s+\S+\s+live$", text, re.M)


def test_a_fixed_deploy_of_the_same_version_is_checked_again(tmp_path, seen_by_models):
    """The same content is checked again (the failure may have been the machine's), and made
    live when it passes; different content under a failed version number is still a Conflict."""
    settings = settings_for(tmp_path, deploy_check_timeout=3)
    flag = seen_by_models / "not-yet"
    flag.touch()
    with running(settings) as server:
        assert post_deploy(server, echo(tmp_path, "1.0.0")).status_code == 201
        folder = echo(tmp_path, "2.0.0", factor=2, crash_at_start_if=str(flag))
        assert post_deploy(server, folder).status_code == 422
        flag.unlink()
        r = post_deploy(server, folder)
        assert r.status_code == 201 and r.json()["live"] is True and r.json()["failed"] is False, r.text
        assert api.post(f"{server.url}/models/echo/predict", json={"rows": [{"x": 2}]}).json()["scores"] == [4]


def test_a_new_models_first_version_that_fails_is_not_deployed(tmp_path):
    settings = settings_for(tmp_path, deploy_check_timeout=3)
    with running(settings) as server:
        r = post_deploy(server, echo(tmp_path, "1.0.0", fixture="broken"))
        assert r.status_code == 422 and "so it was not deployed" in r.json()["error"], r.text
        # listed as failed, with why; nothing of it runs, nothing answers for it
        listed = {m["name"]: m for m in api.get(f"{server.url}/api/models").json()}
        assert listed["echo"]["status"] == "failed" and "exited with status" in listed["echo"]["error"]
        assert "cannot load params.json" in listed["echo"]["error"]   # with the tail of its log
        assert not processes_of(settings.state_dir, "1.0.0")
        assert api.post(f"{server.url}/models/echo/predict", json={"rows": [{"x": 1}]}).status_code == 404
        # a good first version then deploys as usual
        assert post_deploy(server, echo(tmp_path, "1.0.1")).status_code == 201
        assert api.post(f"{server.url}/models/echo/predict", json={"rows": [{"x": 2}]}).json()["scores"] == [2]


def test_a_version_deployed_beside_the_live_one_is_checked_too_and_scales_to_zero(tmp_path):
    """`live=false` checks the version as well (a rollout must find it sound); once checked it
    keeps no replica: it scales from its own traffic, from zero."""
    settings = settings_for(tmp_path, deploy_check_timeout=3)
    with running(settings) as server:
        assert post_deploy(server, echo(tmp_path, "1.0.0")).status_code == 201
        r = post_deploy(server, echo(tmp_path, "1.1.0", factor=2, drop_one=True), live=False)
        assert r.status_code == 422 and "answered 2 score(s) for 3 row(s)" in r.json()["error"]
        r = post_deploy(server, echo(tmp_path, "1.2.0", factor=3), live=False)
        assert r.status_code == 201 and r.json()["live"] is False

        def replicas():
            return {t["version"]: t.get("replicas") for t in model(server)["traffic"]["targets"]}

        r = api.post(f"{server.url}/api/models/echo/rollout", json={"version": "1.2.0", "percent": 0})
        assert r.status_code == 200, r.text
        wait_until(lambda: replicas() == {"1.0.0": 0, "1.2.0": 0}, 30, what="both versions at zero")
        assert model(server)["status"] == "idle"


def test_a_batch_version_that_fails_its_sample_is_refused_and_the_live_one_keeps_the_jobs(tmp_path):
    settings = settings_for(tmp_path, deploy_check_timeout=30)
    fixtures = Path(__file__).resolve().parent / "fixtures"
    good = tmp_path / "src" / "sum-1"
    import shutil

    shutil.copytree(fixtures / "control" / "sum-batch", good)
    bad = tmp_path / "src" / "sum-2"
    shutil.copytree(good, bad)
    (bad / "model.yaml").write_text((bad / "model.yaml").read_text().replace("version: 1.0.0", "version: 2.0.0"))
    # 2.0.0 writes one score fewer than it was given rows
    (bad / "score.py").write_text((bad / "score.py").read_text().replace(
        "    for row in csv.DictReader(src):\n", "    for row in list(csv.DictReader(src))[1:]:\n"))
    with running(settings) as server:
        assert post_deploy(server, good).status_code == 201
        r = post_deploy(server, bad)
        assert r.status_code == 422, r.text
        assert "sum-batch 2.0.0 failed its deploy check, so 1.0.0 stays live: batch run failed" in r.json()["error"]
        detail = api.get(f"{server.url}/api/models/sum-batch").json()
        assert detail["version"] == "1.0.0"
        assert {v["version"]: v["failed"] for v in detail["versions"]} == {"1.0.0": False, "2.0.0": True}
        dataset = tmp_path / "in.csv"
        dataset.write_text("a,b\n1,2\n")
        with pytest.raises(Conflict, match="failed its deploy check"):
            server.plane.runtime.submit_job("sum-batch", dataset=str(dataset), version="2.0.0")
        job, _ = server.plane.runtime.submit_job("sum-batch", dataset=str(dataset))
        assert job.version == "1.0.0"


# -- rollback walks back through the live history ------------------------------------------

def test_the_history_walk():
    from control.runtime.base import LIVE_HISTORY, made_live, rolled_back_to, walk_back

    past = []
    for old, new in ((None, "1"), ("1", "2"), ("2", "3")):
        past = made_live(past, old, new)
    assert past == ["1", "2"]
    # 3 -> 2 -> 1, then nothing earlier; the version left is never returned to
    target, past = walk_back(past, "3", lambda v: True)
    assert (target, past) == ("2", ["1"])
    target, past = walk_back(past, "2", lambda v: True)
    assert (target, past) == ("1", [])
    assert walk_back(past, "1", lambda v: True) == (None, [])
    # a version that failed (or is gone) is skipped
    assert walk_back(["1", "2"], "3", lambda v: v != "2") == ("1", [])
    assert walk_back(["2"], "3", lambda v: v != "2") == (None, ["2"])
    # a rollback naming a version in the history forgets what came after it; any other is a step forward
    assert rolled_back_to(["1", "2", "3"], "4", "2") == ["1"]
    assert rolled_back_to(["1"], "2", "5") == ["1", "2"]
    # the same version live twice is remembered once, where it was last; the history is bounded
    assert made_live(["1", "2"], "3", "1") == ["2", "3"]
    past = []
    for i in range(3 * LIVE_HISTORY):
        past = made_live(past, str(i), str(i + 1))
    assert len(past) == LIVE_HISTORY and past[-1] == str(3 * LIVE_HISTORY - 1)


def test_rollback_twice_goes_back_twice_skipping_failed_versions(tmp_path, monkeypatch, capsys):
    settings = settings_for(tmp_path, deploy_check_timeout=3)
    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)

    def live():
        return api.post(f"{server.url}/models/echo/predict", json={"rows": [{"x": 1}]}).json()["version"]

    with running(settings) as server:
        flags = ["--url", server.url, "--token-file", token_file(TOKEN)]
        for version, factor in (("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 3)):
            assert post_deploy(server, echo(tmp_path, version, factor=factor)).status_code == 201
        assert live() == "3.0.0"
        assert api.get(f"{server.url}/api/models/echo/traffic").json()["previous"] == "2.0.0"
        # 3.0.0 -> 2.0.0
        assert main(["rollback", "echo", *flags]) == 0
        assert live() == "2.0.0"
        assert api.get(f"{server.url}/api/models/echo/traffic").json()["previous"] == "1.0.0"
        # the second rollback goes further back, not to 3.0.0
        assert main(["rollback", "echo", *flags]) == 0
        assert live() == "1.0.0"
        capsys.readouterr()
        # and then there is nothing earlier: said clearly, nothing changes
        assert main(["rollback", "echo", *flags]) == 1
        err = capsys.readouterr().err
        assert "no earlier live version to return to" in err and "(409)" in err
        assert live() == "1.0.0"
        # naming a version still works, forward too; then a rollback returns to the one left
        assert main(["rollback", "echo", "3.0.0", *flags]) == 0
        assert live() == "3.0.0"
        assert main(["rollback", "echo", *flags]) == 0
        assert live() == "1.0.0"
        # a version that failed its check is never in the history: 4.0.0 -> 1.0.0, past 3.5.0
        assert post_deploy(server, echo(tmp_path, "3.5.0", fixture="broken")).status_code == 422
        assert post_deploy(server, echo(tmp_path, "4.0.0", factor=4)).status_code == 201
        assert main(["rollback", "echo", *flags]) == 0
        assert live() == "1.0.0"


def test_the_live_history_survives_a_restart_and_skips_a_version_that_failed(tmp_path):
    from adapters.manifest import load_manifest
    from control.runtime.local import LocalRuntime
    from control.runtime.base import DeployCheckFailed

    settings = settings_for(tmp_path, deploy_check_timeout=3)
    with LocalRuntime(settings) as rt:
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            rt.deploy(load_manifest(echo(tmp_path, version)))
        with pytest.raises(DeployCheckFailed):
            rt.deploy(load_manifest(echo(tmp_path, "4.0.0", fixture="broken")))
        assert rt.traffic("echo").past == ["1.0.0", "2.0.0"]
    with LocalRuntime(settings) as rt:
        assert rt.rollback("echo").version == "2.0.0"
    with LocalRuntime(settings) as rt:
        t = rt.traffic("echo")
        assert (t.live, t.previous, t.past) == ("2.0.0", "1.0.0", ["1.0.0"])
        assert [(v.version, v.failed) for v in rt.model("echo").versions] == [
            ("4.0.0", True), ("3.0.0", False), ("2.0.0", False), ("1.0.0", False)]


def test_the_cluster_runtime_reads_and_walks_the_same_history():
    """The Knative runtime keeps the history in the Service's traffic annotation: an annotation
    from before it (one `previous`) still gives one step back, and the newest revision that
    Knative could not make Ready is skipped."""
    import json as json_

    from control.runtime import knative
    from control.runtime import knative_objects as ko

    history = {v: {"revision": f"m-{v.replace('.', '-')}"} for v in ("1.0.0", "2.0.0", "3.0.0", "4.0.0")}

    def svc(traffic: dict, status: dict | None = None) -> dict:
        return {"metadata": {"annotations": {ko.ANN_TRAFFIC: json_.dumps(traffic)}}, "status": status or {},
                "spec": {"template": {"metadata": {}}}}

    old = knative._traffic_state(svc({"live": "2.0.0", "previous": "1.0.0"}), history)
    assert (old.live, old.previous, old.past) == ("2.0.0", "1.0.0", ["1.0.0"])
    state = knative._traffic_state(svc({"live": "3.0.0", "past": ["1.0.0", "2.0.0", "9.9.9"]}), history)
    assert (state.previous, state.past) == ("2.0.0", ["1.0.0", "2.0.0"])   # a version no longer there is dropped
    moved = knative._made_live(state, "4.0.0")
    assert moved.past == ["1.0.0", "2.0.0", "3.0.0"]
    assert json_.loads(knative._traffic_json(moved))["past"] == ["1.0.0", "2.0.0", "3.0.0"]
    failed = {"latestCreatedRevisionName": "m-2-0-0", "latestReadyRevisionName": "m-3-0-0",
              "conditions": [{"type": "ConfigurationsReady", "status": "False"}]}
    skipping = knative._traffic_state(svc({"live": "3.0.0", "past": ["1.0.0", "2.0.0"]}, failed), history)
    assert skipping.previous == "1.0.0"


# -- remove asks first ----------------------------------------------------------------------

class _Terminal:
    """stdin as a terminal where the user types `text`."""

    def __init__(self, text: str):
        self._lines = [text + "\n"]

    def isatty(self) -> bool:
        return True

    def readline(self, *args) -> str:
        return self._lines.pop(0) if self._lines else ""


class _Pipe(_Terminal):
    def isatty(self) -> bool:
        return False


def test_remove_shows_what_goes_and_asks_first(tmp_path, monkeypatch, capsys):
    settings = settings_for(tmp_path, deploy_check_timeout=3)
    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)
    with running(settings) as server:
        flags = ["--url", server.url, "--token-file", token_file(TOKEN)]
        assert post_deploy(server, echo(tmp_path, "1.0.0")).status_code == 201
        assert post_deploy(server, echo(tmp_path, "1.1.0", factor=2), live=False).status_code == 201
        assert api.post(f"{server.url}/api/models/echo/rollout", json={"version": "1.1.0", "percent": 10}).ok

        def still_there() -> bool:
            return api.get(f"{server.url}/api/models/echo").status_code == 200

        # not a terminal, no --yes: refused, nothing deleted
        monkeypatch.setattr("sys.stdin", _Pipe("echo"))
        assert main(["remove", "echo", *flags]) == 1
        captured = capsys.readouterr()
        assert "stdin is not a terminal, so pass --yes" in captured.err and still_there()
        # what would go is shown first: every version, the live one and the one taking a share
        assert "deletes it and all 2 of its version(s)" in captured.out
        assert re.search(r"^1\.0\.0\s+\S+\s+live, takes 90% of requests$", captured.out, re.M), captured.out
        assert re.search(r"^1\.1\.0\s+\S+\s+rollout, takes 10% of requests$", captured.out, re.M), captured.out
        # on a terminal: the name must be typed back
        monkeypatch.setattr("sys.stdin", _Terminal("ech"))
        assert main(["remove", "echo", *flags]) == 1
        assert "not removed" in capsys.readouterr().err and still_there()
        monkeypatch.setattr("sys.stdin", _Terminal(""))
        assert main(["remove", "echo", *flags]) == 1 and still_there()
        monkeypatch.setattr("sys.stdin", _Terminal("echo"))
        assert main(["remove", "echo", *flags]) == 0
        assert "removed echo" in capsys.readouterr().out and not still_there()
        # --yes: no question, even without a terminal
        assert post_deploy(server, echo(tmp_path, "1.0.1")).status_code == 201
        monkeypatch.setattr("sys.stdin", _Pipe(""))
        assert main(["remove", "echo", "--yes", *flags]) == 0 and not still_there()
        # an unknown model: said so, nothing asked
        assert main(["remove", "nope", "--yes", *flags]) == 1
        assert "no model named 'nope'" in capsys.readouterr().err


# -- the console ----------------------------------------------------------------------------

def test_the_console_marks_a_failed_version_and_never_offers_it_for_rollback(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    config.set_option("server.address", "127.0.0.1")   # served on loopback: it acts with the plane's token

    settings = settings_for(tmp_path, deploy_check_timeout=3)
    with running(settings) as server:
        assert post_deploy(server, echo(tmp_path, "1.0.0")).status_code == 201
        assert post_deploy(server, echo(tmp_path, "1.1.0", factor=2)).status_code == 201
        assert post_deploy(server, echo(tmp_path, "2.0.0", fixture="broken")).status_code == 422
        monkeypatch.setenv("MODELPLANE_URL", server.url)
        monkeypatch.setenv("MODELPLANE_TOKEN", TOKEN)
        monkeypatch.setenv("MODELPLANE_STATE_DIR", str(tmp_path / "no-state"))
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "console" / "app.py"), default_timeout=90)
        at.run()
        at.switch_page("views/model.py")
        at.query_params.update(model="echo")
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        table = next(d.value for d in at.dataframe if "State" in d.value.columns).set_index("Version")
        assert table.loc["2.0.0", "State"] == "✗ failed its deploy check"
        assert table.loc["1.1.0", "State"] == "● live"
        assert any("Why 2.0.0 failed its deploy check" in e.label for e in at.expander)
        assert at.selectbox(key="rollback-target-echo").options == ["1.0.0"]


def test_a_sample_that_does_not_fit_the_features_is_named_and_nothing_is_started(tmp_path):
    from adapters.manifest import load_manifest
    from control.runtime.base import DeployCheckFailed
    from control.runtime.local import LocalRuntime

    with LocalRuntime(settings_for(tmp_path, deploy_check_timeout=3)) as rt:
        rt.deploy(load_manifest(echo(tmp_path, "1.0.0")))
        folder = echo(tmp_path, "2.0.0")
        (folder / "sample.csv").write_text("y\n1\n")
        with pytest.raises(DeployCheckFailed) as err:
            rt.deploy(load_manifest(folder))
        assert "sample.csv" in err.value.message and "x" in err.value.details["reason"], err.value.message
        assert rt.traffic("echo").live == "1.0.0"
        assert not list((Path(rt.state_dir) / "logs" / "replicas" / "echo").glob("2.0.0-*.log"))
