"""A model cannot reach the plane's keys: a hostile model, run through the real local runtime
(control service side -> adapter -> model) and the batch adapter, tries to read the token, the
state dir, another model, the user's home and the plane's environment, and to write where it
must not. Each attempt is scored 1 if it worked: every score must be 0."""
from __future__ import annotations

import json
import os
import stat
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from adapters import sandbox
from adapters.manifest import load_manifest
from control.runtime.local import LocalRuntime
from control.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "local"

requires_bwrap = pytest.mark.skipif(sandbox.probe() is not None,
                                    reason=f"no model sandbox here: {sandbox.probe()} (apt-get install bubblewrap)")

# Each probe: (what the model tries, an expression that is 1 if it worked). P holds the paths.
PROBES = [
    ("read the token file", "leaked_read(P['token'])"),
    # only the way to its own folder (and a job's work folder) is there: no token, no records, no logs
    ("list the state dir", "leaked_list(P['state'], allowed={'models', 'work'})"),
    ("list the other models", "leaked_list(os.path.join(P['state'], 'models'), allowed={P['name']})"),
    ("read another model's folder", "leaked_read(P['other'])"),
    ("list the models dir", "leaked_list(P['models_dir'])"),
    ("read a file in the user's home", "leaked_read(P['home_file']) if P['home_file'] else 0"),
    ("read the adapter's $HOME", "leaked_read(P['adapter_home_file'])"),
    ("see the plane's variables in its environment", "leaked_env()"),
    ("keep the user's HOME", "int(os.environ.get('HOME') in (P['adapter_home'], P['pw_home']))"),
    ("read another process's environment", "proc_environ()"),
    ("read the token through the control process's /proc root", "leaked_read(P['proc_root_token'])"),
    ("write into its own folder", "leaked_write(os.path.join(os.getcwd(), 'pwned'))"),
    ("see the machine's /tmp", "int(os.path.exists(P['host_tmp']))"),
]
ENV_PROBES = {"see the plane's variables in its environment", "keep the user's HOME"}

HOSTILE = r'''
import csv, json, os, sys
P = json.loads(%(paths)r)

def leaked_read(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        return 1
    except OSError:
        return 0

def leaked_list(path, allowed=()):
    try:
        return 1 if set(os.listdir(path)) - set(allowed) else 0
    except OSError:
        return 0

def leaked_write(path):
    try:
        with open(path, "a") as f:
            f.write("")
        return 1
    except OSError:
        return 0

def leaked_env():
    bad = [k for k in os.environ if k.startswith(("MODELPLANE", "GOOGLE", "AWS", "STORAGE_EMULATOR", "CLOUDSDK"))
           or k in ("PYTHONPATH", "SECRET_OF_THE_PLANE")]
    return 1 if bad else 0

def proc_environ():
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open("/proc/%%s/environ" %% pid, "rb") as f:
                    if b"MODELPLANE" in f.read():
                        return 1
            except OSError:
                pass
    return 0

RESULTS = [%(probes)s]
try:
    with open(os.path.join("/tmp", P["marker"]), "w") as f:
        f.write("model")
except OSError:
    pass
print("hostile model probes: %%s" %% RESULTS, file=sys.stderr, flush=True)

if os.environ.get("DATASET"):
    RESULTS.append(leaked_write(os.environ["DATASET"]))
    with open(os.environ["DATASET"], newline="") as f:
        rows = list(csv.DictReader(f))
    with open(os.environ["RESULTS"], "w", newline="") as f:
        f.write("y\n")
        for row in rows:
            f.write("%%s\n" %% RESULTS[int(float(row["x"]))])
    sys.exit(0)

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"status": "ok"})

    def do_POST(self):
        rows = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))["rows"]
        self._send(200, {"scores": [RESULTS[int(row["x"])] for row in rows]})

    def log_message(self, *args):
        pass

ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"])), Handler).serve_forever()
'''


def _home_file() -> str:
    """A file in the real home of this user, outside the toolchain a model may need."""
    import pwd

    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    for name in (".bashrc", ".profile", ".gitconfig", ".bash_history"):
        if (home / name).is_file():
            return str(home / name)
    return ""


def hostile_model(tmp_path: Path, kind: str, paths: dict) -> Path:
    folder = tmp_path / "src" / f"hostile-{kind}"
    folder.mkdir(parents=True)
    code = HOSTILE % {"paths": json.dumps(dict(paths, name=f"hostile-{kind}")), "probes": ", ".join(expr for _, expr in PROBES)}
    manifest = {"name": f"hostile-{kind}", "version": "1.0.0", "kind": kind, "language": "python",
                "command": ["python3", "model.py"], "features": [{"name": "x", "type": "number"}],
                "score": {"name": "y", "type": "number"}}
    if kind == "batch":
        manifest["batch"] = {"timeout": "2m"}
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    (folder / "model.py").write_text(code)
    return folder


def leaks(scores: list, names: list[str]) -> list[str]:
    assert len(scores) == len(names), scores
    return [name for name, score in zip(names, scores) if score != 0]


@pytest.fixture
def plane(tmp_path, monkeypatch):
    """What a hostile model is after: the token in the state dir, another model, a models dir,
    credentials in the adapter's HOME and the plane's variables in its environment."""
    home = tmp_path / "home"
    (home / ".config" / "gcloud").mkdir(parents=True)
    (home / ".config" / "gcloud" / "credentials.json").write_text('{"secret": 1}')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MODELPLANE_TOKEN", "token-of-the-plane")
    monkeypatch.setenv("MODELPLANE_ADAPTER_SECRET", "adapter-secret")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(home / ".config" / "gcloud" / "credentials.json"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    models_dir = tmp_path / "models"
    (models_dir / "someone-else").mkdir(parents=True)
    (models_dir / "someone-else" / "model.yaml").write_text("name: someone-else\n")
    state = tmp_path / "state"
    state.mkdir()
    token = state / "token"
    token.write_text("token-of-the-plane\n")
    token.chmod(0o600)
    host_tmp = Path("/tmp") / f"modelplane-host-{uuid.uuid4().hex}"
    host_tmp.write_text("the machine's")
    marker = f"modelplane-model-{uuid.uuid4().hex}"
    paths = {"token": str(token), "state": str(state), "models_dir": str(models_dir),
             "other": str(state / "models" / "echo" / "1.0.0" / "model.yaml"),
             "home_file": _home_file(), "adapter_home": str(home),
             "adapter_home_file": str(home / ".config" / "gcloud" / "credentials.json"),
             "pw_home": os.path.expanduser("~" + os.environ.get("USER", "")) if os.environ.get("USER") else "",
             "proc_root_token": f"/proc/{os.getpid()}/root{token}", "host_tmp": str(host_tmp), "marker": marker}
    import pwd

    paths["pw_home"] = pwd.getpwuid(os.getuid()).pw_dir
    yield paths
    host_tmp.unlink(missing_ok=True)
    (Path("/tmp") / marker).unlink(missing_ok=True)


def runtime(tmp_path: Path, paths: dict, **settings) -> LocalRuntime:
    rt = LocalRuntime(Settings(state_dir=paths["state"], models_dir=paths["models_dir"], start_timeout=30,
                               max_restarts=0, bucket="test-bucket", **settings))
    rt.start()
    rt.deploy(load_manifest(_echo(tmp_path)))   # another model, whose folder the hostile one tries to read
    return rt


def _echo(tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "src" / "echo"
    if not dest.exists():
        shutil.copytree(FIXTURES / "echo", dest)
    return dest


def predict_probes(rt: LocalRuntime, name: str) -> list:
    resp = rt.forward(name, method="POST", path="/predict", headers={"Content-Type": "application/json"},
                      body=json.dumps({"rows": [{"x": i} for i in range(len(PROBES))]}).encode())
    assert resp.status == 200, resp.body
    return json.loads(resp.body)["scores"]


def wait_job(rt: LocalRuntime, job_id: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = rt.job(job_id)
        if job.status in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout:.0f}s")


@requires_bwrap
def test_a_hostile_realtime_model_reaches_nothing_of_the_plane(tmp_path, plane):
    rt = runtime(tmp_path, plane)
    try:
        rt.deploy(load_manifest(hostile_model(tmp_path, "realtime", plane)))
        assert Path(plane["other"]).is_file()   # what it tries to read is there
        assert leaks(predict_probes(rt, "hostile-realtime"), [n for n, _ in PROBES]) == []
        assert not (Path("/tmp") / plane["marker"]).exists()    # its /tmp is its own
        assert not (Path(rt.store.version_dir("hostile-realtime", "1.0.0")) / "pwned").exists()
    finally:
        rt.close()


@requires_bwrap
def test_a_hostile_batch_model_reaches_nothing_of_the_plane_and_state_stays_private(tmp_path, plane):
    dataset = tmp_path / "data.csv"
    dataset.write_text("x\n" + "".join(f"{i}\n" for i in range(len(PROBES) + 1)))
    rt = runtime(tmp_path, plane)
    try:
        rt.deploy(load_manifest(hostile_model(tmp_path, "batch", plane)))
        job, _ = rt.submit_job("hostile-batch", dataset=str(dataset))
        job = wait_job(rt, job.id)
        assert job.status == "succeeded", (job.error, job.log_tail)
        scores = [float(v) for v in Path(job.results_uri).read_text().split()[1:]]
        assert leaks(scores, [n for n, _ in PROBES] + ["write into its dataset"]) == []
        assert not (Path("/tmp") / plane["marker"]).exists()
        assert dataset.read_text().startswith("x\n0\n")
    finally:
        rt.close()
    # nothing under the state dir is readable by anyone but its owner
    state = Path(plane["state"])
    loose = [f"{oct(p.stat().st_mode & 0o777)} {p}" for p in [state, *state.rglob("*")]
             if not p.is_symlink() and p.stat().st_mode & 0o077]
    assert loose == []


def test_environment_is_scrubbed_without_the_sandbox(tmp_path, plane):
    rt = runtime(tmp_path, plane, sandbox="off")
    try:
        rt.deploy(load_manifest(hostile_model(tmp_path, "realtime", plane)))
        names = [n for n, _ in PROBES]
        leaked = leaks(predict_probes(rt, "hostile-realtime"), names)
        assert not set(leaked) & ENV_PROBES, leaked
    finally:
        rt.close()


@requires_bwrap
def test_the_batch_adapter_runs_the_model_in_the_sandbox(tmp_path, plane):
    """`python -m adapters batch` on its own (as `modelplane validate` runs it): same denials."""
    import subprocess

    folder = hostile_model(tmp_path, "batch", plane)
    dataset = tmp_path / "data.csv"
    dataset.write_text("x\n" + "".join(f"{i}\n" for i in range(len(PROBES) + 1)))
    env = dict(os.environ, MODELPLANE_STATE_DIR=plane["state"], MODELPLANE_SANDBOX="on",
               MODELPLANE_SANDBOX_HIDE=plane["models_dir"], PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "adapters", "batch", str(folder), "--dataset", str(dataset),
                           "--results", str(out) + os.sep, "--job", "j1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    scores = [float(v) for v in (out / "scores.csv").read_text().split()[1:]]
    names = [n for n, _ in PROBES] + ["write into its dataset"]
    # the "other model" of this test is the models dir's; there is no deployed one here
    assert leaks(scores, names) == []


def test_a_bad_sandbox_setting_is_named(tmp_path):
    with pytest.raises(sandbox.SandboxError, match="MODELPLANE_SANDBOX='maybe'.*auto, on, off"):
        sandbox.mode({"MODELPLANE_SANDBOX": "maybe"})


def test_sandbox_on_without_bwrap_refuses_the_model_clearly(tmp_path, monkeypatch):
    from adapters import batch

    monkeypatch.setenv("MODELPLANE_SANDBOX", "on")
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, path=None: None if name == "bwrap" else sys.executable)
    manifest = load_manifest(FIXTURES / "scorer")
    with pytest.raises(batch.BatchFailure, match="MODELPLANE_SANDBOX=on but the model sandbox cannot run here: "
                                                 "bwrap .* is not installed"):
        batch.start_model(manifest, tmp_path / "d.csv", tmp_path / "r.csv")


def test_sandbox_on_in_the_runtime_without_bwrap_refuses_models_saying_why(tmp_path, monkeypatch):
    from control.errors import PlaneError

    bin_dir = tmp_path / "bin"   # python3, and no bwrap
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bin_dir))
    rt = LocalRuntime(Settings(state_dir=tmp_path / "state", start_timeout=30, max_restarts=0,
                               bucket="test-bucket", sandbox="on"))
    try:
        assert not rt.sandbox.active and "bwrap (Debian package bubblewrap) is not installed" in rt.sandbox.describe()
        with pytest.raises(PlaneError) as refused:   # its deploy check cannot start it
            rt.deploy(load_manifest(_echo(tmp_path)))
        said = refused.value.message + "\n" + str(refused.value.details.get("log_tail") or "")
        assert "MODELPLANE_SANDBOX=on but the model sandbox cannot run here" in said, said
    finally:
        rt.close()


def test_model_env_is_an_allowlist():
    env = sandbox.model_env({"PORT": "1"}, "/tmp/home", {
        "PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC", "MODELPLANE_TOKEN": "t",
        "MODELPLANE_ADAPTER_SECRET": "s", "MODELPLANE_STORAGE_KEY": "k", "STORAGE_EMULATOR_HOST": "h",
        "GOOGLE_APPLICATION_CREDENTIALS": "c", "AWS_ACCESS_KEY_ID": "a", "PYTHONPATH": "/plane", "HOME": "/no/such/home",
        "USER": "root", "SSH_AUTH_SOCK": "/run/ssh"})
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC", "HOME": "/tmp/home",
                   "PORT": "1"}


def test_the_users_r_and_python_libraries_stay_reachable_through_another_home(tmp_path):
    home = tmp_path / "home"
    (home / "R" / "x86_64-pc-linux-gnu-library" / "4.2").mkdir(parents=True)
    (home / ".local" / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (home / ".local" / "share" / "keyrings").mkdir(parents=True)
    environ = {"HOME": str(home), "PATH": "/usr/bin"}
    env = sandbox.model_env({}, "/tmp/home", environ)
    assert env["R_LIBS_USER"] == f"{home}/R/%p-library/%v" and env["PYTHONUSERBASE"] == f"{home}/.local"
    argv = sandbox.bwrap_argv("bwrap", ["true"], str(tmp_path), environ=environ)
    shown = {argv[i + 1] for i, a in enumerate(argv) if a in ("--ro-bind", "--bind")}
    assert {str(home / "R"), str(home / ".local" / "lib")} <= shown
    assert not any(p.startswith(str(home / ".local" / "share")) for p in shown)


def test_the_operator_may_pass_more_names_but_never_the_planes_or_credentials():
    env = sandbox.model_env({}, "/h", {
        "MODELPLANE_MODEL_ENV": "R_LIBS_SITE, MODELPLANE_TOKEN,aws_secret_access_key,GOOGLE_APPLICATION_CREDENTIALS,"
                                "PYTHONPATH",
        "R_LIBS_SITE": "/opt/r", "MODELPLANE_TOKEN": "t", "aws_secret_access_key": "a",
        "GOOGLE_APPLICATION_CREDENTIALS": "c", "PYTHONPATH": "/plane", "PATH": "/bin", "HOME": "/no/such/home"})
    assert env == {"PATH": "/bin", "HOME": "/h", "R_LIBS_SITE": "/opt/r"}


def test_state_dir_modes_are_private(tmp_path):
    """Files the runtime writes are 0600 and folders 0700, whatever the umask it was started with."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "old.log").write_text("x")
    (state / "old.log").chmod(0o644)
    dataset = tmp_path / "d.csv"
    dataset.write_text("x\n1\n2\n")
    rt = LocalRuntime(Settings(state_dir=state, bucket="test-bucket"))
    try:
        rt.deploy(load_manifest(_echo(tmp_path)))
        rt.deploy(load_manifest(FIXTURES / "scorer"))
        job, _ = rt.submit_job("scorer", dataset=str(dataset), event_key="b/incoming/scorer/d.csv#1", trigger="event")
        assert wait_job(rt, job.id).status == "succeeded"
        assert (state / "jobs" / "event-keys.log").is_file()
        assert predict_scores(rt, "echo", [{"x": 2}]) == [2]   # a replica's logs too
    finally:
        rt.close()
    loose = [f"{oct(stat.S_IMODE(p.stat().st_mode))} {p}" for p in [state, *state.rglob("*")]
             if not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert loose == []


def predict_scores(rt: LocalRuntime, name: str, rows: list[dict]) -> list:
    resp = rt.forward(name, method="POST", path="/predict", headers={"Content-Type": "application/json"},
                      body=json.dumps({"rows": rows}).encode())
    assert resp.status == 200, resp.body
    return json.loads(resp.body)["scores"]
