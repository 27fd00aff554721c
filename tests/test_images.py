"""The project's container images, built for real from its Dockerfiles by
scripts/build-images.sh (podman, a local debootstrap base) and run with `podman run` the way
a Pod of the cluster runs them: uid 65532, read-only root filesystem, no capabilities, no
privilege escalation, writable volumes only where mounted.

Skipped when podman is missing, unless MODELPLANE_REQUIRE_NODE=1 (CI): then they fail.
The first build takes a few minutes; later runs reuse the script's cache (seconds).
"""
from __future__ import annotations

import json
import os
import tarfile
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

import images

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
MODELS = sorted(p.parent for p in (ROOT / "models").glob("*/model.yaml"))
REGISTRY = os.environ.get("REGISTRY", "localhost/modelplane").rstrip("/")
TAG = os.environ.get("TAG") or tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# Left out of model images (scripts/model.dockerignore), as control/runtime/local_store.py
# leaves them out of a deployed version.
IGNORED = ("__pycache__", "*.pyc", ".git", ".DS_Store", ".ipynb_checkpoints", ".Rhistory", ".modelplane")


def _unavailable(reason: str):
    if images.require_node():
        pytest.fail(f"{reason} (MODELPLANE_REQUIRE_NODE=1: the image tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def built() -> dict:
    if not images.have_podman():
        _unavailable("podman, runc or root is missing (apt-get install podman runc; run as root)")
    return images.build_images()


def emptydir(tmp_path: Path, name: str) -> Path:
    """A host directory like the one kubelet makes for an emptyDir volume (mode 0777)."""
    d = tmp_path / name
    d.mkdir()
    d.chmod(0o777)
    return d


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
    return result.stdout


def test_every_image_is_built_with_a_full_reference_in_its_archive(built):
    expected = {"adapter", "control", "python-base", "r-base"} | {yaml.safe_load((m / "model.yaml").read_text())["name"] for m in MODELS}
    assert set(built) == expected
    for short in ("adapter", "control", "python-base", "r-base"):
        assert built[short]["ref"] == f"{REGISTRY}/{short}:{TAG}"
    for short, entry in built.items():
        archive = Path(entry["archive"])
        assert archive.is_file(), archive
        with tarfile.open(archive) as tar:
            index = json.load(tar.extractfile("index.json"))
            [manifest] = index["manifests"]
            # ctr import names the image after this annotation: kubelet then finds `ref`.
            assert manifest["annotations"]["org.opencontainers.image.ref.name"] == entry["ref"]
            config = json.load(tar.extractfile("blobs/sha256/" + manifest["digest"].split(":", 1)[1]))["config"]
            assert config["digest"] == "sha256:" + entry["id"]  # the image ID containerd will show


def test_images_run_as_65532_with_a_read_only_root(built):
    for short, entry in built.items():
        out = ok(images.run_as_pod(entry["ref"], "-c",
                                   "id -u; id -g; awk '$2 == \"/\" {print $4}' /proc/self/mounts; "
                                   "touch /tmp/probe 2>&1 || true", entrypoint="/bin/sh"))
        uid, gid, root_options, touch = out.splitlines()[:4]
        assert (uid, gid) == ("65532", "65532"), short
        assert root_options.split(",")[0] == "ro", f"{short}: root filesystem mounted {root_options}"
        assert "Read-only file system" in touch, f"{short}: /tmp is writable without a volume: {touch!r}"
        config = json.loads(ok(images.podman("image", "inspect", entry["ref"])))[0]["Config"]
        assert config["User"] == "65532:65532", short


def test_adapter(built):
    ref = built["adapter"]["ref"]
    assert "usage: modelplane-adapter" in ok(images.run_as_pod(ref, "--help"))
    out = ok(images.run_as_pod(ref, "-c", "import adapters, aiohttp, orjson, google.cloud.storage, sys; print(sys.prefix)",
                               entrypoint="python"))
    assert out.strip() == "/opt/modelplane"
    config = json.loads(ok(images.podman("image", "inspect", ref)))[0]["Config"]
    assert config["Entrypoint"] == ["modelplane-adapter"] and config["Cmd"] == ["serve"]


def test_adapter_bytecode_is_compiled_at_build_time(built):
    # The root filesystem is read-only at run time: without .pyc files every start would
    # compile the project and its dependencies again.
    out = ok(images.run_as_pod(built["adapter"]["ref"], "-c",
                               "import adapters, importlib.util, os; "
                               "print(os.path.exists(importlib.util.cache_from_source(adapters.__file__)))",
                               entrypoint="python"))
    assert out.strip() == "True"


def test_control_state_dir_is_the_mounted_volume(built, tmp_path):
    ref = built["control"]["ref"]
    assert "usage: modelplane" in ok(images.run_as_pod(ref, "--help"))
    config = json.loads(ok(images.podman("image", "inspect", ref)))[0]["Config"]
    assert config["Entrypoint"] == ["modelplane"] and config["Cmd"] == ["serve"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["MODELPLANE_STATE_DIR"] == "/var/lib/modelplane"
    assert env["MODELPLANE_RUNTIME"] == "knative" and env["MODELPLANE_HOST"] == "0.0.0.0" and env["MODELPLANE_PORT"] == "8080"
    # What control/app.py does with an upload, on the volume the cluster mounts there.
    script = ("import os, tempfile; from pathlib import Path; from control.settings import Settings; "
              "s = Settings(); u = Path(s.state_dir) / 'uploads'; u.mkdir(parents=True, exist_ok=True); "
              "d = tempfile.mkdtemp(prefix='model-', dir=u); print(s.state_dir, os.getcwd(), os.environ['HOME'], d)")
    state = emptydir(tmp_path, "state")
    out = ok(images.run_as_pod(ref, "-c", script, entrypoint="python",
                               volumes=(f"{state}:/var/lib/modelplane",)))
    state_dir, cwd, home, upload = out.split()
    assert state_dir == cwd == home == "/var/lib/modelplane"
    assert upload.startswith("/var/lib/modelplane/uploads/model-")
    assert (state / "uploads" / Path(upload).name).is_dir()
    # Without the volume the image's own directory (owned by 65532) is on the read-only
    # root: writing fails loudly rather than landing somewhere unexpected.
    bare = images.run_as_pod(ref, "-c", script, entrypoint="python")
    assert bare.returncode != 0 and "Read-only file system" in bare.stderr


def test_python_base(built):
    ref = built["python-base"]["ref"]
    out = ok(images.run_as_pod(ref, "sh", "-c",
                               "command -v python3 timeout tee >/dev/null && pwd && "
                               "timeout 10 python3 -c 'import json, csv, http.server; print(42)' | tee /dev/null"))
    assert out.split() == ["/model", "42"]
    assert ok(images.run_as_pod(ref, "sh", "-c", "command -v pip pip3 || echo none")).strip() == "none"


def test_r_base(built, tmp_path):
    ref = built["r-base"]["ref"]
    # R creates its session directory in TMPDIR at start-up: the Pod must mount /tmp.
    tmp = emptydir(tmp_path, "tmp")
    out = ok(images.run_as_pod(ref, "Rscript", "-e", "suppressMessages({library(plumber); library(jsonlite)}); cat(toJSON(1:2))",
                               volumes=(f"{tmp}:/tmp",)))
    assert out.strip() == "[1,2]"
    assert ok(images.run_as_pod(ref, "sh", "-c", "command -v python3 python || echo none")).strip() == "none"
    no_tmp = images.run_as_pod(ref, "Rscript", "-e", "1")
    assert no_tmp.returncode != 0, "R started without a writable /tmp: update the note in knative/images/r-base/Dockerfile"


@pytest.mark.parametrize("folder", MODELS, ids=lambda p: p.name)
def test_model_image_has_its_folder_at_model(built, folder):
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    entry = built[manifest["name"]]
    assert entry["ref"] == f"{REGISTRY}/{manifest['name']}:{str(manifest['version']).replace('+', '_')}"
    probe = "python3 --version" if manifest["language"] == "python" else "R --version | head -n 1"
    out = ok(images.run_as_pod(entry["ref"], "sh", "-c",
                               f"pwd; ls -A /model; echo ---; cat /model/model.yaml; echo ---; {probe}"))
    listing, model_yaml, version = out.split("---\n")
    cwd, *files = listing.split()
    assert cwd == "/model"
    assert set(files) == {p.name for p in folder.iterdir() if not any(fnmatch(p.name, pat) for pat in IGNORED)}
    assert model_yaml == (folder / "model.yaml").read_text()
    assert version.strip()
