"""`python -m adapters {serve,batch,job,stream}` (also `modelplane-adapter`): the sidecar's command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import SECRET_ENV

if TYPE_CHECKING:
    from .manifest import Manifest

# Imports are deferred to the command that needs them: `serve` never imports pydantic, PyYAML or
# the batch adapter's storage clients (start-up time and resident memory of every replica).


def manifest_from(model_dir: str | None) -> Manifest:
    """The manifest in MODEL_DIR, else from env MODELPLANE_MANIFEST (JSON), as in a container."""
    from .manifest import ManifestError, load_manifest

    if model_dir:
        return load_manifest(model_dir, check_files=False)
    text = os.environ.get("MODELPLANE_MANIFEST")
    if not text:
        raise ManifestError("MODELPLANE_MANIFEST", [])
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"modelplane-adapter: MODELPLANE_MANIFEST is not JSON: {e}") from e
    from .manifest import parse_manifest

    # JSON is YAML: one parser, the same strict checks and messages
    return parse_manifest(json.dumps(data), file="MODELPLANE_MANIFEST", folder=Path.cwd(), check_files=False)


def take_secret() -> str | None:
    """The plane's secret (env MODELPLANE_ADAPTER_SECRET), taken out of this process's environment:
    out of os.environ and the C environment a child inherits, and its value wiped from the
    environment block the process started with, which /proc/PID/environ shows to every process
    of the same user (the model included) whatever is unset later."""
    secret = os.environ.get(SECRET_ENV)
    if secret is None:
        return None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
            prefix = SECRET_ENV.encode() + b"="
            i = 0
            while environ[i]:
                entry = ctypes.string_at(environ[i])
                if entry.startswith(prefix):
                    ctypes.memset(environ[i] + len(prefix), 0, len(entry) - len(prefix))
                i += 1
        except (OSError, ValueError, AttributeError):  # no C library to reach: unset it at least
            pass
    del os.environ[SECRET_ENV]
    return secret


# Taken at import: a spare adapter (control/runtime/local_procs.py) imports this module long before
# it is given its run, and meanwhile a model of the same user could read its /proc/PID/environ.
_taken = take_secret()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelplane-adapter", description="The modelplane adapter sidecar.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="realtime adapter in front of one model")
    s.add_argument("model_dir", nargs="?", metavar="MODEL_DIR")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    s.add_argument("--model-url", default=os.environ.get("MODEL_URL"),
                   help="sidecar mode: the model already runs there (default: start it, supervisor mode)")
    s.add_argument("--checked-manifest", metavar="FILE",
                   help="the manifest as a caller that already checked it wrote it (JSON; the local runtime "
                        "passes it so a cold start does not check model.yaml again)")

    for name, help_ in (("batch", "run a batch job end to end"),
                        ("job", "the adapter container of a Knative Job: fetch into --work, wait for the model "
                                "container, publish")):
        b = sub.add_parser(name, help=help_)
        b.add_argument("model_dir", nargs="?", metavar="MODEL_DIR")
        b.add_argument("--dataset", help="gs://… or a path (env DATASET_URI, or $K_EVENT_PATH/event)")
        b.add_argument("--results", help="prefix for scores.csv and result.json (env RESULTS_URI)")
        b.add_argument("--job", help="job id (env JOB_ID)")
        if name == "job":
            b.add_argument("--work", default="/work", help="work folder shared with the model container")
        else:
            b.add_argument("--work", default=None,
                           help="work folder for the dataset copy and the scores (default: a temporary one, "
                                "removed at the end; a given one is left for its owner to remove)")
    st = sub.add_parser("stream", help="run a realtime model as a job: stream a dataset through its replicas at --url")
    st.add_argument("model_dir", nargs="?", metavar="MODEL_DIR")
    st.add_argument("--url", default=os.environ.get("MODEL_PREDICT_URL"),
                    help="the model's predict URL, e.g. http://NAME.NAMESPACE.svc.cluster.local/predict "
                         "(env MODEL_PREDICT_URL); env MODELPLANE_STREAM_TOKEN, when set, is sent as its bearer token")
    st.add_argument("--dataset", help="gs://… or a path (env DATASET_URI, or $K_EVENT_PATH/event)")
    st.add_argument("--results", help="prefix for scores.csv and result.json (env RESULTS_URI)")
    st.add_argument("--job", help="job id (env JOB_ID)")
    st.add_argument("--work", default=None, help="work folder for the dataset copy and the scores "
                                                  "(default: a temporary one, removed at the end)")
    st.add_argument("--concurrency", type=int, default=None,
                    help="chunks in flight (default: the manifest's scaling.max)")
    return p


def main(argv: list[str] | None = None) -> int:
    # the plane's secret is the adapter's alone: out of the environment before anything (the
    # model above all) is started; only `serve` uses it
    global _taken
    secret, _taken = _taken, None
    if secret is None:
        secret = take_secret()
    args = _parser().parse_args(argv)
    args.secret = secret
    logging.basicConfig(level=os.environ.get("MODELPLANE_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command != "job":
        return _run(args)
    from .batch import release_model

    try:
        return _run(args)
    finally:  # whatever stopped this container early, the model container must not wait for it
        release_model(Path(args.work))


def _serve(args: argparse.Namespace) -> int:
    from . import served

    def imports() -> None:  # while the manifest is checked in a forked child
        from . import realtime  # noqa: F401
        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass

    if args.secret is not None and not (args.secret.isascii() and args.secret.isprintable()
                                        and args.secret and " " not in args.secret):
        print(f"modelplane-adapter: {SECRET_ENV} is set but {'empty' if not args.secret else 'not printable ASCII'}"
              f"; set it to the plane's secret (printable ASCII, no space), or unset it", file=sys.stderr)
        return 2
    manifest, code = served.serve_manifest(args.model_dir, then=imports, checked=args.checked_manifest)
    if manifest is None:
        return code
    if manifest.kind != "realtime":
        print(f"modelplane-adapter: {manifest.ref} is a {manifest.kind} model; `serve` is for realtime models",
              file=sys.stderr)
        return 2
    from .realtime import run

    return run(manifest, host=args.host, port=args.port, model_url=args.model_url, secret=args.secret)


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    from .manifest import ManifestError

    try:
        manifest = manifest_from(args.model_dir)
    except ManifestError as e:
        if not e.problems:
            print("modelplane-adapter: give MODEL_DIR (a folder with model.yaml) or set MODELPLANE_MANIFEST",
                  file=sys.stderr)
        else:
            print(f"modelplane-adapter: invalid manifest:\n{e}", file=sys.stderr)
        return 2

    from . import batch

    batch.stop_on_sigterm()
    if args.command == "stream":
        return _stream(args, manifest)
    if manifest.kind != "batch":
        print(f"modelplane-adapter: {manifest.ref} is a {manifest.kind} model; `{args.command}` is for batch models",
              file=sys.stderr)
        return 2
    try:
        spec, error = batch.resolve_job(manifest, dataset=args.dataset, results=args.results, job=args.job), None
    except batch.BatchFailure as e:
        spec, error = None, str(e)
    if args.command == "job":
        result, code = batch.job_step(manifest, spec, Path(args.work), error=error)
    elif error:
        result, code = batch.Job(manifest, None).fail(error), 1
    else:
        result, code = batch.run_batch(manifest, spec, work=Path(args.work) if args.work else None)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


def _stream(args: argparse.Namespace, manifest: Manifest) -> int:
    from . import batch, stream

    if manifest.kind != "realtime":
        print(f"modelplane-adapter: {manifest.ref} is a {manifest.kind} model; `stream` is for realtime models",
              file=sys.stderr)
        return 2
    if not args.url:
        print("modelplane-adapter: give --url (the model's predict URL) or set MODEL_PREDICT_URL", file=sys.stderr)
        return 2
    token = os.environ.pop("MODELPLANE_STREAM_TOKEN", None)
    try:
        spec = batch.resolve_job(manifest, dataset=args.dataset, results=args.results, job=args.job)
        send = stream.http_sender(args.url, timeout=manifest.limits.timeout_seconds + 30,
                                  headers={"Authorization": f"Bearer {token}"} if token else None)
    except batch.BatchFailure as e:
        result, code = batch.Job(manifest, None).fail(str(e)), 1
    else:
        result, code = stream.run_stream(manifest, spec, send, concurrency=args.concurrency,
                                         work=Path(args.work) if args.work else None,
                                         log_progress=bool(os.environ.get("K_EVENT_PATH")))  # a cluster Job
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
