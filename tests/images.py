"""The project's container images, built for real with podman by scripts/build-images.sh.

    from tests.images import build_images, have_podman, podman_env, podman

    images = build_images()           # {"adapter": {"ref", "archive", "id"}, "control": ..., model names...}
    podman("run", "--rm", images["adapter"]["ref"], "--help", env=podman_env())

The script caches everything under ${XDG_CACHE_HOME:-~/.cache}/modelplane (a first build
takes a few minutes, a cached one seconds), prints the JSON on stdout and its progress on
stderr. `podman_env()` is the environment that makes podman use the script's storage and
configuration (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF): without it podman sees none of
these images. `archive` is an OCI archive whose image reference is the full `ref`, for
`ctr -n k8s.io images import`.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build-images.sh"

# What a Pod of the cluster tests gets (securityContext: runAsNonRoot, runAsUser 65532,
# readOnlyRootFilesystem, allowPrivilegeEscalation false, drop ALL, RuntimeDefault seccomp)
# as `podman run` flags. --read-only-tmpfs=false: podman would otherwise mount writable
# tmpfs on /tmp, /var/tmp and /run, which a Pod does not get.
POD_SECURITY = ["--user", "65532:65532", "--read-only", "--read-only-tmpfs=false",
                "--cap-drop", "all", "--security-opt", "no-new-privileges"]


class ImageBuildError(RuntimeError):
    pass


def have_podman() -> bool:
    """podman and runc are installed and we are root (the script builds with rootful podman)."""
    return (shutil.which("podman") is not None and shutil.which("runc") is not None
            and os.geteuid() == 0)


def require_node() -> bool:
    """CI sets MODELPLANE_REQUIRE_NODE=1: a missing podman then fails the tests instead of skipping them."""
    return os.environ.get("MODELPLANE_REQUIRE_NODE", "") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _podman_conf() -> tuple:
    out = subprocess.run(["bash", str(SCRIPT), "--env"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise ImageBuildError(f"{SCRIPT} --env failed:\n{out.stderr[-4000:]}")
    pairs = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return tuple(sorted(pairs.items()))


def podman_conf() -> dict:
    """{"CONTAINERS_CONF": path, "CONTAINERS_STORAGE_CONF": path}: the configuration the
    script builds with (written by it, so this runs `build-images.sh --env` once)."""
    return dict(_podman_conf())


def podman_env(base: Optional[dict] = None) -> dict:
    """`base` (default os.environ) plus the podman configuration of the built images."""
    env = dict(os.environ if base is None else base)
    env.update(podman_conf())
    return env


def build_images(timeout: float = 1800, env: Optional[dict] = None) -> dict:
    """Run scripts/build-images.sh (cached: seconds when nothing changed) and return its JSON:
    {short name: {"ref": ..., "archive": ..., "id": ...}} for adapter, control, python-base,
    r-base and every model under models/. Raises ImageBuildError with the end of the
    script's stderr when it fails."""
    try:
        out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=timeout,
                             env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired as e:
        raise ImageBuildError(f"{SCRIPT} took more than {timeout}s:\n{(e.stderr or b'')[-4000:]!r}") from e
    if out.returncode != 0:
        raise ImageBuildError(f"{SCRIPT} failed (exit {out.returncode}):\n{out.stderr[-6000:]}")
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError as e:
        raise ImageBuildError(f"{SCRIPT} printed no JSON: {out.stdout[-2000:]!r}\n{out.stderr[-2000:]}") from e


def podman(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """`podman ARGS...` with the built images' configuration; text output captured."""
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env=podman_env(), check=check)


def run_as_pod(image: str, *command: str, entrypoint: Optional[str] = None, volumes: tuple = (),
               env: Optional[dict] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`podman run` IMAGE with the Pod security settings of the cluster tests (uid 65532,
    read-only root filesystem, no capabilities, no privilege escalation), no network.
    `volumes`: ("host_dir:container_path", ...) writable bind mounts, as emptyDir volumes are."""
    args = ["run", "--rm", "--network", "none", *POD_SECURITY]
    for v in volumes:
        args += ["-v", v]
    for k, v in (env or {}).items():
        args += ["-e", f"{k}={v}"]
    if entrypoint is not None:
        args += ["--entrypoint", entrypoint]
    return podman(*args, image, *command, timeout=timeout)
