"""What a model version becomes on a Knative cluster, as plain dicts: no Kubernetes client here.

Pure functions of (manifest, settings) so that `modelplane render` works offline and the
cluster runtime writes exactly what the CLI shows. A realtime version is one Knative
`Service` revision (adapter + model containers); a batch version is a `JobSink` whose Job
has two main containers (the adapter fetches and publishes, the model scores between), plus
the model's `Trigger` on the Broker. `render_objects` refuses, before anything is sent,
what Knative's admission webhooks would refuse (`knative_rules`).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping, Optional

import yaml

from adapters.batch import FINALIZED, score_step
from adapters.manifest import Manifest, semver_key
from control.errors import Invalid
from control.runtime import knative_rules as rules
from control.runtime.base import Traffic, version_tag

SERVING_API = "serving.knative.dev/v1"
JOBSINK_API = "sinks.knative.dev/v1alpha1"
TRIGGER_API = "eventing.knative.dev/v1"

# Labels and annotations we own; status is read back from these alone.
LABEL_MODEL = "modelplane.dev/model"
LABEL_VERSION = "modelplane.dev/version"
LABEL_KIND = "modelplane.dev/kind"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGED_BY = "modelplane"
ANN_MANIFEST = "modelplane.dev/manifest"
# realtime, written before versions were read from their revisions: {version: {revision,
# deployed_at, manifest}}; read when present, removed at the next write
ANN_VERSIONS = "modelplane.dev/versions"
# realtime: {live, candidate, percent, shadow, previous, past, pinned} (base.Traffic): bounded
# (LIVE_HISTORY earlier live versions, MAX_PINS pins), whatever the number of versions
ANN_TRAFFIC = "modelplane.dev/traffic"
ANN_DATASET = "modelplane.dev/dataset"
ANN_VERSION = "modelplane.dev/version"  # exact version (labels cannot hold `+build`)
ANN_EVENT_KEY = "modelplane.dev/event-key"
LABEL_TRIGGER = "modelplane.dev/trigger"

# Knative Eventing's own JobSink names (knative/eventing pkg/apis/sinks/constants.go).
JOBSINK_NAME_LABEL = "sinks.knative.dev/job-sink-name"
JOBSINK_ID_LABEL = "sinks.knative.dev/job-sink-id"
# What the JobSink dispatcher adds to every Job it creates (knative/eventing cmd/jobsink/main.go):
# a Secret volume holding the event, mounted in the *main* containers only, with K_EVENT_PATH;
# and, from the JobSink's defaults (pkg/apis/sinks/v1alpha1/job_sink_defaults.go),
# K_EXECUTION_MODE=batch in every container.
EVENT_VOLUME = "jobsink-event"
EVENT_PATH = "/etc/jobsink-event"
EXECUTION_MODE_ENV = ("K_EXECUTION_MODE", "batch")
# A revision annotated so is never garbage-collected (knative/serving pkg/apis/serving/register.go
# RevisionPreservedAnnotationKey, read by pkg/reconciler/gc/gc.go): every version stays for rollback.
ANN_NO_GC = "serving.knative.dev/no-gc"
# The Service label that keeps a route off the external ingress (knative.dev/networking
# VisibilityLabelKey; knative/serving pkg/reconciler/route/config/domain.go).
LABEL_VISIBILITY = "networking.knative.dev/visibility"

ADAPTER_PORT = 8080  # the one port Knative routes to (the adapter)
MODEL_PORT = 8081  # the model's loopback port inside the pod; not one Knative reserves
MODEL_DIR = "/model"  # where knative/images/*-base put the model folder
#: The Secret holding an emulator's storage key (tests and kind clusters; real GCS needs none).
STORAGE_KEY_SECRET = "modelplane-storage-key"
WORK_DIR = "/work"
WORK_VOLUME = "work"
TMP_VOLUME = "tmp"  # a writable /tmp: root filesystems are read-only (R needs a temp dir to start)
JOB_TTL_SECONDS = 7 * 24 * 3600  # finished Jobs (and their status) stay a week
ADAPTER_RESOURCES = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
NON_ROOT_UID = 65532  # the user of every image in knative/images
# Every container: no privilege, nothing written outside its volumes. Only fields Knative's
# field mask allows on a Service's containers (knative/serving pkg/apis/serving/fieldmask.go
# SecurityContextMask); the pod-level part is for Jobs only (a Service's pod securityContext is
# behind a Knative feature flag).
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID,
                "fsGroup": NON_ROOT_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def version_slug(version: str) -> str:
    """`1.3.0-rc.1+build.5` -> `1-3-0-rc-1-build-5`: a version as a DNS-label fragment."""
    return re.sub(r"[^a-z0-9]+", "-", version.lower()).strip("-")


def object_name(manifest: Manifest) -> str:
    """Revision (realtime) or JobSink (batch) name of one version: `{name}-{version slug}`."""
    return f"{manifest.name}-{version_slug(manifest.version)}"


def label_value(text: str) -> str:
    """A string as a valid label value (versions may carry `+build`, which labels forbid)."""
    value = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:63]
    return value.strip("._-") or "_"


def image_tag(version: str) -> str:
    """Image tags allow `[A-Za-z0-9_.-]`: `1.3.0+b1` is tagged `1.3.0_b1`."""
    return version.replace("+", "_")


def model_image(manifest: Manifest, settings) -> str:
    return f"{settings.registry.rstrip('/')}/{manifest.name}:{image_tag(manifest.version)}"


def manifest_json(manifest: Manifest) -> str:
    """Canonical JSON of a manifest: equal manifests give equal strings."""
    return json.dumps(manifest.to_dict(), sort_keys=True, separators=(",", ":"))


def bucket_source(bucket: str) -> str:
    """CloudEvent `source` of GCS object events for `bucket`, as Google sends it."""
    return f"//storage.googleapis.com/projects/_/buckets/{bucket}"


def labels(manifest: Manifest) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": manifest.name,
        "app.kubernetes.io/version": label_value(manifest.version),
        "app.kubernetes.io/component": manifest.kind,
        "app.kubernetes.io/part-of": "modelplane",
        LABEL_MANAGED: MANAGED_BY,
        LABEL_MODEL: manifest.name,
        LABEL_VERSION: label_value(manifest.version),
        LABEL_KIND: manifest.kind,
    }


def revalidate(manifest: Manifest) -> Manifest:
    """The manifest validated again (a hand-built or edited one may bypass validation)."""
    try:
        return Manifest.model_validate(manifest.model_dump(mode="python"))
    except Exception as e:  # pydantic.ValidationError, or anything a hand-built manifest trips
        raise Invalid(f"the manifest of {getattr(manifest, 'name', '?')} is not valid: {e}") from None


def render_objects(manifest: Manifest, settings) -> list[dict]:
    """The Kubernetes objects of one model version, in the order they should be applied.

    Raises Invalid, naming the manifest field, for anything Knative's admission webhooks would
    refuse (`knative_rules`, each rule citing the Knative source it mirrors): nothing is sent
    that the cluster would reject.
    """
    manifest = revalidate(manifest)
    if manifest.kind == "realtime":
        objects = [realtime_service(manifest, settings)]
    else:
        sink = job_sink(manifest, settings)
        objects = [sink, trigger(manifest, settings, job_sink_name=sink["metadata"]["name"])]
        _check_job_sink_name(manifest, sink["metadata"]["name"])
    return _admitted(manifest, objects, settings)


def _admitted(manifest: Manifest, objects: list[dict], settings) -> list[dict]:
    """`objects` as fresh copies (no dict shared between them: labels appear in several places),
    once Knative's admission rules find nothing to refuse; Invalid naming the manifest field if they do."""
    config = rules.ClusterConfig(max_revision_timeout_seconds=settings.max_revision_timeout)
    problems = [(obj, p) for obj in objects for p in rules.problems(obj, config)]
    if problems:
        raise _refused(manifest, problems, settings)
    return json.loads(json.dumps(objects))


# Where a refused object field comes from in the manifest (first match wins).
_MANIFEST_FIELDS = [
    (re.compile(r"^metadata\.name$"), "name"),
    (re.compile(r"^spec\.template\.metadata\.name$"), "name/version"),
    (re.compile(r"timeoutSeconds$"), "limits.timeout"),
    (re.compile(r"autoscaling\.knative\.dev/target\b"), "scaling.target_concurrency"),
    (re.compile(r"autoscaling\.knative\.dev/min-scale\b"), "scaling.min"),
    (re.compile(r"autoscaling\.knative\.dev/max-scale\b"), "scaling.max"),
    (re.compile(r"autoscaling\.knative\.dev/scale-to-zero-pod-retention-period\b"), "scaling.idle_timeout"),
    (re.compile(r"\.resources\b"), "resources"),
    (re.compile(r"\.command\b"), "command"),
]


def _manifest_field(path: str) -> Optional[str]:
    return next((field for pattern, field in _MANIFEST_FIELDS if pattern.search(path)), None)


def _check_job_sink_name(manifest: Manifest, name: str) -> None:
    """Knative accepts a JobSink of any valid name, but its dispatcher labels every Job with it
    (`sinks.knative.dev/job-sink-name`, knative/eventing cmd/jobsink/main.go), and a label value
    holds at most 63 characters: past that every event's Job is refused. Said before deploying."""
    if len(name) > 63:
        message = (f"{name!r} is {len(name)} characters: the Jobs of a batch model carry `{{name}}-{{version}}` "
                   "in a label, which holds at most 63; shorten the name or the version")
        raise Invalid(f"{manifest.ref}: name/version: {message}",
                      details={"problems": [{"field": "name/version", "message": message,
                                             "object": f"JobSink {name}", "path": "metadata.name",
                                             "source": "knative/eventing cmd/jobsink/main.go (Job labels)"}]})


def _refused(manifest: Manifest, problems: list, settings) -> Invalid:
    details, lines = [], []
    for obj, p in problems:
        what = f"{obj['kind']} {obj['metadata'].get('name', '')}".strip()
        field = "name/version" if (obj["kind"], p.field) == ("JobSink", "metadata.name") else _manifest_field(p.field)
        hint = ""
        if field == "limits.timeout":
            hint = (f" (the revision timeout is limits.timeout + 5 s; this cluster allows "
                    f"{settings.max_revision_timeout} s: Knative's max-revision-timeout-seconds in config-defaults, "
                    "mirrored by MODELPLANE_MAX_REVISION_TIMEOUT)")
        lines.append(f"{field or p.field}: {p.message}{hint} [{what}, field {p.field}; Knative: {p.source}]")
        details.append({"field": field or p.field, "message": p.message + hint, "object": what, "path": p.field,
                        "source": p.source})
    return Invalid(f"{manifest.ref} would be refused by Knative:\n  " + "\n  ".join(lines),
                   details={"problems": details})


def render_yaml(manifest: Manifest, settings) -> str:
    """`render_objects` (and a realtime model's `stream_objects`) as a multi-document YAML stream,
    ready for `kubectl apply -f -`."""
    objects = render_objects(manifest, settings)
    if manifest.kind == "realtime":  # and what runs it as a job on a dataset dropped for it
        objects += stream_objects(manifest, settings)
    return yaml.dump_all(objects, Dumper=_PlainDumper, sort_keys=False,
                         default_flow_style=False, width=120)


class _PlainDumper(yaml.SafeDumper):
    """No `&id001` anchors: the YAML is for people and kubectl."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# -- realtime -----------------------------------------------------------------------------

def autoscaling_annotations(manifest: Manifest) -> dict[str, str]:
    """Knative Pod Autoscaler settings from `scaling` (values must be strings: the CRD says so).

    `idle_timeout` is how long the last replica stays after traffic stops:
    `scale-to-zero-pod-retention-period`. (`scale-down-delay` would hold back *every* scale-down,
    also from 5 replicas to 4; knative/serving pkg/apis/autoscaling/register.go.)
    """
    s = manifest.scaling
    return {
        "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/target": str(s.target_concurrency),
        "autoscaling.knative.dev/min-scale": str(s.min),
        "autoscaling.knative.dev/max-scale": str(s.max),
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period": f"{int(math.ceil(s.idle_seconds))}s",
    }


def _pull_secrets(settings) -> dict:
    return {"imagePullSecrets": [{"name": n} for n in settings.pull_secrets]} if settings.pull_secrets else {}


def _model_resources(manifest: Manifest) -> dict:
    return {"requests": {"cpu": manifest.resources.cpu, "memory": manifest.resources.memory},
            "limits": {"memory": manifest.resources.memory}}


def revision_timeout(manifest: Manifest) -> int:
    """A realtime version's revision `timeoutSeconds`: the model's own limit and 5 s for the
    adapter, 10 s at least."""
    return max(int(math.ceil(manifest.limits.timeout_seconds)) + 5, 10)


def realtime_service(manifest: Manifest, settings) -> dict:
    revision = object_name(manifest)
    mjson = manifest_json(manifest)
    meta_labels = labels(manifest)
    service_labels = dict(meta_labels)
    if manifest.visibility == "cluster":  # the adapter has no auth: reached through the control service
        service_labels[LABEL_VISIBILITY] = "cluster-local"
    timeout = revision_timeout(manifest)
    tmp_mount = {"name": TMP_VOLUME, "mountPath": "/tmp"}
    adapter = {
        "name": "adapter",
        "image": settings.adapter_image_ref,
        # Loopback only: queue-proxy is the pod's one way in. It forwards to 127.0.0.1:{port} and
        # runs this container's readiness probe itself, on 127.0.0.1 (knative/serving
        # pkg/reconciler/revision/resources/queue.go `applyReadinessProbeDefaults`, localAddress;
        # deploy.go removes the probe from this container), so kubelet never reaches the adapter,
        # and nothing else in the cluster can on the pod IP.
        "args": ["serve", "--host", "127.0.0.1"],
        "ports": [{"name": "http1", "containerPort": ADAPTER_PORT}],
        "env": [
            {"name": "MODEL_URL", "value": f"http://127.0.0.1:{MODEL_PORT}"},
            {"name": "MODELPLANE_MANIFEST", "value": mjson},
        ],
        # No periodSeconds: with 0, queue-proxy probes aggressively (every 25 ms, 100 ms timeout)
        # until the adapter first answers, then as Kubernetes would (knative/serving
        # pkg/queue/readiness/probe.go `shouldProbeAggressively`): the fastest cold start. A
        # period of 1 s turns that off.
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready"},
        },
        "resources": ADAPTER_RESOURCES,
        "securityContext": CONTAINER_SECURITY,
    }
    model = {
        "name": "model",
        "image": model_image(manifest, settings),
        # The manifest's command, run in the model folder: the model images have no CMD of their own.
        "command": list(manifest.command),
        "workingDir": MODEL_DIR,
        "env": [
            {"name": "PORT", "value": str(MODEL_PORT)},
            {"name": "HOST", "value": "127.0.0.1"},
        ],
        "resources": _model_resources(manifest),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [tmp_mount],
    }
    return {
        "apiVersion": SERVING_API,
        "kind": "Service",
        "metadata": {
            "name": manifest.name,
            "namespace": settings.namespace,
            "labels": service_labels,
            "annotations": {ANN_MANIFEST: mjson},
        },
        "spec": {
            "template": {
                "metadata": {
                    "name": revision,
                    "labels": meta_labels,
                    "annotations": {**autoscaling_annotations(manifest), ANN_MANIFEST: mjson, ANN_NO_GC: "true"},
                },
                "spec": {
                    "containerConcurrency": 0,
                    "timeoutSeconds": timeout,
                    "containers": [adapter, model],
                    "volumes": [{"name": TMP_VOLUME, "emptyDir": {}}],
                    **_pull_secrets(settings),
                },
            },
            # Pinned, not "latest": a new revision gets traffic only when the runtime says so,
            # and a rollout, promote or rollback is a change of this list alone.
            "traffic": traffic_list(manifest.name, {manifest.version: revision}, Traffic(live=manifest.version)),
        },
    }


def traffic_list(name: str, revisions: Mapping[str, str], traffic: Traffic) -> list[dict]:
    """A Service's `spec.traffic`: the live version's revision with its share, the candidate's
    with the rest, and each pinned version at 0 %; each pinned to its revision and tagged
    `version_tag(version)`, so it also has a URL of its own (Knative routes a tag at
    `{tag}-{name}`: knative/networking pkg/config/config.go DefaultTagTemplate; serving
    pkg/apis/serving/v1/route_validation.go requires tags to be unique DNS-1035 labels and the
    percents to sum to 100). A version whose tag would make that name longer than a label may
    be has no tag, and no URL of its own.

    Every other deployed version is left out on purpose. Knative counts any revision named in a
    Route as active (serving pkg/reconciler/labeler: routingState "active"), and an active
    revision keeps its `min-scale` pods (pkg/apis/autoscaling/v1alpha1/pa_lifecycle.go
    `ScaleBounds` honours min-scale unless the PodAutoscaler is Unreachable, which
    pkg/reconciler/revision/resources/pa.go `reachability` sets for routingState "reserve").
    Each tag also gets a Kubernetes Service carrying a copy of the Service's annotations
    (pkg/reconciler/route/resources/service.go). So the list, and what it costs, is bounded by
    the versions that need a route, not by how many were ever deployed."""
    out = []
    for t in traffic.targets():
        revision = revisions.get(t["version"])
        if revision is None:
            continue
        target = {"revisionName": revision, "percent": t["percent"], "latestRevision": False}
        if tag_fits(name, t["tag"]):
            target["tag"] = t["tag"]
        out.append(target)
    return out


def tag_fits(name: str, tag: str) -> bool:
    """Whether `tag` names a Kubernetes Service `{tag}-{name}` (a DNS-1035 label)."""
    return rules.is_dns1035_label(tag) and rules.is_dns1035_label(f"{tag}-{name}")


# -- batch --------------------------------------------------------------------------------

def results_prefix(settings, model: str, job: str) -> str:
    """Where a batch Job publishes `scores.csv` and `result.json` (its RESULTS_URI)."""
    return f"gs://{settings.bucket_name}/results/{model}/{job}/"


def job_sink(manifest: Manifest, settings) -> dict:
    """One version's JobSink. Its Job runs two main containers over a shared emptyDir (the
    hand-over is in adapters/batch.py): Knative's dispatcher gives the event file to main
    containers only, and the model image needs no Python."""
    adapter_env = _job_adapter_env(manifest, settings, manifest_json(manifest))
    mounts = [{"name": WORK_VOLUME, "mountPath": WORK_DIR}, {"name": TMP_VOLUME, "mountPath": "/tmp"}]
    score = score_step(manifest, WORK_DIR)
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.job_service_account,
        "securityContext": POD_SECURITY,
        "containers": [
            {
                "name": "adapter",
                "image": settings.adapter_image_ref,
                "args": ["job", "--work", WORK_DIR],
                "env": adapter_env,
                "volumeMounts": mounts,
                "resources": ADAPTER_RESOURCES,
                "securityContext": CONTAINER_SECURITY,
            },
            {
                "name": "model",
                "image": model_image(manifest, settings),
                "workingDir": MODEL_DIR,
                "command": score["command"],
                "env": [{"name": k, "value": v} for k, v in score["env"].items()],
                "volumeMounts": mounts,
                "resources": _model_resources(manifest),
                "securityContext": CONTAINER_SECURITY,
            },
        ],
        "volumes": [{"name": WORK_VOLUME, "emptyDir": {}}, {"name": TMP_VOLUME, "emptyDir": {}}],
        **_pull_secrets(settings),
    }
    # the model enforces batch.timeout itself; this bounds the fetch and the publish too
    return _job_sink_object(manifest, settings, pod_spec, int(math.ceil(manifest.batch.timeout_seconds)) + 300)


def _job_adapter_env(manifest: Manifest, settings, mjson: str) -> list[dict]:
    adapter_env = [
        {"name": "MODELPLANE_MANIFEST", "value": mjson},
        {"name": "MODELPLANE_BUCKET", "value": settings.bucket_name},
        # The Job controller labels each pod with its Job's name: that is the job id.
        {"name": "JOB_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}}},
        # Results go to the plane's bucket, whichever bucket the dataset came from.
        {"name": "RESULTS_URI", "value": results_prefix(settings, manifest.name, "$(JOB_ID)")},
    ]
    if settings.storage_emulator_host:  # a GCS emulator instead of GCS (tests, kind clusters)
        adapter_env.append({"name": "STORAGE_EMULATOR_HOST", "value": settings.storage_emulator_host})
        # an emulator that answers only its key (modelplane's, control/emulator_guard.py) is read
        # with the key in this Secret, when there is one; the model itself never gets it
        adapter_env.append({"name": "MODELPLANE_STORAGE_KEY", "valueFrom": {"secretKeyRef": {
            "name": STORAGE_KEY_SECRET, "key": "key", "optional": True}}})
    return adapter_env


def _job_sink_object(manifest: Manifest, settings, pod_spec: dict, deadline_seconds: int) -> dict:
    name = object_name(manifest)
    mjson = manifest_json(manifest)
    meta_labels = labels(manifest)
    return {
        "apiVersion": JOBSINK_API,
        "kind": "JobSink",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": meta_labels,
            "annotations": {ANN_MANIFEST: mjson},
        },
        "spec": {
            "job": {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"labels": meta_labels, "annotations": {ANN_VERSION: manifest.version}},
                "spec": {
                    "backoffLimit": 0,  # a failed model run is reported, not retried
                    "activeDeadlineSeconds": deadline_seconds,
                    "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
                    "template": {"metadata": {"labels": meta_labels}, "spec": pod_spec},
                },
            },
        },
    }


STREAM_SUFFIX = "-stream"   # a realtime model's Trigger: `{model}-stream` (a batch model's is `{model}`)
STREAM_DEADLINE_SECONDS = 24 * 3600   # a streamed job's Job: whatever the dataset, it ends within a day


def stream_trigger_name(model: str) -> str:
    return model + STREAM_SUFFIX


def predict_url(manifest: Manifest, settings) -> str:
    """The model's Knative Service inside the cluster (its cluster-local address, which Knative's
    ingress routes to the live revisions whatever the Service's visibility)."""
    return f"http://{manifest.name}.{settings.namespace}.svc.cluster.local/predict"


def stream_job_sink(manifest: Manifest, settings) -> dict:
    """A realtime version's JobSink: its Job runs one container, the adapter's `stream` command
    (adapters/stream.py), which reads the dataset named by the JobSink's event and sends it in
    chunks of limits.max_rows to the model's Service — the same replicas as live traffic, scaled
    by Knative as for it. What the Job gets from Knative's JobSink dispatcher is the batch
    Job's (knative/eventing cmd/jobsink/main.go `ServeHTTP`): the event as a Secret volume in the
    main containers with K_EVENT_PATH, K_EXECUTION_MODE from the JobSink's defaults; the adapter
    reads $K_EVENT_PATH/event (adapters/batch.py `resolve_job`)."""
    mounts = [{"name": WORK_VOLUME, "mountPath": WORK_DIR}, {"name": TMP_VOLUME, "mountPath": "/tmp"}]
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.job_service_account,
        "securityContext": POD_SECURITY,
        "containers": [{
            "name": "adapter",
            "image": settings.adapter_image_ref,
            "args": ["stream", "--url", predict_url(manifest, settings), "--work", WORK_DIR],
            "env": _job_adapter_env(manifest, settings, manifest_json(manifest)),
            "volumeMounts": mounts,
            "resources": ADAPTER_RESOURCES,
            "securityContext": CONTAINER_SECURITY,
        }],
        "volumes": [{"name": WORK_VOLUME, "emptyDir": {}}, {"name": TMP_VOLUME, "emptyDir": {}}],
        **_pull_secrets(settings),
    }
    return _job_sink_object(manifest, settings, pod_spec, STREAM_DEADLINE_SECONDS)


def stream_objects(manifest: Manifest, settings) -> list[dict]:
    """A realtime version's JobSink and the model's `{model}-stream` Trigger (its incoming/ prefix):
    a dataset dropped for a realtime model runs as a job streamed through its replicas."""
    manifest = revalidate(manifest)
    sink = stream_job_sink(manifest, settings)
    trig = trigger(manifest, settings, job_sink_name=sink["metadata"]["name"])
    trig["metadata"]["name"] = stream_trigger_name(manifest.name)
    _check_job_sink_name(manifest, sink["metadata"]["name"])
    return _admitted(manifest, [sink, trig], settings)


def trigger(manifest: Manifest, settings, *, job_sink_name: str) -> dict:
    """The model's one Trigger: its bucket prefix's finalized events -> the live version's JobSink."""
    meta_labels = labels(manifest)
    return {
        "apiVersion": TRIGGER_API,
        "kind": "Trigger",
        "metadata": {
            "name": manifest.name,
            "namespace": settings.namespace,
            "labels": meta_labels,
        },
        "spec": {
            "broker": settings.broker,
            # Each expression takes one attribute; all entries must match.
            "filters": [
                {"exact": {"type": FINALIZED}},
                {"exact": {"source": bucket_source(settings.bucket_name)}},
                {"prefix": {"subject": f"objects/incoming/{manifest.name}/"}},
            ],
            "subscriber": {"ref": {"apiVersion": JOBSINK_API, "kind": "JobSink", "name": job_sink_name}},
        },
    }


def job_name(job_sink_name: str, source: str, event_id: str) -> str:
    """The name Knative's JobSink dispatcher gives the Job of an event (knative/eventing
    cmd/jobsink/main.go `toJobName`, Eventing >= 1.17):
    `kmeta.ChildName(sink + "-", md5hex(source + id))`. The same event gives the same Job
    whichever way it arrives, so a second delivery finds the first."""
    digest = hashlib.md5((source + event_id).encode()).hexdigest()  # noqa: S324 - a name, not security
    return rules.child_name(job_sink_name + "-", rules.to_dns1123_subdomain(digest))


def job_for_event(sink: dict, *, name: str, event_id: str, source: str,
                  dataset: str, event_key: Optional[str], trigger_label: str) -> dict:
    """A Job from a JobSink's template exactly as Knative's JobSink dispatcher builds one for a
    delivered event (knative/eventing cmd/jobsink/main.go `ServeHTTP`): the JobSink's defaults
    applied first (K_EXECUTION_MODE, pkg/apis/sinks/v1alpha1/job_sink_defaults.go), its labels,
    an owner reference to the JobSink, and the event Secret (named like the Job) as volume
    `jobsink-event`, mounted with K_EVENT_PATH in the *main* containers only. Plus our own
    annotations (dataset, event), which the dispatcher does not write."""
    template = json.loads(json.dumps(sink["spec"]["job"]))
    pod = template["spec"]["template"]["spec"]
    env_name, env_value = EXECUTION_MODE_ENV
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        env = container.setdefault("env", [])
        if not any(e.get("name") == env_name for e in env):
            env.append({"name": env_name, "value": env_value})
    meta = template.setdefault("metadata", {})
    meta["name"] = name
    meta["namespace"] = sink["metadata"]["namespace"]
    meta.setdefault("labels", {}).update({
        JOBSINK_ID_LABEL: name,
        JOBSINK_NAME_LABEL: sink["metadata"]["name"],
        LABEL_TRIGGER: label_value(trigger_label),
    })
    meta["annotations"] = {**meta.get("annotations", {}), ANN_DATASET: dataset, "modelplane.dev/event-id": event_id,
                           "modelplane.dev/event-source": source}
    if event_key:
        meta["annotations"][ANN_EVENT_KEY] = event_key
    uid = sink["metadata"].get("uid")
    if uid:
        meta.setdefault("ownerReferences", []).append({
            "apiVersion": JOBSINK_API, "kind": "JobSink", "name": sink["metadata"]["name"],
            "uid": uid, "controller": True, "blockOwnerDeletion": False,
        })
    mount_path = EVENT_PATH
    for container in pod.get("containers", []):
        mounts = container.setdefault("volumeMounts", [])
        existing = next((m for m in mounts if m["name"] == EVENT_VOLUME), None)
        if existing is not None:
            mount_path = existing["mountPath"]
        else:
            mounts.append({"name": EVENT_VOLUME, "readOnly": True, "mountPath": EVENT_PATH})
            mount_path = EVENT_PATH
        container.setdefault("env", []).append({"name": "K_EVENT_PATH", "value": mount_path})
    volumes = pod.setdefault("volumes", [])
    if not any(v["name"] == EVENT_VOLUME for v in volumes):
        volumes.append({"name": EVENT_VOLUME, "secret": {"secretName": name}})
    return template


def finalized_event(*, bucket: str, obj: str, event_id: str, generation: Optional[str] = None) -> dict:
    """A structured `google.cloud.storage.object.v1.finalized` CloudEvent for gs://bucket/obj."""
    data: dict[str, Any] = {"bucket": bucket, "name": obj, "kind": "storage#object",
                            "contentType": "text/csv"}
    if generation:
        data["generation"] = str(generation)
    return {
        "specversion": "1.0",
        "id": event_id,
        "type": FINALIZED,
        "source": bucket_source(bucket),
        "subject": f"objects/{obj}",
        "datacontenttype": "application/json",
        "data": data,
    }
