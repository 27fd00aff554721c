"""The manifest as the realtime adapter serves it: plain attributes, no pydantic, no YAML parser.

`model.yaml` is still read and checked by `adapters.manifest` — the one strict parser, with its
messages — but in a forked child: pydantic and PyYAML cost the serving process ~13 MiB and ~0.1 s
of imports that it never needs again, and the parent imports the server meanwhile. The child
sends back the checked manifest (`Manifest.to_dict()` plus what its properties compute) as JSON.
A process that has imported `adapters.manifest` already checks in-process: the fork would save
nothing (so a warm spare chooses: import the parser ahead for the fastest start, or not for the
leanest replica).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional


class Feature:
    __slots__ = ("name", "type", "required", "allowed", "description")

    def __init__(self, d: dict):
        self.name: str = d["name"]
        self.type: str = d["type"]
        self.required: bool = d.get("required", True)
        self.allowed: Optional[list] = d.get("allowed")
        self.description: str = d.get("description", "")


class _Section:
    def __init__(self, d: dict):
        self.__dict__.update(d)


class ServedManifest:
    """What the realtime adapter reads of a checked manifest, under the same attribute names."""

    def __init__(self, doc: dict):
        m = doc["manifest"]
        self.data = m
        self.name: str = m["name"]
        self.version: str = m["version"]
        self.kind: str = m["kind"]
        self.language: str = m["language"]
        self.command: list[str] = m["command"]
        self.features = [Feature(f) for f in m["features"]]
        self.score = _Section(m["score"])
        # checked like features (no `allowed`), never sent to the model
        self.passthrough = [Feature(p) for p in m.get("passthrough") or []]
        self.limits = _Section(dict(m["limits"], timeout_seconds=doc["timeout_seconds"],
                                    max_body_bytes=doc["max_body_bytes"]))
        self.folder = Path(doc["folder"])
        self.file = Path(doc["file"])

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def passthrough_names(self) -> list[str]:
        return [p.name for p in self.passthrough]

    def to_dict(self) -> dict[str, Any]:
        return self.data


def _checked(model_dir: Optional[str]) -> dict:
    """In the child: the manifest checked by adapters.manifest, or how it failed."""
    from .__main__ import manifest_from
    from .manifest import ManifestError

    try:
        m = manifest_from(model_dir)
    except ManifestError as e:
        return {"manifest_error": str(e) if e.problems else ""}
    except SystemExit as e:
        return {"exit": str(e.code)}
    return document(m)


def document(m) -> dict:
    """What serving needs of a checked `adapters.manifest.Manifest`, as JSON: what the check
    in a child sends back, and what a caller that checked the manifest already (the local
    runtime, at deploy) hands `serve --checked-manifest`."""
    return {"manifest": m.to_dict(), "folder": str(m.folder), "file": str(m.file),
            "timeout_seconds": m.limits.timeout_seconds, "max_body_bytes": m.limits.max_body_bytes}


def load(model_dir: Optional[str], then: Optional[Callable[[], None]] = None, *,
         checked: Optional[str] = None) -> dict:
    """The checked manifest document: checked in a forked child where the OS can fork, `then()`
    running in the parent meanwhile (imports the server needs). `checked`: the path of the
    document (`document()`) a caller that checked this very manifest wrote; read, not re-checked."""
    if checked:
        try:
            doc = json.loads(Path(checked).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return {"crash": f"--checked-manifest {checked}: {e}"}
        if then:
            then()
        return doc
    if not hasattr(os, "fork") or "adapters.manifest" in sys.modules:
        # no fork, or the parser is loaded already (a process started ahead of need that imported
        # it): nothing to save by checking elsewhere
        if then:
            then()
        return _checked(model_dir)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            try:
                doc = _checked(model_dir)
            except BaseException:  # a bug or an unreadable file: the parent tells it
                doc = {"crash": traceback.format_exc()}
            data = json.dumps(doc).encode()
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        if then:
            then()
    finally:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
    if not data:
        return {"crash": "the manifest check ended without an answer"}
    return json.loads(data)


def serve_manifest(model_dir: Optional[str], then: Optional[Callable[[], None]] = None, *,
                   checked: Optional[str] = None) -> tuple[Optional[ServedManifest], int]:
    """(manifest, 0), or (None, exit status) after saying on stderr what is wrong."""
    doc = load(model_dir, then, checked=checked)
    if "manifest" in doc:
        return ServedManifest(doc), 0
    if "exit" in doc:
        raise SystemExit(doc["exit"])
    if "crash" in doc:
        print(f"modelplane-adapter: could not read the manifest:\n{doc['crash']}", file=sys.stderr)
        return None, 1
    if not doc["manifest_error"]:
        print("modelplane-adapter: give MODEL_DIR (a folder with model.yaml) or set MODELPLANE_MANIFEST",
              file=sys.stderr)
    else:
        print(f"modelplane-adapter: invalid manifest:\n{doc['manifest_error']}", file=sys.stderr)
    return None, 2
