"""Shared fixtures: a real GCS emulator on loopback, free ports, the example models."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from control.emulator import Emulator, free_port
from knative_fixtures import knative, knative_bridge, knative_builds, knative_images, knative_plane  # noqa: F401 (session fixtures)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def have_r() -> bool:
    return shutil.which("Rscript") is not None


requires_r = pytest.mark.skipif(not have_r(), reason="Rscript not installed (apt-get install r-base-core r-cran-plumber r-cran-jsonlite)")


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A real gcp-storage-emulator behind the plane's guard; STORAGE_EMULATOR_HOST points the
    google-cloud-storage client at it and MODELPLANE_STORAGE_KEY gives it the key, as `up` does."""
    data = tmp_path_factory.mktemp("gcs")
    emu = Emulator(data, bucket="test-bucket").start()
    old = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "MODELPLANE_STORAGE_KEY")}
    os.environ["STORAGE_EMULATOR_HOST"] = emu.endpoint
    os.environ["MODELPLANE_STORAGE_KEY"] = emu.key
    try:
        yield emu
    finally:
        emu.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def gcs_client(gcs):
    from google.cloud import storage

    from adapters.storage import emulator_credentials

    return storage.Client(project="test", credentials=emulator_credentials(gcs.key))


@pytest.fixture
def port():
    return free_port()


@pytest.fixture
def seen_by_models():
    """A folder a sandboxed model can see (read-only): the system's, not this test's private /tmp
    (a sandbox gives each model its own /tmp). Removed after the test."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="modelplane-test-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _umask_restored():
    """A plane started in this process makes the process umask 077 (control/durable.py), as
    `modelplane up` does for itself; each test starts from the umask the session began with."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def pytest_collection_modifyitems(config, items):
    """The real-Knative tier runs last: its one cluster (a session fixture) then lives only while
    those tests run, not beside the rest of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("knative") is not None)
