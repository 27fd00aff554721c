"""The one settings object: environment variables prefixed `MODELPLANE_`, overridden by CLI flags."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Literal, Optional

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def modelplane_version() -> str:
    """The installed package's version: the tag of the platform images built from it."""
    try:
        return metadata.version("modelplane")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0.1.0"


class Settings(BaseSettings):
    """Every knob of the control service, CLI and runtimes.

    Precedence, highest first: explicit keyword arguments (CLI flags), `MODELPLANE_*`
    environment variables, the defaults below.
    """

    model_config = SettingsConfigDict(env_prefix="MODELPLANE_", extra="ignore")

    runtime: Literal["local", "knative"] = "local"
    """Which runtime runs models: `local` (processes on this machine) or `knative` (a cluster)."""
    host: str = "127.0.0.1"
    """Address the control service binds to."""
    port: int = Field(8080, ge=0, le=65535)
    """Port of the control service (0 picks a free one)."""
    console_port: int = Field(8501, ge=0, le=65535)
    """Port of the Streamlit console."""
    state_dir: Path = Path(".modelplane")
    """Where the local runtime keeps versions, jobs, logs and the emulator's data; survives restarts."""
    models_dir: Path = Path("models")
    """Model folders registered when the control service starts."""
    bucket: Optional[str] = None
    """GCS bucket for datasets and results. Unset: `modelplane` on the embedded emulator."""
    token: Optional[str] = None
    """The bearer token every `/api` call (and predict, unless opened) needs. Unset (or empty):
    the `token` file in `state_dir`, created on first start (loopback only; see control/auth.py)."""
    open_predict: bool = False
    """Let anyone who reaches the service call predict and the v2 routes without the token
    (a model opens its own with `visibility: public` in its manifest)."""
    allowed_hosts: str = ""
    """Comma-separated extra names the `Host` header may carry (beyond localhost, loopback
    addresses and the bind address): the service's DNS name behind a proxy. `*` allows any."""
    allowed_origins: str = ""
    """Comma-separated extra origins (`https://console.example.com`) whose pages may make
    mutating calls; the service's own origin and the local console's are always allowed."""
    dataset_buckets: str = ""
    """Comma-separated buckets, besides the plane's own, that jobs may read datasets from."""
    max_model_upload: int = Field(64 * 2**20, ge=1024)
    """Largest model archive `POST /api/models` accepts, compressed, in bytes."""
    max_model_size: int = Field(256 * 2**20, ge=1024)
    """Largest total size of the files in a model archive, extracted, in bytes."""
    max_model_files: int = Field(10_000, ge=1)
    """Most members a model archive may hold."""
    max_dataset_upload: int = Field(10 * 2**30, ge=1024)
    """Largest dataset `POST /api/models/{name}/datasets` accepts, in bytes."""
    max_bodies_in_flight: int = Field(256 * 2**20, ge=1024)
    """Bytes of request bodies the control service holds in memory at once, across all requests
    (predict and v2 infer bodies, held whole while they are forwarded): a request that would pass
    it is answered 503 with Retry-After. Uploads (models, datasets) are spooled to disk instead."""
    url: Optional[str] = None
    """Where the CLI and console find the control service (default http://{host}:{port})."""
    namespace: str = "modelplane"
    """Kubernetes namespace where the cluster runtime runs models and their Jobs."""
    control_namespace: Optional[str] = None
    """Kubernetes namespace of the control service itself: its named tokens (Secret
    `modelplane-tokens`) and the audit trail's head (ConfigMap `modelplane-audit`). Unset: the
    models' namespace. The install (knative/) keeps them apart, so that no Job the control
    service may create can mount the control service's Secrets."""
    registry: str = "ghcr.io/modelplane"
    """Image registry; model images are `{registry}/{model}:{version}`, the adapter
    `{registry}/adapter:{modelplane version}` unless `adapter_image` says otherwise."""
    adapter_image: Optional[str] = None
    """Image of the adapter (cluster runtime). Unset: `{registry}/adapter:{modelplane version}`."""
    broker: str = "default"
    """Knative Broker the batch Triggers subscribe to (cluster runtime)."""
    job_service_account: str = "modelplane-job"
    """Kubernetes ServiceAccount of batch Job pods: the identity (Workload Identity on GKE)
    that reads datasets and writes results in the bucket (cluster runtime)."""
    image_pull_secrets: str = ""
    """Comma-separated Secret names for pulling model and adapter images (cluster runtime)."""
    storage_emulator_host: Optional[str] = Field(
        None, validation_alias=AliasChoices("storage_emulator_host", "STORAGE_EMULATOR_HOST"))
    """A GCS emulator instead of GCS, as the google-cloud-storage client reads it from env
    STORAGE_EMULATOR_HOST (no prefix). The cluster runtime passes it on to batch Jobs."""
    max_revision_timeout: int = Field(600, ge=1)
    """Knative's `max-revision-timeout-seconds` (config-defaults) on the cluster: a realtime
    model whose request timeout needs more is refused before it is sent (cluster runtime)."""

    # Local runtime tuning.
    job_concurrency: int = Field(2, ge=1)
    """Batch jobs run at once by the local runtime; more wait as `queued`."""
    watch_interval: float = Field(1.0, gt=0)
    """Seconds between bucket listings of the local bucket watcher."""
    start_timeout: float = Field(60.0, gt=0)
    """Seconds a replica may take to become ready before it counts as failed."""
    deploy_check_timeout: Optional[float] = Field(None, gt=0)
    """Seconds a new version may take to start, become ready and score its sample before its
    deploy is refused (422) and the live version kept. Unset: `start_timeout`."""
    max_restarts: int = Field(3, ge=0)
    """Crashes of a model in a row (with backoff) before it is marked failed."""
    threads: int = Field(128, ge=4)
    """Worker threads of the control service's WSGI server (held requests each take one)."""
    head_timeout: float = Field(10.0, gt=0)
    """Seconds a client has to send a request's whole head (request line and headers) once it
    started it; a slower one is answered 408 and closed (a slowloris client holds nothing)."""
    keepalive_timeout: float = Field(75.0, gt=0)
    """Seconds a connection may stay open without a request (a new one, or between two)."""
    max_connections: int = Field(4096, ge=1)
    """Client connections the control service keeps open at once; past it a new connection is
    answered 503 with Retry-After and closed. Never more than the process's open-file limit
    minus 256 (kept for replicas, files and the bucket)."""
    console: bool = True
    """Whether `modelplane up` starts the console."""
    emulator_port: int = Field(0, ge=0, le=65535)
    """Port of the embedded GCS emulator (0 picks a free one)."""
    sandbox: Literal["auto", "on", "off"] = "auto"
    """How the local runtime runs a model's own process (adapters/sandbox.py): `auto` in a
    bubblewrap sandbox when bwrap works on this machine, `on` refuse to start a model without
    it, `off` environment scrubbing only (a model never gets the plane's variables either way)."""

    @field_validator("token", mode="after")
    @classmethod
    def _blank_token_is_unset(cls, v: Optional[str]) -> Optional[str]:
        return (v or "").strip() or None

    @field_validator("adapter_image", mode="after")
    @classmethod
    def _empty_is_unset(cls, v: Optional[str]) -> Optional[str]:
        return v or None

    @property
    def own_namespace(self) -> str:
        """Where the control service keeps its own objects (`control_namespace`, else `namespace`)."""
        return self.control_namespace or self.namespace

    @property
    def adapter_image_ref(self) -> str:
        return self.adapter_image or f"{self.registry.rstrip('/')}/adapter:{modelplane_version()}"

    @property
    def pull_secrets(self) -> list[str]:
        return [s.strip() for s in self.image_pull_secrets.split(",") if s.strip()]

    @property
    def control_url(self) -> str:
        if self.url:
            return self.url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def bucket_name(self) -> str:
        return self.bucket or "modelplane"
