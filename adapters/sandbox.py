"""Running a model's own process with nothing of the plane's: a scrubbed environment and, where
bubblewrap works, a sandbox that cannot see the state dir, other models or the user's home.

A model gets, of the adapter's environment, only an allowlist (`ALLOWED`, `ALLOWED_PREFIXES`,
and the names an operator lists in MODELPLANE_MODEL_ENV, minus `DENIED`) plus the variables of
the model process contract (PORT/HOST, DATASET/RESULTS): never
MODELPLANE_* (the token, the adapter's and the bucket's secrets), credentials (GOOGLE_*, AWS_*,
STORAGE_EMULATOR_HOST) or the plane's PYTHONPATH. HOME is a private, empty folder.

The sandbox (`bwrap`, Debian package `bubblewrap`, unprivileged user namespaces) gives the model:
a read-only view of the system; fresh /dev, /proc (its own pid namespace: no /proc/PID/environ or
/proc/PID/root of the plane's processes) and /tmp; an empty tmpfs over the user's home, the state
dir and the other paths the runtime names (MODELPLANE_SANDBOX_HIDE); then, bound back, its own
folder read-only, a batch job's dataset read-only and its results folder writable, and the
toolchain on PATH that lives under a hidden folder (a pyenv or a virtualenv in the home) read-only.
The user's R and Python package libraries (~/R, ~/.local/lib) stay readable, named by
R_LIBS_USER/PYTHONUSERBASE, since HOME is not the user's. It shares the network namespace: a
realtime model listens on loopback for its adapter.

MODELPLANE_SANDBOX: `auto` (default: the sandbox when bwrap works here, probed once per process;
in a container image there is none and the pod is the sandbox), `on` (refuse to start a model
without it) or `off` (environment scrubbing only).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from adapters.procs import descendants

MODE_ENV = "MODELPLANE_SANDBOX"
HIDE_ENV = "MODELPLANE_SANDBOX_HIDE"  # os.pathsep-separated paths a model must not see (the runtime's)
MODES = ("auto", "on", "off")
CHECKED_ENV = "MODELPLANE_SANDBOX_CHECKED"  # "1": the runtime probed bwrap and it works (set with `on`)

#: What a model may have of the adapter's environment (names, then prefixes).
ALLOWED = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"})
ALLOWED_PREFIXES = ("LC_",)

PASS_ENV = "MODELPLANE_MODEL_ENV"  # comma-separated further names the operator passes on to models
#: Never passed on, whatever PASS_ENV says: the plane's own variables and cloud credentials.
DENIED_PREFIXES = ("MODELPLANE_", "GOOGLE_", "GCLOUD", "CLOUDSDK_", "AWS_", "AZURE_", "STORAGE_EMULATOR")
DENIED = frozenset({"HOME", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "LD_PRELOAD", "LD_LIBRARY_PATH",
                    "SSH_AUTH_SOCK", "KUBECONFIG", "DOCKER_CONFIG"})

HOME_IN_SANDBOX = "/tmp/home"
#: Sockets of daemons that act for whoever may connect (a container engine is root for its group).
DAEMON_SOCKETS = ("/run/docker.sock", "/var/run/docker.sock", "/run/containerd/containerd.sock",
                  "/run/podman/podman.sock", "/run/dbus/system_bus_socket")


class SandboxError(RuntimeError):
    """The sandbox setting is wrong, or it is required and cannot run here; the message says which."""


def mode(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    value = (environ.get(MODE_ENV) or "auto").strip().lower()
    if value not in MODES:
        raise SandboxError(f"{MODE_ENV}={environ.get(MODE_ENV)!r}: expected one of {', '.join(MODES)}")
    return value


_probed: dict[str, str | None] = {}


def probe(bwrap: str | None = None) -> str | None:
    """None if bubblewrap runs a sandbox like a model's here, else why not (once per process)."""
    bwrap = bwrap or shutil.which("bwrap")
    if not bwrap:
        return "bwrap (Debian package bubblewrap) is not installed"
    if bwrap not in _probed:
        try:
            r = subprocess.run([bwrap, *_base_args(), "--", "true"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10)
            _probed[bwrap] = None if r.returncode == 0 else \
                (r.stderr.decode(errors="replace").strip() or f"bwrap exited with status {r.returncode}")
        except (OSError, subprocess.TimeoutExpired) as e:
            _probed[bwrap] = f"bwrap could not run: {e}"
    return _probed[bwrap]


@dataclass(frozen=True)
class State:
    """What a model started now runs in: `mode` asked, `active` or not, and why not."""

    mode: str
    active: bool
    reason: str = ""

    def describe(self) -> str:
        if self.active:
            return "bubblewrap (models see only their own folder; environment scrubbed)"
        if self.mode == "on":
            return f"required but unavailable: {self.reason}"
        why = "MODELPLANE_SANDBOX=off" if self.mode == "off" else self.reason
        return f"off ({why}); environment scrubbed"

    def to_json(self) -> dict:
        return {"mode": self.mode, "active": self.active, "reason": self.reason, "describe": self.describe()}


def state(environ: Mapping[str, str] | None = None) -> State:
    """The sandbox setting resolved on this machine (raises SandboxError for a bad value)."""
    environ = os.environ if environ is None else environ
    m = mode(environ)
    if m == "off":
        return State(m, False)
    if m == "on" and environ.get(CHECKED_ENV) == "1" and shutil.which("bwrap"):
        return State(m, True)   # the runtime that started this adapter probed it: no bwrap run per cold start
    reason = probe()
    return State(m, reason is None, reason or "")


# -- the environment --------------------------------------------------------------------------

def model_env(contract: Mapping[str, str], home: str, environ: Mapping[str, str] | None = None) -> dict:
    """The allowlisted part of `environ` (with the names MODELPLANE_MODEL_ENV adds, never the
    plane's or a cloud's credentials), HOME=`home`, and the contract's variables."""
    environ = os.environ if environ is None else environ
    passed = {n.strip() for n in (environ.get(PASS_ENV) or "").split(",") if n.strip()}
    passed = {n for n in passed if n.upper() not in DENIED and not n.upper().startswith(DENIED_PREFIXES)}
    env = {k: v for k, v in environ.items() if k in ALLOWED or k.startswith(ALLOWED_PREFIXES) or k in passed}
    env.setdefault("PATH", os.defpath)
    env["HOME"] = home
    env.update(user_libraries(environ)[0])
    env.update({k: str(v) for k, v in contract.items()})
    return env


def user_libraries(environ: Mapping[str, str]) -> tuple[dict, list[str]]:
    """The user's own R and Python package libraries, which R and Python find through HOME (a
    model's HOME is another): the variables that name them, and the folders to show read-only.
    Only libraries: `~/R` (R_LIBS_USER's default root) and `~/.local/lib` (the user site)."""
    env: dict[str, str] = {}
    paths: list[str] = []
    home = environ.get("HOME") or _pw_home()
    if not home:
        return env, paths
    r_root = os.path.join(home, "R")
    if os.path.isdir(r_root):
        env["R_LIBS_USER"] = os.path.join(r_root, "%p-library", "%v")   # R's own default, from the real HOME
        paths.append(r_root)
    local_lib = os.path.join(home, ".local", "lib")
    if os.path.isdir(local_lib):
        env["PYTHONUSERBASE"] = os.path.join(home, ".local")
        paths.append(local_lib)
    return env, paths


# -- the sandbox ------------------------------------------------------------------------------

def _base_args() -> list[str]:
    return ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-all", "--share-net", "--die-with-parent", "--new-session"]


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def hidden_paths(environ: Mapping[str, str] | None = None) -> list[str]:
    """What a sandboxed model must not see beyond /tmp: homes, the state dir, the runtime's list."""
    environ = os.environ if environ is None else environ
    paths = []
    for p in (environ.get("HOME"), os.path.expanduser("~"), _pw_home(), environ.get("MODELPLANE_STATE_DIR"),
              environ.get("XDG_RUNTIME_DIR"), f"/run/user/{os.getuid()}",   # the session's agents and keyrings
              *(environ.get(HIDE_ENV) or "").split(os.pathsep)):
        if p:
            p = os.path.realpath(p)
            if p != "/" and os.path.isdir(p):
                paths.append(p)
    out: list[str] = []
    for p in sorted(set(paths), key=len):  # outermost first; one tmpfs covers what lies below it
        if not _under(p, ["/tmp", *out]):
            out.append(p)
    return out


def _pw_home() -> str | None:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        return None


def toolchain_paths(path_var: str, hidden: list[str]) -> list[str]:
    """The folders of PATH entries under a hidden folder, to bind back read-only so the model's
    interpreter still runs: a `bin` or `shims` folder brings its prefix (a virtualenv, ~/.pyenv,
    ~/.cargo), except when that prefix is the hidden folder itself or ~/.local (then only `bin`
    and `lib`); a virtualenv's base interpreter (pyvenv.cfg `home`) comes along."""
    out: list[str] = []
    for entry in path_var.split(os.pathsep):
        if not entry or not os.path.isabs(entry):
            continue
        entry = os.path.realpath(entry)
        if not os.path.isdir(entry) or not _under(entry, hidden):
            continue
        parent = os.path.dirname(entry)
        if os.path.basename(entry) in ("bin", "shims") and parent not in hidden:
            if os.path.basename(parent) == ".local":
                out += [entry, os.path.join(parent, "lib")]
            else:
                out.append(parent)
                cfg = os.path.join(parent, "pyvenv.cfg")
                if os.path.isfile(cfg):
                    out += _venv_base(cfg)
        else:
            out.append(entry)
    return [p for p in dict.fromkeys(out) if os.path.exists(p)]


def _venv_base(cfg: str) -> list[str]:
    try:
        for line in Path(cfg).read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                return [os.path.dirname(os.path.realpath(value.strip()))]
    except OSError:
        pass
    return []


def bwrap_argv(bwrap: str, command: list[str], folder: str, *, read=(), write=(),
               environ: Mapping[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    hidden = hidden_paths(environ)
    argv = [bwrap, *_base_args()]
    for p in hidden:
        argv += ["--tmpfs", p]
    socks = {os.path.realpath(s) for s in DAEMON_SOCKETS if os.path.exists(s)}
    for sock in sorted(socks):   # a read-only mount does not stop a connect(): mask them
        if not _under(sock, ["/tmp", *hidden]):
            argv += ["--ro-bind", "/dev/null", sock]
    binds: list[tuple[str, str]] = [("--ro-bind", p) for p in toolchain_paths(environ.get("PATH", ""),
                                                                             ["/tmp", *hidden])]
    binds += [("--ro-bind", os.path.realpath(p)) for p in user_libraries(environ)[1]]
    binds.append(("--ro-bind", os.path.realpath(folder)))
    binds += [("--ro-bind", os.path.realpath(p)) for p in read]
    binds += [("--bind", os.path.realpath(p)) for p in write]
    for how, p in sorted(binds, key=lambda b: len(b[1])):  # a folder before what lies inside it
        argv += [how, p, p]
    argv += ["--dir", HOME_IN_SANDBOX, "--chdir", os.path.realpath(folder), "--"]
    return argv + list(command)


# -- starting a model ---------------------------------------------------------------------------

class ModelProcess(subprocess.Popen):
    """A model's process, sandboxed or not. Sandboxed, `pid` is bwrap's: `returncode` is the
    model's (a model killed by signal N reads -N, as unsandboxed), and `terminate_model` sends
    SIGTERM to the model itself (bwrap's outer process would die of it and take the model down
    before it could stop cleanly)."""

    sandboxed = False
    home: str | None = None

    def _handle_exitstatus(self, *args, **kwargs):  # noqa: D401 - Popen's hook that sets returncode
        super()._handle_exitstatus(*args, **kwargs)
        if self.sandboxed and self.returncode is not None and self.returncode > 128:
            self.returncode = 128 - self.returncode   # bwrap reports a signal death as 128 + N

    def terminate_model(self) -> None:
        """SIGTERM to what runs in the sandbox (or to the model's process group, unsandboxed)."""
        if not self.sandboxed:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            return
        inside = descendants(self.pid)
        # bwrap forks its pid namespace's init, which forks the model: before that, nothing inside
        # could stop cleanly, and bwrap's death takes whatever it started with it (--die-with-parent)
        for pid in inside if len(inside) >= 2 else [self.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def kill_all(self) -> None:
        """SIGKILL: the group, and bwrap (its pid namespace goes with it: nothing inside survives)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None


def start(command: list[str], folder: str | os.PathLike, contract: Mapping[str, str], *, read=(), write=(),
          environ: Mapping[str, str] | None = None, **popen) -> ModelProcess:
    """Start `command` in `folder` as a model: scrubbed environment plus `contract`; sandboxed as
    MODELPLANE_SANDBOX says, with `read` paths visible read-only and `write` paths writable.

    Raises SandboxError (the setting is wrong, or `on` and bwrap cannot run), FileNotFoundError
    (the command is not on PATH) or OSError."""
    environ = os.environ if environ is None else environ
    folder = str(folder)
    st = state(environ)
    if st.mode == "on" and not st.active:
        raise SandboxError(f"{MODE_ENV}=on but the model sandbox cannot run here: {st.reason}")
    # The command is looked up on the adapter's PATH, as before; the model gets the same PATH.
    path_var = environ.get("PATH", os.defpath)
    exe = command[0] if os.sep in command[0] else shutil.which(command[0], path=path_var)
    if exe is None:
        raise FileNotFoundError(2, f"command {command[0]!r} not found on PATH", command[0])
    popen.setdefault("start_new_session", True)
    if st.active:
        env = model_env(contract, HOME_IN_SANDBOX, environ)
        env["TMPDIR"] = "/tmp"
        argv = bwrap_argv(shutil.which("bwrap"), [exe, *command[1:]], folder, read=read, write=write,
                          environ=environ)
        proc = ModelProcess(argv, env=env, **popen)
        proc.sandboxed = True
        return proc
    try:
        home: str | None = tempfile.mkdtemp(prefix="modelplane-model-home-")
    except OSError:   # a read-only temp folder (a locked-down container): a HOME that is no one's
        home = None
    try:
        proc = ModelProcess([exe, *command[1:]], cwd=folder, env=model_env(contract, home or "/nonexistent", environ),
                            **popen)
    except BaseException:
        if home:
            shutil.rmtree(home, ignore_errors=True)
        raise
    proc.home = home
    return proc
