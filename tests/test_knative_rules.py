"""Knative's admission rules, ported (control/runtime/knative_rules.py): each rule refuses the one
thing it is about, names the field and its Knative source, and lets the rendered objects pass."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest

from adapters.manifest import load_manifest
from control.runtime import knative_objects as ko
from control.runtime import knative_rules as rules
from control.settings import Settings

MODELS = Path(__file__).resolve().parent.parent / "models"
SETTINGS = Settings(runtime="knative", registry="registry.test/models", adapter_image="registry.test/adapter:1",
                    bucket="b")


def rendered(name: str) -> list[dict]:
    return ko.render_objects(load_manifest(MODELS / name), SETTINGS)


@pytest.fixture
def service() -> dict:
    return copy.deepcopy(rendered("donor-propensity")[0])


@pytest.fixture
def sink_and_trigger() -> tuple[dict, dict]:
    return tuple(copy.deepcopy(rendered("churn-risk")))


def test_every_rendered_example_passes():
    folders = sorted(p.parent for p in MODELS.glob("*/model.yaml"))
    assert len(folders) == 4
    for folder in folders:
        for obj in ko.render_objects(load_manifest(folder), SETTINGS):
            assert rules.problems(obj) == [], (folder.name, obj["kind"])


_DELETE = object()
T = "spec/template"
ANN = f"{T}/metadata/annotations"
C0, C1 = f"{T}/spec/containers/0", f"{T}/spec/containers/1"

SERVICE_CASES = [
    # (what is changed, value, the field named, part of the message, part of the source)
    ("metadata/name", "3d-donors", "metadata.name", "DNS-1035", "service.go"),
    (f"{T}/metadata/name", "donor-propensity-1.0", "spec.template.metadata.name", "DNS-1035", "revision_validation.go"),
    (f"{T}/metadata/name", "other-1-0-0", "spec.template.metadata.name", "must have prefix", "revision_validation.go"),
    (f"{T}/metadata/name", "donor-propensity-" + "a" * 50, "spec.template.metadata.name", "at most 63",
     "validateRevisionName"),
    (f"{T}/spec/timeoutSeconds", 601, "spec.template.spec.timeoutSeconds", "0 to 600", "validateTimeoutSeconds"),
    (f"{T}/spec/containerConcurrency", 1001, "spec.template.spec.containerConcurrency", "0 to 1000",
     "ValidateContainerConcurrency"),
    (f"{ANN}/autoscaling.knative.dev~1min-scale", "-1", "autoscaling.knative.dev/min-scale", ">= 0", "annotation_validation"),
    (f"{ANN}/autoscaling.knative.dev~1max-scale", "x", "autoscaling.knative.dev/max-scale", ">= 0", "annotation_validation"),
    (f"{ANN}/autoscaling.knative.dev~1min-scale", "9", "autoscaling.knative.dev/max-scale", "less than min-scale",
     "validateMinMaxScale"),
    (f"{ANN}/autoscaling.knative.dev~1target", "0.001", "autoscaling.knative.dev/target", "at least 0.01",
     "validateFloats"),
    (f"{ANN}/autoscaling.knative.dev~1metric", "cpu", "autoscaling.knative.dev/metric", "KPA", "validateMetric"),
    (f"{ANN}/autoscaling.knative.dev~1class", "xyz.autoscaling.knative.dev", "autoscaling.knative.dev/class",
     "invalid autoscaler class", "validateClass"),
    (f"{ANN}/autoscaling.knative.dev~1scale-to-zero-pod-retention-period", "2h",
     "scale-to-zero-pod-retention-period", "at most 1h", "validateLastPodRetention"),
    (f"{ANN}/autoscaling.knative.dev~1scale-to-zero-pod-retention-period", "sometime",
     "scale-to-zero-pod-retention-period", "not a duration", "annotation_validation"),
    (f"{ANN}/autoscaling.knative.dev~1scale-down-delay", "1.5s", "scale-down-delay", "second precision",
     "validateScaleDownDelay"),
    (f"{ANN}/autoscaling.knative.dev~1initial-scale", "0", "initial-scale", "allow-zero-initial-scale",
     "validateInitialScale"),
    ("metadata/annotations/autoscaling.knative.dev~1target", "8", "metadata.annotations.autoscaling", "spec.template",
     "ValidateHasNoAutoscalingAnnotation"),
    (f"{C1}/ports", [{"containerPort": 9000}], "containers[*].ports", "only a single port", "validateContainersPorts"),
    (f"{C0}/ports", _DELETE, "containers[*].ports", "one container must name the port", "validateContainersPorts"),
    (f"{C0}/ports/0/containerPort", 8012, "ports[0].containerPort", "reserved port", "validateContainerPortBasic"),
    (f"{C0}/ports/0/name", "http", "ports[0].name", "not allowed", "validateContainerPorts"),
    (f"{C1}/name", "queue-proxy", "containers[1].name", "reserved container name", "k8s_validation.go"),
    (f"{C1}/name", "adapter", "containers[1].name", "duplicate container name", "validateContainers"),
    (f"{C0}/env/0/name", "PORT", "containers[0].env[0].name", "reserved environment variable", "validateEnvVar"),
    (f"{C1}/env/0/name", "K_SERVICE", "containers[1].env[0].name", "reserved environment variable", "validateEnvVar"),
    (f"{C1}/readinessProbe", {"httpGet": {"path": "/health"}}, "containers[1].readinessProbe",
     "multi-container-probing", "validateSidecarContainer"),
    (f"{C0}/readinessProbe/httpGet/port", "metrics", "readinessProbe.httpGet.port", "must match", "validateProbe"),
    (f"{C0}/readinessProbe/timeoutSeconds", 0, "readinessProbe", "timeoutSeconds and failureThreshold",
     "validateReadinessProbe"),
    (f"{C0}/lifecycle", {"preStop": {}}, "containers[0].lifecycle", "not allowed", "ContainerMask"),
    (f"{C0}/securityContext/procMount", "Unmasked", "securityContext.procMount", "not allowed", "SecurityContextMask"),
    (f"{C0}/securityContext/capabilities/add", ["SYS_ADMIN"], "capabilities.add", "addcapabilities",
     "CapabilitiesMask"),
    (f"{T}/spec/securityContext", {"runAsUser": 1}, "spec.template.spec.securityContext", "config-features",
     "PodSpecMask"),
    (f"{T}/spec/initContainers", [{"name": "i", "image": "x"}], "spec.template.spec.initContainers",
     "config-features", "PodSpecMask"),
    (f"{T}/spec/automountServiceAccountToken", True, "automountServiceAccountToken", "only be set to false",
     "PodSpecMask"),
    (f"{C1}/volumeMounts/0/name", "nothing", "volumeMounts[0].name", "no matching volume", "validateVolumeMounts"),
    (f"{C1}/volumeMounts/0/mountPath", "/dev", "volumeMounts[0].mountPath", "reserved path", "validateVolumeMounts"),
    (f"{T}/spec/volumes/0/name", "tmp2", "volumes[0].name", "not mounted", "ValidateVolumes"),
    ("spec/traffic/0/percent", 90, "spec.traffic", "sum to 90", "validateTrafficList"),
    ("spec/traffic/0/latestRevision", True, "spec.traffic[0].latestRevision", "may not set revisionName",
     "validateLatestRevision"),
    ("spec/traffic/0/tag", "1-0-0", "spec.traffic[0].tag", "DNS-1035", "validateTrafficList"),
    ("metadata/labels/networking.knative.dev~1visibility", "private", "visibility", "cluster-local", "domain.go"),
    ("metadata/labels/modelplane.dev~1version", "1.0.0+build", "metadata.labels.modelplane.dev/version",
     "label value", "IsValidLabelValue"),
]


@pytest.mark.parametrize("path, value, field, message, source", SERVICE_CASES,
                         ids=[c[2] + ":" + c[3] for c in SERVICE_CASES])
def test_a_service_rule_refuses_what_it_is_about(service, path, value, field, message, source):
    _apply(service, path, value)
    found = rules.problems(service)
    assert found, f"nothing refused after {path} = {value!r}"
    matching = [p for p in found if field in p.field and message in p.message]
    assert matching, [(p.field, p.message) for p in found]
    assert source in matching[0].source and matching[0].source.startswith(("knative/", "kubernetes"))


def _unescape(path: str) -> list[str]:
    return [part.replace("~1", "/") for part in path.split("/")]


def _apply(obj: dict, path: str, value) -> None:
    *parents, last = _unescape(path)
    for key in parents:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    if value is _DELETE:
        del obj[last]
    elif isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


def test_cluster_settings_move_the_bounds(service):
    service["spec"]["template"]["spec"]["timeoutSeconds"] = 900
    assert [p.field for p in rules.problems(service)] == ["spec.template.spec.timeoutSeconds"]
    assert rules.problems(service, rules.ClusterConfig(max_revision_timeout_seconds=900)) == []
    ann = service["spec"]["template"]["metadata"]["annotations"]
    ann["autoscaling.knative.dev/max-scale"] = "50"
    limited = rules.ClusterConfig(max_revision_timeout_seconds=900, max_scale_limit=10)
    assert [p.field for p in rules.problems(service, limited)] == [
        "spec.template.metadata.annotations.autoscaling.knative.dev/max-scale"]


JS = "spec/job/spec/template/spec"
JOBSINK_CASES = [
    ("spec/job", _DELETE, "spec.job", "needs spec.job", "job_sink_validation.go"),
    ("metadata/name", "churn-risk-" + "1-" * 27, "metadata.name", "labels each Job", "cmd/jobsink/main.go"),
    (f"{JS}/restartPolicy", "Always", "restartPolicy", "Never or OnFailure", "ValidateJob"),
    (f"{JS}/initContainers", [{"name": "fetch", "image": "a",
                                "volumeMounts": [{"name": "jobsink-event", "mountPath": "/e"}]}],
     "initContainers[0].volumeMounts[0]", "main containers only", "cmd/jobsink/main.go"),
    (f"{JS}/containers/1/name", "adapter", "containers[1].name", "duplicate container name", "core/validation"),
    (f"{JS}/containers/0/volumeMounts/0/name", "scratch", "volumeMounts[0].name", "not declared", "core/validation"),
    (f"{JS}/containers/0/env/0/name", "1BAD", "env[0].name", "environment variable name", "IsEnvVarName"),
    (f"{JS}/containers", [], "containers", "needs a container", "job_sink_validation.go"),
]


TRIGGER_CASES = [
    ("spec/broker", "", "spec.broker", "missing field", "trigger_validation.go"),
    ("spec/brokerRef", {"name": "x"}, "spec.broker", "exactly one of broker, brokerRef", "trigger_validation.go"),
    ("spec/filters/0", {"exact": {"type": "x"}, "prefix": {"subject": "y"}}, "spec.filters[0]", "multiple dialects",
     "ValidateOneOf"),
    ("spec/filters/0", {"exact": {"Type": "x"}}, "spec.filters[0].exact.Type", "lowercase", "ValidateAttributesNames"),
    ("spec/filters/0", {"all": [{"exact": {"a-b": "x"}}]}, "spec.filters[0].all[0].exact.a-b", "lowercase",
     "ValidateAttributesNames"),
    ("spec/subscriber", {}, "spec.subscriber", "ref, uri", "destination.go"),
    ("spec/subscriber/ref/name", "", "spec.subscriber.ref.name", "missing field", "knative_reference.go"),
]


EVENTING_CASES = [(0, *c) for c in JOBSINK_CASES] + [(1, *c) for c in TRIGGER_CASES]


@pytest.mark.parametrize("which, path, value, field, message, source", EVENTING_CASES,
                         ids=[("jobsink:" if c[0] == 0 else "trigger:") + c[3] for c in EVENTING_CASES])
def test_an_eventing_rule_refuses_what_it_is_about(sink_and_trigger, which, path, value, field, message, source):
    obj = sink_and_trigger[which]  # the JobSink or the Trigger
    _apply(obj, path, value)
    found = rules.problems(obj)
    matching = [p for p in found if field in p.field and message in p.message]
    assert matching, [(p.field, p.message) for p in found]
    assert source in matching[0].source


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def test_child_name_is_kmetas():
    """knative/pkg kmeta/names.go ChildName, worked by hand for each branch."""
    assert rules.child_name("parent-", "suffix") == "parent-suffix"  # fits
    assert rules.child_name("p" * 31 + "-", "s" * 31) == "p" * 31 + "-" + "s" * 31  # exactly 63
    # suffix of 32 (an md5): a parent over 31 is cut to 31 and the whole is hashed
    long_parent, digest = "churn-risk-20-0-0-rc-1-build-77-", md5("x")
    assert rules.child_name(long_parent, digest) == long_parent[:31] + md5(long_parent + digest)
    # a short suffix: the parent keeps 31 - len(suffix) characters, then md5(parent), then the suffix
    parent = "a" * 70
    assert rules.child_name(parent, "-x") == "a" * 29 + md5(parent) + "-x"
    assert len(rules.child_name(parent, "-x")) == 63
    # a suffix longer than 32, parent short: md5 of the whole padded with the suffix's start
    suffix = "b" * 40
    out = rules.child_name("c" * 30, suffix)
    assert out == "c" * 30 + md5("c" * 30 + suffix) + "b"
    # trailing non-alphanumerics are trimmed (makeValidName)
    assert rules.child_name("d" * 30, "-" * 40) == "d" * 30 + md5("d" * 30 + "-" * 40)


def test_to_dns1123_subdomain_is_eventings():
    assert rules.to_dns1123_subdomain(md5("x")) == md5("x")  # valid: unchanged
    assert rules.to_dns1123_subdomain("-Ab_C.d-") == "abc.d"
    assert len(rules.to_dns1123_subdomain("a" * 300)) == 243


def test_generated_names_are_the_base_cut_to_58_plus_5():
    name = rules.generated_name("x" * 70)
    assert len(name) == 63 and name.startswith("x" * 58)
    assert rules.generated_name("churn-risk-1-0-0")[:16] == "churn-risk-1-0-0"
