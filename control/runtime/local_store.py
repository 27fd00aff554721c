"""The local runtime's version store: immutable copies of model folders and the live pointer, on disk.

Layout under `state_dir/models/{name}/`:

    model.json      {"name", "live", "versions": [{"version", "deployed_at", "digest", "manifest"}]}
    {version}/      a frozen copy of the model folder as it was deployed

`model.json` is rewritten atomically (temporary file, fsync, rename), so a crash leaves the
old pointer or the new one, never half of either. Version folders are copied under a
temporary name and renamed into place, so a version folder that exists is complete.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from adapters.manifest import Manifest, load_manifest
from control.errors import Conflict, NotFound

# Files that appear in a model folder without being part of the model (bytecode, editor and
# VCS droppings). They are neither copied nor part of the content digest, so running a model
# from its source folder does not make the next deploy of the same version a Conflict.
IGNORED = ("__pycache__", "*.pyc", ".git", ".DS_Store", ".ipynb_checkpoints", ".Rhistory", ".modelplane")
STATE_FILE = "model.json"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON: readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED)


def folder_digest(folder: Path) -> str:
    """sha256 over every file's relative path, mode bit 'executable' and content."""
    h = hashlib.sha256()
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _ignored(d))
        for name in sorted(files):
            if _ignored(name):
                continue
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            h.update(rel.encode() + b"\0")
            h.update(b"x" if os.access(path, os.X_OK) else b"-")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            h.update(b"\0")
    return "sha256:" + h.hexdigest()


@dataclass
class VersionRecord:
    version: str
    deployed_at: str
    digest: str
    manifest: dict

    def to_json(self) -> dict:
        return {"version": self.version, "deployed_at": self.deployed_at, "digest": self.digest,
                "manifest": self.manifest}


@dataclass
class ModelRecord:
    name: str
    live: Optional[str]
    versions: list[VersionRecord] = field(default_factory=list)

    def version(self, version: str) -> Optional[VersionRecord]:
        for v in self.versions:
            if v.version == version:
                return v
        return None

    @property
    def live_record(self) -> Optional[VersionRecord]:
        return self.version(self.live) if self.live else None

    def to_json(self) -> dict:
        return {"name": self.name, "live": self.live, "versions": [v.to_json() for v in self.versions]}

    @classmethod
    def from_json(cls, data: dict) -> "ModelRecord":
        return cls(name=data["name"], live=data.get("live"),
                   versions=[VersionRecord(**v) for v in data.get("versions", [])])


class VersionStore:
    """Model versions on disk plus an in-memory index of them (listing never touches the disk)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._models: dict[str, ModelRecord] = {}
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._load()

    def _load(self) -> None:
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".trash-"):
                shutil.rmtree(entry, ignore_errors=True)
                continue
            if not entry.is_dir():
                continue
            for stale in entry.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            state = entry / STATE_FILE
            if state.is_file():
                record = ModelRecord.from_json(json.loads(state.read_text(encoding="utf-8")))
                self._models[record.name] = record

    # -- reading ------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str) -> ModelRecord:
        record = self._models.get(name)
        if record is None:
            raise NotFound(f"no model named {name!r}")
        return record

    def find(self, name: str) -> Optional[ModelRecord]:
        return self._models.get(name)

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def manifest(self, name: str, version: str) -> Manifest:
        """The manifest of a stored version, loaded from its frozen copy (cached)."""
        key = (name, version)
        manifest = self._manifests.get(key)
        if manifest is None:
            if self.get(name).version(version) is None:
                raise NotFound(f"{name} has no version {version}")
            manifest = load_manifest(self.version_dir(name, version), check_files=False)
            self._manifests[key] = manifest
        return manifest

    # -- writing ------------------------------------------------------------------------
    def add(self, manifest: Manifest, *, make_live: bool) -> tuple[VersionRecord, bool, bool]:
        """Freeze `manifest.folder` as `manifest.version`.

        Returns (record, created, made_live). An existing version with the same content is
        returned unchanged (created False); with different content it is a Conflict.
        """
        name, version = manifest.name, manifest.version
        source = Path(manifest.folder)
        with self._lock:
            record = self._models.get(name)
            existing = record.version(version) if record else None
            if existing is not None:
                digest = folder_digest(source)
                if digest != existing.digest:
                    raise Conflict(
                        f"{name} version {version} is already deployed with different content; "
                        f"versions are immutable, so give this one a new version number",
                        details={"model": name, "version": version})
                return existing, False, False
            model_dir = self.root / name
            model_dir.mkdir(parents=True, exist_ok=True)
            tmp = model_dir / f".tmp-{uuid.uuid4().hex}"
            try:
                shutil.copytree(source, tmp, ignore=lambda _d, names: [n for n in names if _ignored(n)],
                                symlinks=False)
                digest = folder_digest(tmp)
                frozen = load_manifest(tmp, check_files=False)
                os.rename(tmp, model_dir / version)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            info = VersionRecord(version=version, deployed_at=utcnow(), digest=digest,
                                 manifest=frozen.to_dict())
            new = ModelRecord(name=name, live=record.live if record else None,
                              versions=[*(record.versions if record else []), info])
            made_live = make_live or new.live is None
            if made_live:
                new.live = version
            write_json_atomic(model_dir / STATE_FILE, new.to_json())
            self._models[name] = new
            return info, True, made_live

    def set_live(self, name: str, version: str) -> VersionRecord:
        with self._lock:
            record = self.get(name)
            info = record.version(version)
            if info is None:
                known = ", ".join(v.version for v in record.versions)
                raise NotFound(f"{name} has no version {version} (deployed: {known})")
            if record.live != version:
                new = ModelRecord(name=name, live=version, versions=list(record.versions))
                write_json_atomic(self.root / name / STATE_FILE, new.to_json())
                self._models[name] = new
            return info

    def remove(self, name: str) -> None:
        with self._lock:
            self.get(name)
            model_dir = self.root / name
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex}"
            # The rename is the commit point: after it the model is gone even if rmtree is cut short.
            os.rename(model_dir, trash)
            del self._models[name]
            for key in [k for k in self._manifests if k[0] == name]:
                del self._manifests[key]
        shutil.rmtree(trash, ignore_errors=True)
