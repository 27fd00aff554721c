"""The local runtime's version store: immutable copies of model folders and the live pointer, on disk.

Layout under `state_dir/models/{name}/`:

    model.json      {"name", "live", "past", "versions": [{"version", "deployed_at", "digest", "manifest",
                    "failed"}]}
    {version}/      a frozen copy of the model folder as it was deployed

`model.json` is rewritten atomically (temporary file, fsync, rename), so a crash leaves the
old pointer or the new one, never half of either. Version folders are copied under a
temporary name and renamed into place, so a version folder that exists is complete.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from adapters.manifest import Manifest, load_manifest, semver_key
from control.runtime.base import made_live, rolled_back_to, walk_back
from control.durable import fsync_dir, fsync_tree, move_aside, private_tree, write_json_atomic
from control.errors import Conflict, NotFound

log = logging.getLogger(__name__)

# Files that appear in a model folder without being part of the model (bytecode, editor and
# VCS droppings). They are neither copied nor part of the content digest, so running a model
# from its source folder does not make the next deploy of the same version a Conflict.
IGNORED = ("__pycache__", "*.pyc", ".git", ".DS_Store", ".ipynb_checkpoints", ".Rhistory", ".modelplane")
STATE_FILE = "model.json"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    #: why the version failed its deploy check (with the tail of its log); None: it passed, or
    #: was deployed before versions were checked. A failed version never takes traffic.
    failed: Optional[str] = None

    def to_json(self) -> dict:
        out = {"version": self.version, "deployed_at": self.deployed_at, "digest": self.digest,
               "manifest": self.manifest}
        if self.failed is not None:
            out["failed"] = self.failed
        return out


@dataclass
class ModelRecord:
    name: str
    live: Optional[str]
    versions: list[VersionRecord] = field(default_factory=list)
    #: a rollout in progress: the version, the percent of requests it answers, the percent of
    #: the live version's requests mirrored to it (its answers recorded, never returned)
    candidate: Optional[str] = None
    percent: int = 0
    shadow: int = 0
    #: the versions live before this one, oldest first: a rollback with no version walks back
    #: through them (base.walk_back)
    past: list = field(default_factory=list)

    def version(self, version: str) -> Optional[VersionRecord]:
        for v in self.versions:
            if v.version == version:
                return v
        return None

    @property
    def live_record(self) -> Optional[VersionRecord]:
        return self.version(self.live) if self.live else None

    def usable(self, version: str) -> bool:
        """Deployed and not failed: a version that may take traffic."""
        v = self.version(version)
        return v is not None and v.failed is None

    @property
    def previous(self) -> Optional[str]:
        """The version a rollback with no version returns to (None: nothing earlier)."""
        return walk_back(self.past, self.live, self.usable)[0]

    def to_json(self) -> dict:
        # `previous` is written for readers that predate `past`
        return {"name": self.name, "live": self.live, "versions": [v.to_json() for v in self.versions],
                "candidate": self.candidate, "percent": self.percent, "shadow": self.shadow,
                "past": list(self.past), "previous": self.previous}

    @classmethod
    def from_json(cls, data: dict) -> "ModelRecord":
        past = data.get("past")
        if not isinstance(past, list):   # written before the history was kept: its one step back
            past = [data["previous"]] if data.get("previous") else []
        record = cls(name=data["name"], live=data.get("live"),
                     versions=[VersionRecord(**v) for v in data.get("versions", [])],
                     candidate=data.get("candidate"), percent=int(data.get("percent") or 0),
                     shadow=int(data.get("shadow") or 0), past=[str(v) for v in past])
        known = {v.version for v in record.versions}
        if record.candidate not in known or record.candidate == record.live:
            record.candidate, record.percent, record.shadow = None, 0, 0
        record.past = [v for v in record.past if v in known]
        return record

    def changed(self, **changes) -> "ModelRecord":
        """A copy with `changes` (records are replaced, never edited: readers hold the old one)."""
        changes.setdefault("versions", list(self.versions))
        return dataclasses.replace(self, **changes)


class VersionStore:
    """Model versions on disk plus an in-memory index of them (listing never touches the disk)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._models: dict[str, ModelRecord] = {}
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self.problems: list[str] = []  # records found unreadable, and what was done about them
        self.generation = 0            # bumped on every change: a model, a version, the live pointer
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
                try:
                    record = ModelRecord.from_json(json.loads(state.read_text(encoding="utf-8")))
                    if record.name != entry.name:
                        raise ValueError(f"it names model {record.name!r}")
                except (OSError, ValueError, KeyError, TypeError) as e:
                    record = self._recover(entry, state, e)
                    if record is None:
                        continue
                self._models[record.name] = record

    def _recover(self, entry: Path, state: Path, error: Exception) -> Optional[ModelRecord]:
        """A model record that cannot be read: moved aside, and the model rebuilt from the
        versions frozen beside it (the newest is made live), so the model is not lost."""
        aside = move_aside(state)
        versions = []
        for folder in sorted(p for p in entry.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                manifest = load_manifest(folder, check_files=False)
            except Exception:  # a folder that is not a version: leave it alone
                continue
            stamp = datetime.fromtimestamp(folder.stat().st_mtime, timezone.utc)
            versions.append(VersionRecord(version=manifest.version, digest=folder_digest(folder),
                                          deployed_at=stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                                          manifest=manifest.to_dict()))
        versions.sort(key=lambda v: semver_key(v.version))
        message = (f"model {entry.name}: its record was unreadable ({type(error).__name__}: {str(error)[:200]}); "
                   f"moved aside to {aside.name}")
        if not versions:
            self.problems.append(message + "; no version could be rebuilt")
            log.error("%s", self.problems[-1])
            return None
        record = ModelRecord(name=entry.name, live=versions[-1].version, versions=versions)
        write_json_atomic(state, record.to_json())
        self.problems.append(message + f"; rebuilt from {len(versions)} stored version(s), {record.live} live")
        log.error("%s", self.problems[-1])
        return record

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

    def version_record(self, name: str, version: str) -> VersionRecord:
        """One deployed version; NotFound naming the deployed ones."""
        return self._known(self.get(name), version)

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def manifest(self, name: str, version: str) -> Manifest:
        """The manifest of a stored version, loaded from its frozen copy (cached)."""
        key = (name, version)
        manifest = self._manifests.get(key)
        if manifest is None:
            self.version_record(name, version)
            manifest = load_manifest(self.version_dir(name, version), check_files=False)
            self._manifests[key] = manifest
        return manifest

    # -- writing ------------------------------------------------------------------------
    def add(self, manifest: Manifest, *, make_live: bool, hold: bool = False) -> tuple[VersionRecord, bool, bool]:
        """Freeze `manifest.folder` as `manifest.version`.

        Returns (record, created, made_live). An existing version with the same content is
        returned unchanged (created False); with different content it is a Conflict. `hold`:
        never make it live here, not even as a new model's first version (it is checked first;
        `set_live` follows).
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
                private_tree(tmp)   # copytree kept the source's modes; the state dir is the owner's alone
                digest = folder_digest(tmp)
                frozen = load_manifest(tmp, check_files=False)
                fsync_tree(tmp)
                os.rename(tmp, model_dir / version)
                fsync_dir(model_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            info = VersionRecord(version=version, deployed_at=utcnow(), digest=digest,
                                 manifest=frozen.to_dict())
            if record is None:
                new = ModelRecord(name=name, live=None, versions=[info])
            else:
                new = record.changed(versions=[*record.versions, info])
            made_live = not hold and (make_live or new.live is None)
            if made_live:
                new = self._made_live(new, version)
            write_json_atomic(model_dir / STATE_FILE, new.to_json())
            self._models[name] = new
            self.generation += 1
            return info, True, made_live

    def set_live(self, name: str, version: str) -> VersionRecord:
        """Make `version` live; a rollout in progress ends (its candidate keeps no traffic)."""
        with self._lock:
            record = self.get(name)
            info = self._usable(record, version)
            if record.live != version or record.candidate:
                self._write(self._made_live(record, version))
            self.generation += 1
            return info

    def rollback(self, name: str, version: Optional[str]) -> VersionRecord:
        """Make an earlier version live, ending any rollout. Without a version: walk back through the
        history of live versions to the newest one that can serve (Conflict when there is none);
        the version left is forgotten, so the next rollback goes further back."""
        with self._lock:
            record = self.get(name)
            if version is None:
                version, past = walk_back(record.past, record.live, record.usable)
                if version is None:
                    raise Conflict(f"{name} has no rollout to withdraw and no earlier live version to return to "
                                   f"({record.live} is the oldest in its history that can serve); name the "
                                   f"version to make live", details={"model": name})
            else:
                self._usable(record, version)
                past = rolled_back_to(record.past, record.live, version)
            info = self._known(record, version)
            self._write(record.changed(live=version, past=past, candidate=None, percent=0, shadow=0))
            self.generation += 1
            return info

    def set_failed(self, name: str, version: str, reason: Optional[str]) -> None:
        """Record why `version` failed its deploy check (None: it passed after all)."""
        with self._lock:
            record = self.get(name)
            self._known(record, version)
            versions = [dataclasses.replace(v, failed=reason) if v.version == version else v
                        for v in record.versions]
            self._write(record.changed(versions=versions))
            self.generation += 1

    def drop(self, name: str, version: str) -> None:
        """Forget a version that was never live (a new model's first version that failed its check:
        the model goes with it when it has no other version)."""
        with self._lock:
            record = self.get(name)
            if record.live == version or record.candidate == version:
                raise Conflict(f"{name} {version} takes traffic; it cannot be dropped")
            versions = [v for v in record.versions if v.version != version]
            if not versions or record.live is None:
                self.remove(name)
                return
            self._write(record.changed(versions=versions, past=[v for v in record.past if v != version]))
            self._manifests.pop((name, version), None)
            self.generation += 1
        shutil.rmtree(self.version_dir(name, version), ignore_errors=True)

    def set_rollout(self, name: str, version: Optional[str], *, percent: int = 0, shadow: int = 0) -> ModelRecord:
        """Put `version` under rollout (None: withdraw the rollout; the live version takes all)."""
        with self._lock:
            record = self.get(name)
            if version is not None:
                self._usable(record, version)
                if version == record.live:
                    raise Conflict(f"{name} {version} is the live version already; roll out another one",
                                   details={"model": name, "version": version})
            new = record.changed(candidate=version, percent=percent if version else 0,
                                 shadow=shadow if version else 0)
            self._write(new)
            self.generation += 1
            return new

    @staticmethod
    def _made_live(record: ModelRecord, version: str) -> ModelRecord:
        return record.changed(live=version, past=made_live(record.past, record.live, version),
                              candidate=None, percent=0, shadow=0)

    @classmethod
    def _usable(cls, record: ModelRecord, version: str) -> VersionRecord:
        """A deployed version that may take traffic: NotFound if unknown, Conflict if it failed its check."""
        info = cls._known(record, version)
        if info.failed is not None:
            raise Conflict(f"{record.name} {version} failed its deploy check, so it takes no traffic; deploy a "
                           f"fixed version. Why it failed: {info.failed}",
                           details={"model": record.name, "version": version})
        return info

    @staticmethod
    def _known(record: ModelRecord, version: str) -> VersionRecord:
        info = record.version(version)
        if info is None:
            known = ", ".join(v.version for v in record.versions)
            raise NotFound(f"{record.name} has no version {version} (deployed: {known})")
        return info

    def _write(self, record: ModelRecord) -> None:
        write_json_atomic(self.root / record.name / STATE_FILE, record.to_json())
        self._models[record.name] = record

    def remove(self, name: str) -> None:
        with self._lock:
            self.get(name)
            model_dir = self.root / name
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex}"
            # The rename is the commit point: after it the model is gone even if rmtree is cut short.
            os.rename(model_dir, trash)
            fsync_dir(self.root)
            del self._models[name]
            self.generation += 1
            for key in [k for k in self._manifests if k[0] == name]:
                del self._manifests[key]
        shutil.rmtree(trash, ignore_errors=True)
