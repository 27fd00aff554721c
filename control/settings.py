"""The one settings object: environment variables prefixed `MODELPLANE_`, overridden by CLI flags."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    """When set, mutating API calls need `Authorization: Bearer <token>`."""
    url: Optional[str] = None
    """Where the CLI and console find the control service (default http://{host}:{port})."""
    namespace: str = "modelplane"
    """Kubernetes namespace of the cluster runtime."""
    registry: str = "ghcr.io/modelplane"
    """Image registry; model images are `{registry}/{model}:{version}`."""
    adapter_image: str = "ghcr.io/modelplane/adapter:0.1.0"
    """Image of the adapter (cluster runtime)."""
    broker: str = "default"
    """Knative Broker the batch Triggers subscribe to (cluster runtime)."""

    # Local runtime tuning.
    job_concurrency: int = Field(2, ge=1)
    """Batch jobs run at once by the local runtime; more wait as `queued`."""
    watch_interval: float = Field(1.0, gt=0)
    """Seconds between bucket listings of the local bucket watcher."""
    start_timeout: float = Field(60.0, gt=0)
    """Seconds a replica may take to become ready before it counts as failed."""
    max_restarts: int = Field(3, ge=0)
    """Crashes of a model in a row (with backoff) before it is marked failed."""
    threads: int = Field(128, ge=4)
    """Worker threads of the control service's WSGI server (held requests each take one)."""
    console: bool = True
    """Whether `modelplane up` starts the console."""
    emulator_port: int = Field(0, ge=0, le=65535)
    """Port of the embedded GCS emulator (0 picks a free one)."""

    @property
    def control_url(self) -> str:
        if self.url:
            return self.url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def bucket_name(self) -> str:
        return self.bucket or "modelplane"
