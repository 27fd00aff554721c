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
    """A real gcp-storage-emulator; STORAGE_EMULATOR_HOST points the google-cloud-storage client at it."""
    data = tmp_path_factory.mktemp("gcs")
    emu = Emulator(data, bucket="test-bucket").start()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emu.endpoint
    try:
        yield emu
    finally:
        emu.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture(scope="session")
def gcs_client(gcs):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials())


@pytest.fixture
def port():
    return free_port()


def pytest_collection_modifyitems(config, items):
    """The real-Knative tier runs last: its one cluster (a session fixture) then lives only while
    those tests run, not beside the rest of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("knative") is not None)
