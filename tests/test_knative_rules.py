"""Knative's admission rules, ported (control/runtime/knative_rules.py).

Each rule gets a minimal object that is valid but for exactly that rule, and must come back with
one Problem naming the field, saying something distinctive, and citing its source; the minimal
objects themselves, and every object `render_objects` gives for the example models, pass.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from adapters.manifest import load_manifest
from control.runtime import knative_objects as ko
from control.runtime import knative_rules as rules
from control.settings import Settings

MODELS = Path(__file__).resolve().parent.parent / "models"

# -- minimal valid objects ----------------------------------------------------------------

SC = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def service() -> dict:
    """Two containers: the serving one (a port) and a sidecar on 127.0.0.1:8081 with PORT set."""
    return json.loads(json.dumps({
        "apiVersion": "serving.knative.dev/v1", "kind": "Service",
        "metadata": {"name": "m", "namespace": "ns", "labels": {"app": "m"}},
        "spec": {
            "template": {
                "metadata": {"name": "m-1-0-0", "annotations": {"autoscaling.knative.dev/min-scale": "0"}},
                "spec": {
                    "containers": [
                        {"name": "adapter", "image": "registry.test/adapter:1",
                         "ports": [{"name": "http1", "containerPort": 8080}], "securityContext": SC},
                        {"name": "model", "image": "registry.test/models/m:1.0.0", "securityContext": SC,
                         "env": [{"name": "PORT", "value": "8081"}],
                         "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]},
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
            "traffic": [{"revisionName": "m-1-0-0", "percent": 100, "latestRevision": False}],
        },
    }))  # through JSON: no dict shared between the two containers


def jobsink() -> dict:
    """Two main containers sharing an emptyDir; runAsNonRoot on the pod, the rest per container."""
    adapter = {"name": "adapter", "image": "registry.test/adapter:1", "securityContext": SC,
               "env": [{"name": "JOB_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}}}],
               "volumeMounts": [{"name": "work", "mountPath": "/work"}],
               "resources": {"requests": {"memory": "64Mi"}, "limits": {"memory": "256Mi"}}}
    return json.loads(json.dumps({
        "apiVersion": "sinks.knative.dev/v1alpha1", "kind": "JobSink",
        "metadata": {"name": "j-1-0-0", "namespace": "ns"},
        "spec": {"job": {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"labels": {"app": "j"}},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"app": "j"}}, "spec": {
                "restartPolicy": "Never", "serviceAccountName": "modelplane-job",
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                "containers": [adapter, {**adapter, "name": "model", "env": []}],
                "volumes": [{"name": "work", "emptyDir": {}}],
            }}},
        }},
    }))  # through JSON: no dict shared between the containers


def trigger() -> dict:
    return {
        "apiVersion": "eventing.knative.dev/v1", "kind": "Trigger",
        "metadata": {"name": "j", "namespace": "ns"},
        "spec": {
            "broker": "default",
            "filters": [{"exact": {"type": "google.cloud.storage.object.v1.finalized"}},
                        {"prefix": {"subject": "objects/incoming/j/"}}],
            "subscriber": {"ref": {"apiVersion": "sinks.knative.dev/v1alpha1", "kind": "JobSink", "name": "j-1-0-0"}},
        },
    }


# -- mutations: "a/b/0/c" paths ('~1' is '/'), a value or DELETE ---------------------------

DELETE = object()


def _apply(obj: dict, path: str, value) -> None:
    value = value if value is DELETE else copy.deepcopy(value)
    *parents, last = [part.replace("~1", "/") for part in path.split("/")]
    for key in parents:
        obj = obj[int(key)] if isinstance(obj, list) else obj.setdefault(key, {})
    if isinstance(obj, list):
        if last == "-":
            obj.append(value)
        elif value is DELETE:
            del obj[int(last)]
        else:
            obj[int(last)] = value
    elif value is DELETE:
        del obj[last]
    else:
        obj[last] = value


def _check(obj: dict, ops, field: str, message: str, config=None, count: int = 1) -> None:
    for path, value in ops:
        _apply(obj, path, value)
    found = rules.problems(obj, config or rules.ClusterConfig())
    listing = "\n".join(f"{p.field}: {p.message} [{p.source}]" for p in found)
    matching = [p for p in found if p.field == field and message in p.message]
    assert matching, f"expected {field}: ...{message}...; got\n{listing}"
    assert len(found) == count, f"expected {count} problem(s); got\n{listing}"
    assert matching[0].source.startswith(("knative/", "kubernetes ", "google/")), matching[0].source


def test_the_minimal_objects_are_valid():
    for obj in (service(), jobsink(), trigger()):
        assert rules.problems(obj) == [], obj["kind"]


T = "spec/template"
TA = f"{T}/metadata/annotations"
TS = f"{T}/spec"
C0, C1 = f"{TS}/containers/0", f"{TS}/containers/1"
A = "autoscaling.knative.dev~1"
FA = "spec.template.metadata.annotations.autoscaling.knative.dev/"
FS = "spec.template.spec"


def cfg(**kw) -> rules.ClusterConfig:
    return rules.ClusterConfig(**kw)


PRIVILEGED = cfg(pod_security_level="privileged")

# (id, [(path, value)...], field, part of the message, config, number of problems)
SERVICE_CASES = [
    # metadata: knative/pkg apis/metadata_validation.go, serving metadata_validation.go
    ("name-dns1035", [("metadata/name", "3d-donors"), (f"{T}/metadata/name", DELETE)], "metadata.name",
     "not a DNS 1035 label", None, 1),
    ("name-length", [("metadata/name", "a" * 64), (f"{T}/metadata/name", DELETE)], "metadata.name",
     "at most 63", None, 1),
    ("rollout-duration", [("metadata/annotations", {"serving.knative.dev/rollout-duration": "1.5s"})],
     "metadata.annotations.serving.knative.dev/rollout-duration", "not at second precision", None, 1),
    ("autoscaling-on-service", [("metadata/annotations", {"autoscaling.knative.dev/target": "8"})],
     "metadata.annotations.autoscaling.knative.dev/target", "spec.template.metadata.annotations", None, 1),
    ("label-value", [("metadata/labels/version", "1.0.0+build")], "metadata.labels.version", "label value",
     None, 1),
    ("label-key", [("metadata/labels/bad key", "x")], "metadata.labels.bad key", "not a qualified name", None, 1),
    ("annotation-size", [("metadata/annotations", {"big": "x" * (256 * 1024)})], "metadata.annotations",
     "256 KiB", None, 1),
    ("template-label-value", [(f"{T}/metadata/labels", {"v": "-x"})], "spec.template.metadata.labels.v",
     "label value", None, 1),
    # the revision name: revision_validation.go validateRevisionName
    ("revision-dns1035", [(f"{T}/metadata/name", "m-1.0")], "spec.template.metadata.name",
     "not a DNS 1035 label", None, 1),
    ("revision-length", [(f"{T}/metadata/name", "m-" + "a" * 62)], "spec.template.metadata.name",
     "at most 63", None, 1),
    ("revision-prefix", [(f"{T}/metadata/name", "other-1-0-0")], "spec.template.metadata.name",
     "must have prefix 'm-'", None, 1),
    # autoscaling annotations: annotation_validation.go
    ("class", [(f"{TA}/{A}class", "xyz.autoscaling.knative.dev")], FA + "class", "autoscaler classes", None, 1),
    ("min-scale-negative", [(f"{TA}/{A}min-scale", "-1")], FA + "min-scale", "expected 0 <= -1", None, 1),
    ("max-scale-syntax", [(f"{TA}/{A}max-scale", "five")], FA + "max-scale", "invalid value: five", None, 1),
    ("max-scale-int32", [(f"{TA}/{A}max-scale", "3000000000")], FA + "max-scale", "2147483647", None, 1),
    ("min-scale-alias", [(f"{TA}/{A}min-scale", DELETE), (f"{TA}/{A}minScale", "-1")], FA + "minScale",
     "expected 0 <= -1", None, 1),
    ("max-below-min", [(f"{TA}/{A}min-scale", "9"), (f"{TA}/{A}max-scale", "5")], FA + "max-scale",
     "max-scale=5 is less than min-scale=9", None, 1),
    ("max-scale-limit", [(f"{TA}/{A}max-scale", "50")], FA + "max-scale", "max-scale-limit",
     cfg(max_scale_limit=10), 1),
    ("max-scale-unlimited", [(f"{TA}/{A}max-scale", "0")], FA + "max-scale", "max-scale=0 (unlimited)",
     cfg(max_scale_limit=10), 1),
    ("activation-scale", [(f"{TA}/{A}activation-scale", "1")], FA + "activation-scale", "must be greater than 1",
     None, 1),
    ("activation-below-min", [(f"{TA}/{A}min-scale", "3"), (f"{TA}/{A}activation-scale", "2")],
     FA + "activation-scale", "min-scale=3 is greater than activation-scale=2", None, 1),
    ("target-min", [(f"{TA}/{A}target", "0.001")], FA + "target", "at least 0.01", None, 1),
    ("target-syntax", [(f"{TA}/{A}target", "8 requests")], FA + "target", "not a number", None, 1),
    ("target-utilization", [(f"{TA}/{A}target-utilization-percentage", "150")],
     FA + "target-utilization-percentage", "expected 1 <= 150 <= 100", None, 1),
    ("panic-window", [(f"{TA}/{A}panic-window-percentage", "0.5")], FA + "panic-window-percentage",
     "expected 1 <= 0.5 <= 100", None, 1),
    ("panic-threshold", [(f"{TA}/{A}panic-threshold-percentage", "100")], FA + "panic-threshold-percentage",
     "expected 110 <= 100 <= 1000", None, 1),
    ("target-burst", [(f"{TA}/{A}target-burst-capacity", "-2")], FA + "target-burst-capacity", "or -1", None, 1),
    ("window-range", [(f"{TA}/{A}window", "5s")], FA + "window", "expected 6s <= 5s", None, 1),
    ("window-precision", [(f"{TA}/{A}window", "6500ms")], FA + "window", "second precision", None, 1),
    ("retention-range", [(f"{TA}/{A}scale-to-zero-pod-retention-period", "2h")],
     FA + "scale-to-zero-pod-retention-period", "expected 0s <= 2h <= 1h0m0s", None, 1),
    ("retention-syntax", [(f"{TA}/{A}scale-to-zero-pod-retention-period", "60 s")],
     FA + "scale-to-zero-pod-retention-period", "not a duration", None, 1),
    ("scale-down-delay-precision", [(f"{TA}/{A}scale-down-delay", "1.5s")], FA + "scale-down-delay",
     "second precision", None, 1),
    ("scale-down-delay-range", [(f"{TA}/{A}scale-down-delay", "-1s")], FA + "scale-down-delay",
     "expected 0s <= -1s", None, 1),
    ("metric-kpa", [(f"{TA}/{A}metric", "cpu")], FA + "metric", "concurrency or rps", None, 1),
    ("metric-hpa", [(f"{TA}/{A}class", "hpa.autoscaling.knative.dev"), (f"{TA}/{A}metric", "")], FA + "metric",
     "HPA", None, 1),
    ("algorithm", [(f"{TA}/{A}class", "kpa.autoscaling.knative.dev"), (f"{TA}/{A}metric-aggregation-algorithm",
                                                                        "median")],
     FA + "metric-aggregation-algorithm", "linear or weighted-exponential", None, 1),
    ("initial-scale-zero", [(f"{TA}/{A}initial-scale", "0")], FA + "initial-scale", "not allowed by cluster",
     None, 1),
    ("initial-scale-negative", [(f"{TA}/{A}initial-scale", "-1")], FA + "initial-scale", "must be greater than 0",
     None, 1),
    # other template annotations
    ("networking-annotation", [(f"{TA}/networking.knative.dev~1visibility", "cluster-local")],
     "spec.template.metadata.annotations.networking.knative.dev/visibility", "a label of the Service", None, 1),
    ("queue-percentage", [(f"{TA}/queue.sidecar.serving.knative.dev~1resource-percentage", "200")],
     "spec.template.metadata.annotations.queue.sidecar.serving.knative.dev/resource-percentage",
     "expected 0.1 <= 200 <= 100", None, 1),
    ("queue-quantity", [(f"{TA}/queue.sidecar.serving.knative.dev~1cpu-resource-request", "lots")],
     "spec.template.metadata.annotations.queue.sidecar.serving.knative.dev/cpu-resource-request",
     "not a Kubernetes quantity", None, 1),
    ("progress-deadline", [(f"{TA}/serving.knative.dev~1progress-deadline", "90.5s")],
     "spec.template.metadata.annotations.serving.knative.dev/progress-deadline", "not at second precision", None, 1),
    # revision spec bounds
    ("timeout-max", [(f"{TS}/timeoutSeconds", 601)], f"{FS}.timeoutSeconds", "expected 0 <= 601 <= 600", None, 1),
    ("timeout-negative", [(f"{TS}/timeoutSeconds", -1)], f"{FS}.timeoutSeconds", "expected 0 <= -1 <= 600",
     None, 1),
    ("timeout-config", [(f"{TS}/timeoutSeconds", 900)], f"{FS}.timeoutSeconds", "expected 0 <= 900 <= 800",
     cfg(max_revision_timeout_seconds=800), 1),
    ("concurrency-max", [(f"{TS}/containerConcurrency", 1001)], f"{FS}.containerConcurrency",
     "expected 0 <= 1001 <= 1000", None, 1),
    ("concurrency-zero", [(f"{TS}/containerConcurrency", 0)], f"{FS}.containerConcurrency",
     "expected 1 <= 0 <= 1000", cfg(allow_container_concurrency_zero=False), 1),
    # PodSpecMask
    ("podspec-restart-policy", [(f"{TS}/restartPolicy", "Always")], f"{FS}.restartPolicy",
     "must not set the field(s): restartPolicy", None, 1),
    ("podspec-unknown", [(f"{TS}/nodeSelectr", {"a": "b"})], f"{FS}.nodeSelectr", "a typo?", None, 1),
    ("podspec-feature", [(f"{TS}/affinity", {})], f"{FS}.affinity", "kubernetes.podspec-affinity", None, 1),
    ("podspec-automount", [(f"{TS}/automountServiceAccountToken", True)], f"{FS}.automountServiceAccountToken",
     "only be set to false", None, 1),
    ("podspec-security-context", [(f"{TS}/securityContext", {"runAsNonRoot": True})], f"{FS}.securityContext",
     "kubernetes.podspec-securitycontext", None, 1),
    ("pod-security-context-sysctls", [(f"{TS}/securityContext", {"runAsNonRoot": True, "sysctls": [
        {"name": "net.ipv4.tcp_syncookies", "value": "1"}]})],
     f"{FS}.securityContext.sysctls", "must not set the field(s): sysctls", cfg(podspec_securitycontext=True), 1),
    ("secure-pod-defaults-pod-sc", [(f"{TS}/securityContext", {"runAsUser": 1000})],
     f"{FS}.securityContext.runAsUser", "must not set the field(s): runAsUser", cfg(secure_pod_defaults="Enabled"), 1),
    ("podspec-init-containers", [(f"{TS}/initContainers", [{"name": "fetch", "image": "registry.test/adapter:1",
                                                            "securityContext": SC}])], f"{FS}.initContainers",
     "kubernetes.podspec-init-containers", None, 1),
    ("service-account", [(f"{TS}/serviceAccountName", "Model_SA")], f"{FS}.serviceAccountName",
     "DNS-1123 subdomain", None, 1),
    # volumes: ValidateVolumes, validateVolume
    ("volume-duplicate", [(f"{TS}/volumes/-", {"name": "tmp", "emptyDir": {}})], f"{FS}.volumes[1].name",
     "duplicate volume name", None, 1),
    ("volume-not-mounted", [(f"{TS}/volumes/-", {"name": "extra", "emptyDir": {}})], f"{FS}.volumes[1].name",
     "not mounted", None, 1),
    ("volume-name", [(f"{TS}/volumes/0/name", "Tmp"), (f"{C1}/volumeMounts/0/name", "Tmp")],
     f"{FS}.volumes[0].name", "DNS-1123 label", None, 1),
    # deploy.go makePodSpec adds a volume of its own only under a setting: then a user volume of
    # that name makes the Deployment invalid (server-certs, under system-internal-tls, in
    # test_a_knative_volume_name_is_taken_only_under_its_setting)
    ("volume-knative-pod-info", [(f"{TS}/volumes/0/name", "pod-info"), (f"{C1}/volumeMounts/0/name", "pod-info")],
     f"{FS}.volumes[0].name", "Knative adds", cfg(queueproxy_mount_podinfo="Enabled"), 1),
    ("volume-knative-var-log", [(f"{TS}/volumes/0/name", "knative-var-log"),
                                (f"{C1}/volumeMounts/0/name", "knative-var-log")],
     f"{FS}.volumes[0].name", "Knative adds", cfg(var_log_collection=True), 1),
    ("volume-knative-token", [(f"{TS}/volumes/0/name", "knative-token-volume"),
                              (f"{C1}/volumeMounts/0/name", "knative-token-volume")],
     f"{FS}.volumes[0].name", "Knative adds", cfg(queue_sidecar_token_audiences=frozenset({"modelplane.test"})), 1),
    ("volume-emptydir-flag", [], f"{FS}.volumes[0].emptyDir", "emptyDir volume support is disabled",
     cfg(podspec_volumes_emptydir=False), 1),
    ("volume-no-source", [(f"{TS}/volumes/0", {"name": "tmp"})], f"{FS}.volumes[0]",
     "expected exactly one, got neither", None, 1),
    ("volume-two-sources", [(f"{TS}/volumes/0/secret", {"secretName": "s"})], f"{FS}.volumes[0]",
     "got both: secret, emptyDir", None, 1),
    ("volume-hostpath-flag", [(f"{TS}/volumes/0", {"name": "tmp", "hostPath": {"path": "/x"}})],
     f"{FS}.volumes[0].hostPath", "kubernetes.podspec-volumes-hostpath", PRIVILEGED, 1),
    ("volume-unsupported-type", [(f"{TS}/volumes/0", {"name": "tmp", "emptyDir": {}, "gitRepo": {"repository": "x"}})],
     f"{FS}.volumes[0].gitRepo", "must not set the field(s): gitRepo", PRIVILEGED, 1),
    ("volume-medium", [(f"{TS}/volumes/0/emptyDir", {"medium": "Disk"})], f"{FS}.volumes[0].emptyDir.medium",
     "\"Memory\"", None, 1),
    ("volume-pvc-write", [(f"{TS}/volumes/0", {"name": "tmp", "persistentVolumeClaim": {"claimName": "c"}})],
     f"{FS}.volumes[0].persistentVolumeClaim", "write support is disabled",
     cfg(podspec_persistent_volume_claim=True), 1),
    ("volume-items", [(f"{TS}/volumes/-", {"name": "conf", "configMap": {"name": "c", "items": [{"path": "p"}]}}),
                      (f"{C1}/volumeMounts/-", {"name": "conf", "mountPath": "/conf", "readOnly": True})],
     f"{FS}.volumes[1].configMap.items[0].key", "missing field(s): key", None, 1),
    # containers: ValidatePodSpec, validateContainers, validateContainersPorts
    ("no-containers", [(f"{TS}/containers", []), (f"{TS}/volumes", [])], f"{FS}.containers",
     "a revision needs a container", None, 1),
    ("multi-container-flag", [], f"{FS}.containers", "multi-container is off", cfg(multi_container=False), 1),
    ("no-port", [(f"{C0}/ports", DELETE)], f"{FS}.containers[*].ports", "exactly one", None, 1),
    ("two-ports", [(f"{C1}/ports", [{"containerPort": 9000}]), (f"{C1}/env", [])], f"{FS}.containers[*].ports",
     "only a single port", None, 1),
    ("container-duplicate", [(f"{C1}/name", "adapter")], f"{FS}.containers[1].name", "duplicate container name",
     None, 1),
    ("container-reserved", [(f"{C1}/name", "queue-proxy")], f"{FS}.containers[1].name",
     "reserved container name", None, 1),
    ("container-name-k8s", [(f"{C1}/name", "Model")], f"{FS}.containers[1].name", "DNS-1123 label", None, 1),
    ("container-field", [(f"{C0}/lifecycle", {"preStop": {}})], f"{FS}.containers[0].lifecycle",
     "must not set the field(s): lifecycle", None, 1),
    ("container-unknown-field", [(f"{C1}/volumeMount", [])], f"{FS}.containers[1].volumeMount", "a typo?", None, 1),
    ("container-empty", [(f"{TS}/containers/-", {})], f"{FS}.containers[2]", "missing field(s)", PRIVILEGED, 1),
    # env: validateEnvVar (+ Kubernetes' own check of the Deployment)
    ("env-port-serving", [(f"{C0}/env", [{"name": "PORT", "value": "8080"}])], f"{FS}.containers[0].env[0].name",
     "reserved environment variable", None, 1),
    ("env-reserved-sidecar", [(f"{C1}/env/0/name", "K_SERVICE")], f"{FS}.containers[1].env[0].name",
     "reserved environment variable", None, 1),
    ("env-name-missing", [(f"{C1}/env/0/name", "")], f"{FS}.containers[1].env[0].name", "missing field(s): name",
     None, 1),
    ("env-name-k8s", [(f"{C1}/env/0/name", "A=B")], f"{FS}.containers[1].env[0].name", "other than '='", None, 1),
    ("env-fieldref-flag", [(f"{C1}/env/0", {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})],
     f"{FS}.containers[1].env[0].valueFrom.fieldRef", "kubernetes.podspec-fieldref", None, 1),
    ("env-fieldref-path", [(f"{C1}/env/0", {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}})],
     f"{FS}.containers[1].env[0].valueFrom.fieldRef.fieldPath", "Unsupported value", cfg(podspec_fieldref=True), 1),
    ("env-two-sources", [(f"{C1}/env/0", {"name": "N", "valueFrom": {
        "configMapKeyRef": {"name": "c", "key": "k"}, "secretKeyRef": {"name": "s", "key": "k"}}})],
     f"{FS}.containers[1].env[0].valueFrom", "more than one field", None, 1),
    ("env-from", [(f"{C1}/envFrom", [{"prefix": "X_"}])], f"{FS}.containers[1].envFrom[0]",
     "got neither: configMapRef, secretRef", None, 1),
    # image: validate -> go-containerregistry name.ParseReference
    ("image-missing", [(f"{C1}/image", "")], f"{FS}.containers[1].image", "missing field(s): image", None, 1),
    ("image-uppercase", [(f"{C1}/image", "registry.test/Models/m:1")], f"{FS}.containers[1].image",
     "Failed to parse image reference", None, 1),
    ("image-tag", [(f"{C1}/image", "registry.test/m:1.0.0+b1")], f"{FS}.containers[1].image", "tag '1.0.0+b1'",
     None, 1),
    ("image-digest", [(f"{C1}/image", "registry.test/models/m@sha256:abc")], f"{FS}.containers[1].image",
     "digest", None, 1),
    ("image-short-repository", [(f"{C1}/image", "ghcr.io/m:1.0.0")], f"{FS}.containers[1].image", "(2 to 255)",
     None, 1),
    # ports: validateContainerPorts, validateContainerPortBasic
    ("port-reserved", [(f"{C0}/ports/0/containerPort", 8012)], f"{FS}.containers[0].ports[0].containerPort",
     "8012 is a reserved port", None, 1),
    ("port-name", [(f"{C0}/ports/0/name", "http")], f"{FS}.containers[0].ports[0].name",
     "Port name http is not allowed", None, 1),
    ("port-protocol", [(f"{C0}/ports/0/protocol", "UDP")], f"{FS}.containers[0].ports[0].protocol", "TCP only",
     None, 1),
    ("port-host-port", [(f"{C0}/ports/0/hostPort", 80)], f"{FS}.containers[0].ports[0].hostPort",
     "must not set the field(s): hostPort", PRIVILEGED, 1),
    ("port-range", [(f"{C0}/ports/0/containerPort", 70000)], f"{FS}.containers[0].ports[0].containerPort",
     "expected 0 <= 70000 <= 65535", None, 1),
    # resources: ResourceRequirementsMask (+ Kubernetes ValidateResourceRequirements)
    ("resources-claims", [(f"{C1}/resources", {"claims": [{"name": "gpu"}]})], f"{FS}.containers[1].resources.claims",
     "must not set the field(s): claims", None, 1),
    ("resources-request-over-limit", [(f"{C1}/resources", {"requests": {"memory": "1Gi"},
                                                          "limits": {"memory": "512Mi"}})],
     f"{FS}.containers[1].resources.requests.memory", "less than or equal to memory limit", None, 1),
    ("resources-quantity", [(f"{C1}/resources", {"requests": {"cpu": "half"}})],
     f"{FS}.containers[1].resources.requests.cpu", "quantities must match", None, 1),
    # securityContext: SecurityContextMask, CapabilitiesMask, validateSecurityContext
    ("sc-proc-mount", [(f"{C1}/securityContext/procMount", "Default")], f"{FS}.containers[1].securityContext.procMount",
     "must not set the field(s): procMount", None, 1),
    ("sc-privileged", [(f"{C1}/securityContext/privileged", True)], f"{FS}.containers[1].securityContext.privileged",
     "only be set to false", PRIVILEGED, 1),
    ("sc-add-capabilities", [(f"{C1}/securityContext/capabilities/add", ["NET_BIND_SERVICE"])],
     f"{FS}.containers[1].securityContext.capabilities.add", "kubernetes.containerspec-addcapabilities", None, 1),
    ("sc-run-as-user", [(f"{C1}/securityContext/runAsUser", -1)], f"{FS}.containers[1].securityContext.runAsUser",
     "expected 0 <= -1", None, 1),
    ("termination-message-policy", [(f"{C1}/terminationMessagePolicy", "Always")],
     f"{FS}.containers[1].terminationMessagePolicy", "invalid value: Always", None, 1),
    # volume mounts: validateVolumeMounts
    ("mount-no-volume", [(f"{C1}/volumeMounts/-", {"name": "nothing", "mountPath": "/x"})],
     f"{FS}.containers[1].volumeMounts[1].name", "no matching volume", None, 1),
    ("mount-reserved", [(f"{C1}/volumeMounts/0/mountPath", "/dev")], f"{FS}.containers[1].volumeMounts[0].mountPath",
     "is a reserved path", None, 1),
    ("mount-reserved-cleaned", [(f"{C1}/volumeMounts/0/mountPath", "//dev/log/")],
     f"{FS}.containers[1].volumeMounts[0].mountPath", "'/dev/log' is a reserved path", None, 1),
    ("mount-relative", [(f"{C1}/volumeMounts/0/mountPath", "tmp")], f"{FS}.containers[1].volumeMounts[0].mountPath",
     "absolute", None, 1),
    ("mount-duplicate", [(f"{C1}/volumeMounts/-", {"name": "tmp", "mountPath": "/tmp/"})],
     f"{FS}.containers[1].volumeMounts[1].mountPath", "must be unique", None, 1),
    ("mount-var-log", [(f"{C1}/volumeMounts/0/mountPath", "/var/log")], f"{FS}.containers[1].volumeMounts[0].mountPath",
     "logging.enable-var-log-collection", cfg(var_log_collection=True), 1),
    ("mount-sub-path-expr", [(f"{C1}/volumeMounts/0/subPathExpr", "$(POD)")],
     f"{FS}.containers[1].volumeMounts[0].subPathExpr", "must not set the field(s): subPathExpr", None, 1),
    # probes: validateProbe, validateReadinessProbe, validateSidecarContainer (after revision_defaults.go)
    ("probe-port-name", [(f"{C0}/readinessProbe", {"httpGet": {"path": "/", "port": "metrics"}})],
     f"{FS}.containers[0].readinessProbe.httpGet.port", "Probe port must match container port", None, 1),
    ("probe-two-handlers", [(f"{C0}/livenessProbe", {"httpGet": {}, "tcpSocket": {}})],
     f"{FS}.containers[0].livenessProbe", "got both: httpGet, tcpSocket", None, 1),
    ("probe-no-handler", [(f"{C0}/livenessProbe", {"periodSeconds": 5})], f"{FS}.containers[0].livenessProbe",
     "got neither: httpGet, tcpSocket, exec, grpc", None, 1),
    ("readiness-timeout", [(f"{C0}/readinessProbe", {"httpGet": {}, "periodSeconds": 1, "timeoutSeconds": -1})],
     f"{FS}.containers[0].readinessProbe.timeoutSeconds", "expected 1 <= -1", None, 1),
    ("readiness-zero-period", [(f"{C0}/readinessProbe", {"httpGet": {}, "failureThreshold": 3})],
     f"{FS}.containers[0].readinessProbe.failureThreshold", "disallowed when periodSeconds is zero", None, 1),
    ("readiness-success", [(f"{C0}/readinessProbe", {"httpGet": {}, "successThreshold": -1})],
     f"{FS}.containers[0].readinessProbe.successThreshold", "expected 1 <= -1", None, 1),
    ("sidecar-probe", [(f"{C1}/readinessProbe", {"httpGet": {"path": "/", "port": 8081}})],
     f"{FS}.containers[1].readinessProbe.httpGet", "multi-container-probing", None, 1),
    ("sidecar-probe-port", [(f"{C1}/livenessProbe", {"tcpSocket": {}})],
     f"{FS}.containers[1].livenessProbe.tcpSocket.port",
     "Probe port must be specified", cfg(multi_container_probing=True), 1),
    # Pod Security Admission (restricted) on the revision's pods
    ("psa-privilege-escalation", [(f"{C1}/securityContext/allowPrivilegeEscalation", DELETE)],
     f"{FS}.containers[1].securityContext.allowPrivilegeEscalation", "must be set to false", None, 1),
    ("psa-run-as-non-root", [(f"{C1}/securityContext/runAsNonRoot", DELETE)],
     f"{FS}.containers[1].securityContext.runAsNonRoot", "runAsNonRoot must be true", None, 1),
    ("psa-run-as-root", [(f"{C1}/securityContext/runAsUser", 0)], f"{FS}.containers[1].securityContext.runAsUser",
     "root", None, 1),
    ("psa-seccomp", [(f"{C1}/securityContext/seccompProfile", DELETE)],
     f"{FS}.containers[1].securityContext.seccompProfile", "RuntimeDefault or Localhost", None, 1),
    ("psa-seccomp-unconfined", [(f"{C1}/securityContext/seccompProfile/type", "Unconfined")],
     f"{FS}.containers[1].securityContext.seccompProfile.type", "Unconfined is not allowed", None, 1),
    ("psa-drop-all", [(f"{C1}/securityContext/capabilities", {"drop": ["NET_RAW"]})],
     f"{FS}.containers[1].securityContext.capabilities.drop", "must include \"ALL\"", None, 1),
    ("psa-add-capability", [(f"{C1}/securityContext/capabilities/add", ["CHOWN"])],
     f"{FS}.containers[1].securityContext.capabilities.add", "only NET_BIND_SERVICE",
     cfg(containerspec_addcapabilities=True), 1),
    # traffic: route_validation.go (+ the tag's Kubernetes Service)
    ("traffic-sum", [("spec/traffic/0/percent", 90)], "spec.traffic", "sum to 90, want 100", None, 1),
    ("traffic-percent-range", [("spec/traffic", [{"revisionName": "m-1-0-0", "percent": 101},
                                                 {"revisionName": "m-0-9-0", "percent": -1}])],
     "spec.traffic[0].percent", "expected 0 <= 101 <= 100", None, 2),
    ("traffic-latest", [("spec/traffic/0/latestRevision", True)], "spec.traffic[0].latestRevision",
     "may not set revisionName", None, 1),
    ("traffic-configuration", [("spec/traffic/0/configurationName", "m")], "spec.traffic[0].configurationName",
     "must not set the field(s): configurationName", None, 1),
    ("traffic-revision-name", [("spec/traffic/0/revisionName", "m 1")], "spec.traffic[0].revisionName",
     "not a qualified name", None, 1),
    ("traffic-url", [("spec/traffic/0/url", "http://m.ns")], "spec.traffic[0].url", "must not set", None, 1),
    ("traffic-tag", [("spec/traffic/0/tag", "1-0-0")], "spec.traffic[0].tag", "not a DNS 1035 label", None, 1),
    ("traffic-tag-host", [("spec/traffic/0/tag", "v" * 62)], "spec.traffic[0].tag", "makes the Kubernetes Service",
     None, 1),
    ("traffic-tag-duplicate", [("spec/traffic", [{"revisionName": "m-1-0-0", "percent": 50, "tag": "v1"},
                                                 {"revisionName": "m-0-9-0", "percent": 50, "tag": "v1"}])],
     "spec.traffic[1].tag", "Multiple definitions", None, 1),
]


@pytest.mark.parametrize("ops, field, message, config, count", [c[1:] for c in SERVICE_CASES],
                         ids=[c[0] for c in SERVICE_CASES])
def test_a_service_rule_refuses_what_it_is_about(ops, field, message, config, count):
    _check(service(), ops, field, message, config, count)


VALID_SERVICE_CASES = [
    # what Knative allows, and the rules must let through
    ("sidecar-may-set-PORT", [], None),
    ("tmp-is-not-reserved", [], None),
    ("var-log-without-collection", [(f"{C1}/volumeMounts/0/mountPath", "/var/log")], None),
    ("privileged-false", [(f"{C1}/securityContext/privileged", False)], None),
    ("readiness-timeout-zero-defaulted", [(f"{C0}/readinessProbe", {"httpGet": {"path": "/"}, "periodSeconds": 1,
                                                                    "timeoutSeconds": 0})], None),
    ("readiness-port-name", [(f"{C0}/readinessProbe", {"httpGet": {"port": "http1"}})], None),
    ("feature-affinity", [(f"{TS}/affinity", {})], cfg(podspec_features=frozenset({"kubernetes.podspec-affinity"}))),
    ("pod-security-context", [(f"{TS}/securityContext", {"runAsNonRoot": True})], cfg(podspec_securitycontext=True)),
    ("secure-pod-defaults-seccomp", [(f"{TS}/securityContext", {"seccompProfile": {"type": "RuntimeDefault"}})],
     cfg(secure_pod_defaults="Enabled")),
    ("net-bind-service", [(f"{C1}/securityContext/capabilities/add", ["NET_BIND_SERVICE"])],
     cfg(secure_pod_defaults="Enabled")),
    ("fieldref", [(f"{C1}/env/0", {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})],
     cfg(podspec_fieldref=True)),
    ("sidecar-probe-with-port", [(f"{C1}/readinessProbe", {"tcpSocket": {"port": 8081}})],
     cfg(multi_container_probing=True)),
    ("relaxed-env-name", [(f"{C1}/env/-", {"name": "1st.value-x", "value": "x"})], None),
    ("image-digest", [(f"{C1}/image", "registry.test/models/m@sha256:" + "a" * 64)], None),
    ("image-port-registry", [(f"{C1}/image", "localhost:5000/model:1.0.0_b1")], None),
    ("image-tag-and-digest", [(f"{C1}/image", "registry.test/model:1@sha256:" + "b" * 64)], None),
    ("timeout-zero-defaulted", [(f"{TS}/timeoutSeconds", 0)], None),
    ("no-gc", [(f"{TA}/serving.knative.dev~1no-gc", "TRUE")], None),
    ("cluster-local", [("metadata/labels/networking.knative.dev~1visibility", "cluster-local")], None),
    ("scale-limits", [(f"{TA}/{A}min-scale", "2"), (f"{TA}/{A}max-scale", "10"), (f"{TA}/{A}initial-scale", "0"),
                      (f"{TA}/{A}scale-to-zero-pod-retention-period", "1h"), (f"{TA}/{A}window", "1m30s")],
     cfg(max_scale_limit=10, allow_zero_initial_scale=True)),
    ("max-scale-zero-unlimited", [(f"{TA}/{A}min-scale", "3"), (f"{TA}/{A}max-scale", "0")], None),
    ("other-class-metric", [(f"{TA}/{A}class", "example.com/custom"), (f"{TA}/{A}metric", "anything")], None),
    ("traffic-tags", [("spec/traffic", [{"revisionName": "m-1-0-0", "percent": 100, "tag": "v1-0-0"},
                                        {"revisionName": "m-0-9-0", "percent": 0, "tag": "v0-9-0"},
                                        {"latestRevision": True, "tag": "latest"}])], None),
    ("traffic-empty", [("spec/traffic", [])], None),
    ("no-psa", [(f"{C1}/securityContext", {})], PRIVILEGED),
    ("secure-pod-defaults-fill-in", [(f"{C1}/securityContext", {})], cfg(secure_pod_defaults="Enabled")),
    # Refused by the ported rules once; the real cluster (tests/test_knative_webhooks.py) accepts
    # them at every stage -- what Knative does with them later is no admission refusal:
    # - serving pkg/reconciler/gc/gc.go isRevisionActive reads no-gc from each Revision only
    #   (the Service's annotation preserves nothing; a value other than "true" is not kept)
    ("no-gc-on-service", [("metadata/annotations", {"serving.knative.dev/no-gc": "true"})], None),
    ("no-gc-value", [(f"{TA}/serving.knative.dev~1no-gc", "yes")], None),
    # - serving pkg/reconciler/route/config/domain.go LookupDomainForLabels acts on the Service's
    #   label with the value "cluster-local" only; any other value, or the label on the template,
    #   is accepted and the Deployment created
    ("visibility-value", [("metadata/labels/networking.knative.dev~1visibility", "private")], None),
    ("visibility-on-template", [(f"{T}/metadata/labels", {"networking.knative.dev/visibility": "cluster-local"})],
     None),
    # - an empty list is no list: Knative's defaulting webhook round-trips the Service through its
    #   Go types, whose list fields are omitempty (knative/pkg webhook/resourcesemantics/
    #   defaulting/defaulting.go roundTripPatch), so PodSecurityContextMask / PodSpecMask
    #   (serving pkg/apis/serving/fieldmask.go) never see it
    ("pod-security-context-empty-sysctls", [(f"{TS}/securityContext", {"runAsNonRoot": True, "sysctls": []})],
     cfg(podspec_securitycontext=True)),
    ("init-containers-empty", [(f"{TS}/initContainers", [])], None),
    # - serving pkg/reconciler/revision/resources/deploy.go makePodSpec adds its pod-info volume
    #   only under config-features queueproxy.mount-podinfo (Disabled by default): the name is free
    ("volume-named-pod-info", [(f"{TS}/volumes/0/name", "pod-info"), (f"{C1}/volumeMounts/0/name", "pod-info")],
     None),
]


@pytest.mark.parametrize("ops, config", [c[1:] for c in VALID_SERVICE_CASES], ids=[c[0] for c in VALID_SERVICE_CASES])
def test_what_knative_allows_passes(ops, config):
    svc = service()
    for path, value in ops:
        _apply(svc, path, value)
    assert rules.problems(svc, config or rules.ClusterConfig()) == []


@pytest.mark.parametrize("name, config, annotation, refused", [
    ("server-certs", cfg(system_internal_tls=True), None, True),
    ("server-certs", cfg(), None, False),
    ("pod-info", cfg(queueproxy_mount_podinfo="Allowed"), "Enabled", True),
    ("pod-info", cfg(queueproxy_mount_podinfo="Allowed"), None, False),
    ("knative-token-volume", cfg(queue_sidecar_token_audiences=frozenset({""})), None, False),
    ("knative-var-log", cfg(), None, False),
])
def test_a_knative_volume_name_is_taken_only_under_its_setting(name, config, annotation, refused):
    """serving pkg/reconciler/revision/resources/deploy.go makePodSpec. Not in SERVICE_CASES,
    which the real cluster judges: system-internal-tls makes Knative reconcile a certificate for
    queue-proxy before the Deployment (pkg/reconciler/revision/revision.go), and the queue-proxy
    annotation of the Allowed mode is the same rule as Enabled; an empty audience adds no token
    (addToken)."""
    svc = service()
    _apply(svc, f"{TS}/volumes/0/name", name)
    _apply(svc, f"{C1}/volumeMounts/0/name", name)
    if annotation:
        _apply(svc, f"{TA}/features.knative.dev~1queueproxy-podinfo", annotation)
    found = rules.problems(svc, config)
    if refused:
        assert [(p.field, "Knative adds" in p.message) for p in found] == [(f"{FS}.volumes[0].name", True)]
        assert found[0].source.startswith("knative/serving pkg/reconciler/revision/resources/deploy.go")
    else:
        assert found == []


J = "spec/job"
JP = f"{J}/spec/template/spec"
JC0, JC1 = f"{JP}/containers/0", f"{JP}/containers/1"
FJ = "spec.job.spec.template.spec"
INIT = {"name": "fetch", "image": "registry.test/adapter:1", "securityContext": SC}

JOBSINK_CASES = [
    ("job-required", [(J, DELETE)], "spec.job", "a JobSink needs spec.job", 1),
    ("unknown-spec-field", [("spec/jobs", {})], "spec.jobs", "unknown field", 1),
    ("name-subdomain", [("metadata/name", "J.1")], "metadata.name", "DNS-1123 subdomain", 1),
    ("labels", [("metadata/labels", {"v": "1.0.0+b"})], "metadata.labels.v", "label value", 1),
    ("unknown-field", [(f"{JC0}/volumeMount", [])], f"{FJ}.containers[0].volumeMount", "unknown field", 1),
    ("unknown-job-spec-field", [(f"{J}/spec/backofLimit", 1)], "spec.job.spec.backofLimit", "unknown field", 1),
    ("namespace", [(f"{J}/metadata/namespace", "other")], "spec.job.metadata.namespace", "does not match", 1),
    ("job-labels", [(f"{J}/metadata/labels/v", "-x")], "spec.job.metadata.labels.v", "label value", 1),
    ("backoff", [(f"{J}/spec/backoffLimit", -1)], "spec.job.spec.backoffLimit", "greater than or equal to 0", 1),
    ("restart-always", [(f"{JP}/restartPolicy", "Always")], f"{FJ}.restartPolicy", "\"OnFailure\", \"Never\"", 1),
    ("restart-default", [(f"{JP}/restartPolicy", DELETE)], f"{FJ}.restartPolicy", "\"OnFailure\", \"Never\"", 1),
    ("job-name-label", [(f"{J}/spec/template/metadata/labels/job-name", "x")],
     "spec.job.spec.template.metadata.labels.job-name", "set by Kubernetes", 1),
    ("selector", [(f"{J}/spec/selector", {"matchLabels": {"app": "j"}})], "spec.job.spec.selector",
     "auto-generated", 1),
    ("no-containers", [(f"{JP}/containers", [])], f"{FJ}.containers", "needs a container", 1),
    ("volume-name", [(f"{JP}/volumes/-", {"name": "Scratch", "emptyDir": {}})], f"{FJ}.volumes[1].name",
     "DNS-1123 label", 1),
    ("volume-duplicate", [(f"{JP}/volumes/-", {"name": "work", "emptyDir": {}})], f"{FJ}.volumes[1].name",
     "Duplicate value", 1),
    ("volume-types", [(f"{JP}/volumes/0/secret", {"secretName": "s"})], f"{FJ}.volumes[0]",
     "more than 1 volume type", 1),
    ("container-name", [(f"{JC1}/name", "Model")], f"{FJ}.containers[1].name", "DNS-1123 label", 1),
    ("container-duplicate", [(f"{JC1}/name", "adapter")], f"{FJ}.containers[1].name", "Duplicate value", 1),
    ("container-duplicate-init", [(f"{JP}/initContainers", [{**INIT, "name": "model"}])], f"{FJ}.containers[1].name",
     "unique across init and main containers", 1),
    ("image-missing", [(f"{JC1}/image", DELETE)], f"{FJ}.containers[1].image", "Required value", 1),
    ("image-whitespace", [(f"{JC1}/image", " registry.test/m:1")], f"{FJ}.containers[1].image", "whitespace", 1),
    ("init-probe", [(f"{JP}/initContainers", [{**INIT, "readinessProbe": {"exec": {"command": ["true"]}}}])],
     f"{FJ}.initContainers[0].readinessProbe", "may not be set for init containers", 1),
    ("env-name", [(f"{JC1}/env", [{"name": "A=B", "value": "x"}])], f"{FJ}.containers[1].env[0].name",
     "other than '='", 1),
    ("env-fieldref", [(f"{JC0}/env/0/valueFrom/fieldRef/fieldPath", "metadata.labels")],
     f"{FJ}.containers[0].env[0].valueFrom.fieldRef.fieldPath", "Unsupported value", 1),
    ("env-value-and-from", [(f"{JC0}/env/0/value", "x")], f"{FJ}.containers[0].env[0].valueFrom",
     "may not be specified when `value` is not empty", 1),
    ("resources", [(f"{JC1}/resources/requests/memory", "1Gi")], f"{FJ}.containers[1].resources.requests.memory",
     "less than or equal to memory limit", 1),
    ("mount-undeclared", [(f"{JC1}/volumeMounts/0/name", "scratch")], f"{FJ}.containers[1].volumeMounts[0].name",
     "Not found", 1),
    ("mount-event-main", [(f"{JC1}/volumeMounts/-", {"name": "jobsink-event", "mountPath": "/event"})],
     f"{FJ}.containers[1].volumeMounts[1].name", "dispatcher adds it", 1),
    ("mount-event-init", [(f"{JP}/initContainers", [{**INIT, "volumeMounts": [{"name": "jobsink-event",
                                                                               "mountPath": "/event"}]}])],
     f"{FJ}.initContainers[0].volumeMounts[0]", "main containers only", 1),
    ("mount-path-duplicate", [(f"{JC1}/volumeMounts/-", {"name": "work", "mountPath": "/work"})],
     f"{FJ}.containers[1].volumeMounts[1].mountPath", "must be unique", 1),
    ("mount-sub-path", [(f"{JC1}/volumeMounts/0/subPath", "../etc")], f"{FJ}.containers[1].volumeMounts[0].subPath",
     "without '..'", 1),
    ("port", [(f"{JC1}/ports", [{"containerPort": 0}])], f"{FJ}.containers[1].ports[0].containerPort",
     "between 1 and 65535", 1),
    ("service-account", [(f"{JP}/serviceAccountName", "Job_SA")], f"{FJ}.serviceAccountName", "DNS-1123 subdomain",
     1),
    ("psa-escalation", [(f"{JC1}/securityContext/allowPrivilegeEscalation", True)],
     f"{FJ}.containers[1].securityContext.allowPrivilegeEscalation", "Pod Security (restricted)", 1),
    ("psa-pod-non-root", [(f"{JP}/securityContext/runAsNonRoot", False), (f"{JC0}/securityContext/runAsNonRoot", True),
                          (f"{JC1}/securityContext/runAsNonRoot", True)],
     f"{FJ}.securityContext.runAsNonRoot", "must not be false", 1),
    ("psa-host-network", [(f"{JP}/hostNetwork", True)], f"{FJ}.hostNetwork", "hostNetwork=true", 1),
]


@pytest.mark.parametrize("ops, field, message, count", [c[1:] for c in JOBSINK_CASES],
                         ids=[c[0] for c in JOBSINK_CASES])
def test_a_jobsink_rule_refuses_what_it_is_about(ops, field, message, count):
    _check(jobsink(), ops, field, message, count=count)


# Refused by the ported rules once; the real cluster (tests/test_knative_webhooks.py) accepts
# them at every stage, the JobSink and the Job's pod:
VALID_JOBSINK_CASES = [
    # eventing cmd/jobsink/main.go ServeHTTP labels each Job sinks.knative.dev/job-sink-name=<name>,
    # so past 63 characters the dispatcher's Jobs are refused -- but not the JobSink: no
    # admission stage refuses it (the webhook's dry-run Job, job_sink_validation.go, has no label)
    ("name-label", [("metadata/name", "j" * 64)]),
    # cmd/jobsink/main.go ServeHTTP adds no event Secret when the template has a volume of that
    # name: the Job runs without its event, but nothing refuses the template
    ("event-volume-declared", [(f"{JP}/volumes/-", {"name": "jobsink-event", "emptyDir": {}})]),
    # kubernetes pkg/api/pod/warnings.go: an imagePullSecrets entry without a name is only warned
    # about ("invalid empty name"), not refused
    ("pull-secret", [(f"{JP}/imagePullSecrets", [{}])]),
]


def jobsink_with_pod_level_security() -> dict:
    """runAsNonRoot and seccompProfile on the pod cover every container (Pod Security); an init
    container shares the work volume (it just cannot have the event)."""
    sink = jobsink()
    pod = sink["spec"]["job"]["spec"]["template"]["spec"]
    pod["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        c["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    pod["initContainers"] = [{"name": "fetch", "image": "registry.test/adapter:1",
                              "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                              "volumeMounts": [{"name": "work", "mountPath": "/work"}]}]
    return sink


def test_a_jobsink_may_rely_on_pod_level_security_and_main_container_event_mounts():
    assert rules.problems(jobsink_with_pod_level_security()) == []


TR = "spec"
TRIGGER_CASES = [
    ("broker-missing", [(f"{TR}/broker", "")], "spec.broker", "missing field(s): broker", 1),
    ("broker-and-ref", [(f"{TR}/brokerRef", {"name": "default"})], "spec.broker", "got both: broker, brokerRef", 1),
    ("broker-ref-namespace", [(f"{TR}/broker", DELETE), (f"{TR}/brokerRef", {"name": "b", "namespace": "x"})],
     "spec.brokerRef.namespace", "CrossNamespaceEventLinks", 1),
    ("broker-label", [(f"{TR}/broker", "b" * 64)], "spec.broker", "eventing.knative.dev/broker", 1),
    ("labels", [("metadata/labels", {"v": "-x"})], "metadata.labels.v", "label value", 1),
    ("attribute-name-legacy", [(f"{TR}/filters", DELETE), (f"{TR}/filter", {"attributes": {"Type": "x"}})],
     "spec.filter.attributes.Type", "lowercase alphanumeric", 1),
    ("two-dialects", [(f"{TR}/filters/0/prefix", {"subject": "objects/"})], "spec.filters[0]",
     "multiple dialects found", 1),
    ("attribute-name", [(f"{TR}/filters/0", {"exact": {"Type": "x"}})], "spec.filters[0].exact.Type",
     "lowercase alphanumeric", 1),
    ("attribute-name-nested", [(f"{TR}/filters/-", {"all": [{"exact": {"a-b": "x"}}]})],
     "spec.filters[2].all[0].exact.a-b", "lowercase alphanumeric", 1),
    ("unknown-spec-field", [(f"{TR}/filterz", [])], "spec.filterz", "unknown field", 1),
    ("unknown-filter-field", [(f"{TR}/filters/0/exactly", {"type": "x"})], "spec.filters[0].exactly",
     "unknown field", 1),
    ("subscriber-missing", [(f"{TR}/subscriber", {})], "spec.subscriber", "expected at least one", 1),
    ("subscriber-ref-name", [(f"{TR}/subscriber/ref/name", "")], "spec.subscriber.ref.name", "missing field(s)", 1),
    ("subscriber-absolute-uri", [(f"{TR}/subscriber/uri", "http://x.example/")], "spec.subscriber",
     "Absolute URI is not allowed", 1),
    ("subscriber-relative-uri", [(f"{TR}/subscriber", {"uri": "/jobs"})], "spec.subscriber.uri",
     "Relative URI is not allowed", 1),
    ("subscriber-group", [(f"{TR}/subscriber/ref/group", "sinks.knative.dev")], "spec.subscriber.ref.group",
     "must not set", 1),
]


@pytest.mark.parametrize("ops, field, message, count", [c[1:] for c in TRIGGER_CASES],
                         ids=[c[0] for c in TRIGGER_CASES])
def test_a_trigger_rule_refuses_what_it_is_about(ops, field, message, count):
    _check(trigger(), ops, field, message, count=count)


# Refused by the ported rules once; the real cluster (tests/test_knative_webhooks.py) accepts
# them (a Trigger has no later admission stage):
VALID_TRIGGER_CASES = [
    # the Broker applies spec.filters and ignores spec.filter (eventing pkg/broker/filter/
    # filter_handler.go); a filter without a dialect, or an empty exact / prefix value, is skipped
    # when the Broker builds it (pkg/eventfilter/subscriptionsapi/create.go) -- all after
    # admission, which trigger_validation.go does not refuse
    ("filter-and-filters", [(f"{TR}/filter", {"attributes": {"type": "x"}})]),
    ("no-dialect", [(f"{TR}/filters/-", {})]),
    ("empty-prefix", [(f"{TR}/filters/1/prefix/subject", "")]),
    ("empty-exact-nested", [(f"{TR}/filters/-", {"not": {"exact": {"source": ""}}})]),
    # knative/pkg apis/duck/v1/knative_reference.go KReference.Validate compares ref.namespace with
    # the parent's only when apis.WithinParent set it, which eventing's Trigger.Validate
    # (pkg/apis/eventing/v1/trigger_validation.go) never does
    ("subscriber-namespace", [(f"{TR}/subscriber/ref/namespace", "other")]),
]


EVENTING_VALID = [(jobsink, c) for c in VALID_JOBSINK_CASES] + [(trigger, c) for c in VALID_TRIGGER_CASES]


@pytest.mark.parametrize("builder, ops", [(b, c[1]) for b, c in EVENTING_VALID],
                         ids=[f"{b.__name__}-{c[0]}" for b, c in EVENTING_VALID])
def test_what_eventing_allows_passes(builder, ops):
    obj = builder()
    for path, value in ops:
        _apply(obj, path, value)
    assert rules.problems(obj) == []


def test_other_kinds_have_no_rules():
    assert rules.problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Not Valid"}}) == []


# -- names Knative derives ----------------------------------------------------------------

def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def test_child_name_short_parent_is_concatenated():
    # cmd/jobsink/main.go toJobName: ChildName(sink + "-", md5hex(source + id))
    digest = md5("//storage.googleapis.com/projects/_/buckets/acme-modelplane" + "evt-1")
    assert digest == "8e6b13d7d4e0299f974dd08242639b5e"
    assert rules.child_name("churn-risk-1-0-0-", digest) == "churn-risk-1-0-0-8e6b13d7d4e0299f974dd08242639b5e"
    assert rules.child_name("parent", "-x") == "parent-x"


def test_child_name_at_the_boundary():
    # 31 + 32 = 63: still concatenated
    assert rules.child_name("p" * 30 + "-", "s" * 32) == "p" * 30 + "-" + "s" * 32
    # 32 + 32 = 64 and a suffix of 31 or more: parent cut to 31 + md5(parent + suffix), 63 long
    parent, digest = "churn-risk-20-0-0-rc-1-build-77-", md5("x")
    assert len(parent) == 32
    out = rules.child_name(parent, digest)
    assert out == "churn-risk-20-0-0-rc-1-build-77" + md5(parent + digest)
    assert out == "churn-risk-20-0-0-rc-1-build-7773ad3315430ed9ea5557a7a4a601cb9e" and len(out) == 63
    # a suffix of 30 leaves one parent character before md5(parent)
    assert rules.child_name("q" * 34, "t" * 30) == "q" + md5("q" * 34) + "t" * 30


def test_child_name_long_parent_short_suffix():
    parent = "a" * 70
    assert rules.child_name(parent, "-x") == "a" * 29 + md5(parent) + "-x"
    assert rules.child_name(parent, "-x") == "aaaaaaaaaaaaaaaaaaaaaaaaaaaaa0f5c6c4e740bfcc08c3c26ccb2673d46-x"


def test_child_name_long_suffix_pads_and_trims():
    # parent shorter than 31: the md5 is padded with the start of the suffix up to 63
    suffix = "b" * 40
    assert rules.child_name("c" * 30, suffix) == "c" * 30 + md5("c" * 30 + suffix) + "b"
    # ... and trailing non-alphanumerics are removed (makeValidName)
    assert rules.child_name("d" * 30, "-" * 40) == "d" * 30 + md5("d" * 30 + "-" * 40)
    assert rules.child_name("e" * 29, "." * 40) == "e" * 29 + md5("e" * 29 + "." * 40)


def test_child_names_are_valid_job_names():
    for parent in ("j-", "j" * 40 + "-", "j" * 80 + "-"):
        name = rules.child_name(parent, md5(parent))
        assert len(name) <= 63 and rules.is_dns1123_label(name), name


def test_to_dns1123_subdomain():
    assert rules.to_dns1123_subdomain(md5("x")) == md5("x")  # valid: unchanged
    assert rules.to_dns1123_subdomain("a.b-c") == "a.b-c"
    assert rules.to_dns1123_subdomain("-Ab_C.d-") == "abc.d"
    assert rules.to_dns1123_subdomain("..x..") == "x"
    assert rules.to_dns1123_subdomain("Über Model") == "bermodel"
    # over 253: cut to 243 (room for a generated suffix), then cleaned
    assert rules.to_dns1123_subdomain("A" * 300) == "a" * 243
    valid_253 = ".".join(["a" * 63] * 3 + ["a" * 61])
    assert len(valid_253) == 253 and rules.to_dns1123_subdomain(valid_253) == valid_253
    assert rules.to_dns1123_subdomain("a" * 254) == "a" * 243
    # lengths are bytes, as in Go: a cut through a character leaves nothing of it
    assert rules.to_dns1123_subdomain("\u00e9" * 200) == ""


def test_generated_names_are_the_base_cut_to_58_plus_5():
    name = rules.generated_name("x" * 70)
    assert len(name) == 63 and name.startswith("x" * 58)
    assert set(name[58:]) <= set("bcdfghjklmnpqrstvwxz2456789")
    short = rules.generated_name("churn-risk-1-0-0")
    assert short.startswith("churn-risk-1-0-0") and len(short) == 21


def test_go_parsers():
    assert rules.go_duration_ns("1h30m") == 5400 * 10**9
    assert rules.go_duration_ns(".5s") == rules.go_duration_ns("500ms") == 5 * 10**8
    assert rules.go_duration_ns("1.s") == 10**9 and rules.go_duration_ns("-1s") == -(10**9)
    assert rules.go_duration_ns("0") == 0
    for bad in ("", "1", "5sec", ".", "1 s", "s"):
        assert rules.go_duration_ns(bad) is None, bad
    assert rules.go_parse_int("+5", 32) == (5, None)
    assert rules.go_parse_int("1_000", 32) == (None, "syntax")
    assert rules.go_parse_int(" 5", 32) == (None, "syntax")
    assert rules.go_parse_float("1e3") == 1000.0 and rules.go_parse_float("1_0") is None
    assert rules.go_parse_float("1e400") is None
    assert rules.parse_quantity("500m") == rules.parse_quantity("0.5")
    assert rules.parse_quantity("1Gi") == 2**30 and rules.parse_quantity("1e3") == 1000
    assert rules.parse_quantity("1E") == 10**18 and rules.parse_quantity("lots") is None


# -- what render_objects gives for the example models --------------------------------------

SETTINGS = [
    Settings(runtime="knative", registry="registry.test/models", adapter_image="registry.test/adapter:1",
             bucket="b"),
    Settings(runtime="knative", bucket="acme-modelplane", image_pull_secrets="pull-a,pull-b",
             storage_emulator_host="http://gcs.modelplane.svc:4443"),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["test-registry", "defaults-with-secrets"])
def test_every_rendered_example_has_no_problems(settings):
    folders = sorted(p.parent for p in MODELS.glob("*/model.yaml"))
    assert len(folders) >= 4
    found = {}
    for folder in folders:
        manifest = load_manifest(folder)
        for obj in ko.render_objects(manifest, settings):
            config = rules.ClusterConfig(max_revision_timeout_seconds=settings.max_revision_timeout)
            listed = [f"{p.field}: {p.message}" for p in rules.problems(obj, config)]
            if listed:
                found[f"{folder.name} {obj['kind']}"] = listed
    assert found == {}, json.dumps(found, indent=1)


def test_a_batch_model_whose_jobs_could_not_be_labelled_is_refused_before_deploying():
    """Knative accepts the JobSink (the real webhook does: tests/test_knative_webhooks.py), but its
    dispatcher labels each Job with the JobSink's name, which then must fit a label value."""
    from control.errors import Invalid

    manifest = load_manifest(MODELS / "churn-risk")
    long = manifest.model_copy(update={"name": "c" * 58})  # + "-1-0-0" = 64 characters
    with pytest.raises(Invalid, match="name/version: .* is 64 characters") as refused:
        ko.render_objects(long, SETTINGS[0])
    assert refused.value.details["problems"][0]["field"] == "name/version"
    fits = manifest.model_copy(update={"name": "c" * 57})
    assert [o["kind"] for o in ko.render_objects(fits, SETTINGS[0])] == ["JobSink", "Trigger"]
