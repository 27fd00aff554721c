"""What a model version becomes on a Knative cluster, as plain dicts: no Kubernetes client here.

Pure functions of (manifest, settings) so that `modelplane render` works offline and the
cluster runtime writes exactly what the CLI shows. A realtime version is one Knative
`Service` revision (adapter + model containers); a batch version is a `JobSink` whose Job
runs fetch -> score -> publish, plus the model's `Trigger` on the Broker.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Optional

import yaml

from adapters.batch import FINALIZED, score_step
from adapters.manifest import Manifest
from control.errors import Invalid

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
ANN_VERSIONS = "modelplane.dev/versions"  # realtime: {version: {revision, deployed_at, manifest}}
ANN_DATASET = "modelplane.dev/dataset"
ANN_VERSION = "modelplane.dev/version"  # exact version (labels cannot hold `+build`)
ANN_EVENT_KEY = "modelplane.dev/event-key"
LABEL_TRIGGER = "modelplane.dev/trigger"

# Knative Eventing's own JobSink names (knative/eventing pkg/apis/sinks/constants.go).
JOBSINK_NAME_LABEL = "sinks.knative.dev/job-sink-name"
JOBSINK_ID_LABEL = "sinks.knative.dev/job-sink-id"
# The JobSink dispatcher adds a Secret volume of this name holding the event to the Job's
# *containers* only; the fetch init container mounts it by name to read the event too.
EVENT_VOLUME = "jobsink-event"
EVENT_PATH = "/etc/jobsink-event"

ADAPTER_PORT = 8080  # the one port Knative routes to (the adapter)
MODEL_PORT = 8081  # the model's loopback port inside the pod; not one Knative reserves
MODEL_DIR = "/model"  # where knative/images/*-base put the model folder
WORK_DIR = "/work"
WORK_VOLUME = "work"
JOB_TTL_SECONDS = 7 * 24 * 3600  # finished Jobs (and their status) stay a week
ADAPTER_RESOURCES = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


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


def check_renderable(manifest: Manifest) -> Manifest:
    """Re-validate the manifest and check what the cluster would refuse, before any request.

    Raises Invalid naming the field; returns a freshly validated manifest.
    """
    try:
        checked = Manifest.model_validate(manifest.model_dump(mode="python"))
    except Exception as e:  # pydantic.ValidationError, or anything a hand-built manifest trips
        raise Invalid(f"the manifest of {getattr(manifest, 'name', '?')} is not valid: {e}") from None
    name = object_name(checked)
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise Invalid(
            f"name/version: '{name}' (the {'revision' if checked.kind == 'realtime' else 'JobSink'} name, "
            f"{{name}}-{{version}}) must be a DNS label of at most 63 characters; it has {len(name)}: "
            "shorten the model name or the version",
            details={"problems": [{"field": "name", "message": "name and version together are too long"}]})
    return checked


def render_objects(manifest: Manifest, settings) -> list[dict]:
    """The Kubernetes objects of one model version, in the order they should be applied."""
    manifest = check_renderable(manifest)
    if manifest.kind == "realtime":
        objects = [realtime_service(manifest, settings)]
    else:
        sink = job_sink(manifest, settings)
        objects = [sink, trigger(manifest, settings, job_sink_name=sink["metadata"]["name"])]
    # Fresh copies: no dict shared between objects (labels appear in several places).
    return json.loads(json.dumps(objects))


def render_yaml(manifest: Manifest, settings) -> str:
    """`render_objects` as a multi-document YAML stream, ready for `kubectl apply -f -`."""
    return yaml.dump_all(render_objects(manifest, settings), Dumper=_PlainDumper, sort_keys=False,
                         default_flow_style=False, width=120)


class _PlainDumper(yaml.SafeDumper):
    """No `&id001` anchors: the YAML is for people and kubectl."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# -- realtime -----------------------------------------------------------------------------

def autoscaling_annotations(manifest: Manifest) -> dict[str, str]:
    """Knative Pod Autoscaler settings from `scaling` (values must be strings: the CRD says so)."""
    s = manifest.scaling
    return {
        "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/target": str(s.target_concurrency),
        "autoscaling.knative.dev/min-scale": str(s.min),
        "autoscaling.knative.dev/max-scale": str(s.max),
        # Knative caps scale-down-delay at 1h; idle_timeout is how long a replica stays idle.
        "autoscaling.knative.dev/scale-down-delay": f"{min(int(math.ceil(s.idle_seconds)), 3600)}s",
    }


def realtime_service(manifest: Manifest, settings) -> dict:
    revision = object_name(manifest)
    mjson = manifest_json(manifest)
    meta_labels = labels(manifest)
    timeout = max(int(math.ceil(manifest.limits.timeout_seconds)) + 5, 10)
    adapter = {
        "name": "adapter",
        "image": settings.adapter_image,
        "args": ["serve"],
        "ports": [{"name": "http1", "containerPort": ADAPTER_PORT}],
        "env": [
            {"name": "MODEL_URL", "value": f"http://127.0.0.1:{MODEL_PORT}"},
            {"name": "MODELPLANE_MANIFEST", "value": mjson},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready"},
            "periodSeconds": 1,
            "failureThreshold": 3,
        },
        "resources": ADAPTER_RESOURCES,
    }
    model = {
        "name": "model",
        "image": model_image(manifest, settings),
        "workingDir": MODEL_DIR,
        "env": [
            {"name": "PORT", "value": str(MODEL_PORT)},
            {"name": "HOST", "value": "127.0.0.1"},
        ],
        "resources": {
            "requests": {"cpu": manifest.resources.cpu, "memory": manifest.resources.memory},
            "limits": {"memory": manifest.resources.memory},
        },
    }
    return {
        "apiVersion": SERVING_API,
        "kind": "Service",
        "metadata": {
            "name": manifest.name,
            "namespace": settings.namespace,
            "labels": meta_labels,
            "annotations": {ANN_MANIFEST: mjson},
        },
        "spec": {
            "template": {
                "metadata": {
                    "name": revision,
                    "labels": meta_labels,
                    "annotations": {**autoscaling_annotations(manifest), ANN_MANIFEST: mjson},
                },
                "spec": {
                    "containerConcurrency": 0,
                    "timeoutSeconds": timeout,
                    "containers": [adapter, model],
                },
            },
            # Pinned, not "latest": a new revision gets traffic only when the runtime says so,
            # and rollback is a change of this list alone.
            "traffic": [traffic_target(revision)],
        },
    }


def traffic_target(revision: str) -> dict:
    return {"revisionName": revision, "percent": 100, "latestRevision": False}


# -- batch --------------------------------------------------------------------------------

def job_sink(manifest: Manifest, settings) -> dict:
    name = object_name(manifest)
    mjson = manifest_json(manifest)
    meta_labels = labels(manifest)
    adapter_env = [
        {"name": "MODELPLANE_MANIFEST", "value": mjson},
        {"name": "MODELPLANE_BUCKET", "value": settings.bucket_name},
        # The Job controller labels each pod with its Job's name: that is the job id.
        {"name": "JOB_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}}},
    ]
    work_mount = {"name": WORK_VOLUME, "mountPath": WORK_DIR}
    score = score_step(manifest, WORK_DIR)
    model_resources = {
        "requests": {"cpu": manifest.resources.cpu, "memory": manifest.resources.memory},
        "limits": {"memory": manifest.resources.memory},
    }
    pod_spec = {
        "restartPolicy": "Never",
        "initContainers": [
            {
                "name": "fetch",
                "image": settings.adapter_image,
                "args": ["fetch", "--work", WORK_DIR],
                "env": adapter_env + [{"name": "K_EVENT_PATH", "value": EVENT_PATH}],
                "volumeMounts": [work_mount,
                                 {"name": EVENT_VOLUME, "mountPath": EVENT_PATH, "readOnly": True}],
                "resources": ADAPTER_RESOURCES,
            },
            {
                "name": "score",
                "image": model_image(manifest, settings),
                "workingDir": MODEL_DIR,
                "command": score["command"],
                "env": [{"name": k, "value": v} for k, v in score["env"].items()],
                "volumeMounts": [work_mount],
                "resources": model_resources,
            },
        ],
        "containers": [
            {
                "name": "publish",
                "image": settings.adapter_image,
                "args": ["publish", "--work", WORK_DIR],
                "env": adapter_env,
                "volumeMounts": [work_mount],
                "resources": ADAPTER_RESOURCES,
            },
        ],
        "volumes": [{"name": WORK_VOLUME, "emptyDir": {}}],
    }
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
                    "activeDeadlineSeconds": int(math.ceil(manifest.batch.timeout_seconds)) + 300,
                    "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
                    "template": {"metadata": {"labels": meta_labels}, "spec": pod_spec},
                },
            },
        },
    }


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
    """Knative's JobSink naming (`kmeta.ChildName(sink + "-", md5(source + id))`): the same event
    gives the same Job whichever way it arrives, so a second delivery finds the first."""
    digest = hashlib.md5((source + event_id).encode()).hexdigest()  # noqa: S324 - a name, not security
    prefix = f"{job_sink_name}-"
    if len(prefix) + len(digest) <= 63:
        return prefix + digest
    return f"{job_sink_name[:63 - len(digest) - 1].rstrip('-')}-{digest}"


def job_for_event(sink: dict, *, name: str, event_id: str, source: str,
                  dataset: str, event_key: Optional[str], trigger_label: str) -> dict:
    """A Job from a JobSink's template, as Knative's JobSink dispatcher builds one: its labels,
    an owner reference to the JobSink, the event Secret (named like the Job) mounted at
    /etc/jobsink-event in the containers with K_EVENT_PATH."""
    template = json.loads(json.dumps(sink["spec"]["job"]))
    meta = template.setdefault("metadata", {})
    meta["name"] = name
    meta["namespace"] = sink["metadata"]["namespace"]
    meta.setdefault("labels", {}).update({
        JOBSINK_NAME_LABEL: sink["metadata"]["name"],
        JOBSINK_ID_LABEL: name,
        LABEL_TRIGGER: label_value(trigger_label),
    })
    meta["annotations"] = {**meta.get("annotations", {}), ANN_DATASET: dataset, "modelplane.dev/event-id": event_id,
                           "modelplane.dev/event-source": source}
    if event_key:
        meta["annotations"][ANN_EVENT_KEY] = event_key
    uid = sink["metadata"].get("uid")
    if uid:
        meta["ownerReferences"] = [{
            "apiVersion": JOBSINK_API, "kind": "JobSink", "name": sink["metadata"]["name"],
            "uid": uid, "controller": True, "blockOwnerDeletion": False,
        }]
    pod = template["spec"]["template"]["spec"]
    for container in pod.get("containers", []):
        mounts = container.setdefault("volumeMounts", [])
        if not any(m["name"] == EVENT_VOLUME for m in mounts):
            mounts.append({"name": EVENT_VOLUME, "mountPath": EVENT_PATH, "readOnly": True})
        container.setdefault("env", []).append({"name": "K_EVENT_PATH", "value": EVENT_PATH})
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
