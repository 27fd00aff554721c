"""Knative's admission rules for what modelplane renders, ported to Python.

A real cluster runs Knative's validating webhooks on every Service, JobSink and Trigger; the
cluster runtime checks the same rules before it sends anything, so that a model Knative would
refuse is refused by `modelplane deploy` with the manifest field named, not by the API server
after half a deploy. Only the rules an object modelplane writes can meet are here, each with the
Knative (or Kubernetes) source it mirrors; sources are knative/serving at the v1.23 line,
knative/eventing at the v1.22 line, knative/pkg and kubernetes/apimachinery.

Pure functions of plain dicts: no Kubernetes client, nothing sent anywhere.
"""
from __future__ import annotations

import hashlib
import posixpath
import re
import secrets
from dataclasses import dataclass
from typing import Iterator, Optional

SERVING = "knative/serving"
EVENTING = "knative/eventing"
K8S_VALIDATION = "kubernetes apimachinery pkg/util/validation/validation.go"


@dataclass(frozen=True)
class Problem:
    field: str  # path in the object, e.g. "spec.template.metadata.name"
    message: str  # what Knative would say, and what to change
    source: str  # the Knative (or Kubernetes) source file the rule mirrors


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster settings the rules depend on, with Knative's defaults."""

    # config-defaults max-revision-timeout-seconds (serving pkg/apis/config/defaults.go: 600)
    max_revision_timeout_seconds: int = 600
    # config-defaults container-concurrency-max-limit (serving pkg/apis/config/defaults.go: 1000)
    container_concurrency_max: int = 1000
    # config-autoscaler max-scale-limit (serving pkg/autoscaler/config/config.go: 0 = none)
    max_scale_limit: int = 0
    # config-autoscaler allow-zero-initial-scale (serving pkg/autoscaler/config/config.go: false)
    allow_zero_initial_scale: bool = False
    # config-features multi-container (serving pkg/apis/config/features.go: enabled)
    multi_container: bool = True
    # config-features kubernetes.podspec-volumes-emptydir (features.go: enabled)
    emptydir_volumes: bool = True
    # config-features kubernetes.podspec-securitycontext (features.go: disabled)
    pod_security_context: bool = False
    # config-features kubernetes.podspec-init-containers (features.go: disabled)
    init_containers: bool = False


# -- Kubernetes names (apimachinery pkg/util/validation/validation.go) -----------------------

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")  # IsEnvVarName
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def is_dns1035_label(name: str) -> bool:
    return len(name) <= 63 and bool(_DNS1035_LABEL.match(name))


def is_dns1123_label(name: str) -> bool:
    return len(name) <= 63 and bool(_DNS1123_LABEL.match(name))


def is_dns1123_subdomain(name: str) -> bool:
    return len(name) <= 253 and bool(_DNS1123_SUBDOMAIN.match(name))


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_VALUE.match(value))


# -- names Knative derives ---------------------------------------------------------------

_LONGEST, _MD5_LEN = 63, 32
_HEAD = _LONGEST - _MD5_LEN


def child_name(parent: str, suffix: str) -> str:
    """knative/pkg kmeta/names.go `ChildName`: `parent + suffix` while it fits 63 characters;
    else, for a suffix of 31 characters or more, `parent[:31] + md5(parent + suffix)` padded with
    the suffix's start to 63 and trimmed of trailing non-alphanumerics; else
    `parent[:31 - len(suffix)] + md5(parent) + suffix`."""
    if len(parent) <= _LONGEST - len(suffix):
        return parent + suffix
    if _HEAD - len(suffix) <= 0:
        digest = hashlib.md5((parent + suffix).encode()).hexdigest()  # noqa: S324 - a name
        out = parent[:_HEAD] + digest
        if len(out) < _LONGEST:
            out += suffix[:_LONGEST - len(out)]
        while out and not (out[-1].isascii() and out[-1].isalnum()):  # makeValidName
            out = out[:-1]
        return out
    digest = hashlib.md5(parent.encode()).hexdigest()  # noqa: S324 - a name
    return parent[:_HEAD - len(suffix)] + digest + suffix


_NOT_DNS1123 = re.compile(r"[^-a-z0-9.]")


def to_dns1123_subdomain(name: str) -> str:
    """knative/eventing pkg/utils/utils.go `ToDNS1123Subdomain`: valid names unchanged; others cut
    to 253 - 10 characters, lower-cased, stripped of other characters and of leading/trailing
    '-' and '.'."""
    if is_dns1123_subdomain(name):
        return name
    if len(name) > 253:
        name = name[:253 - 10]
    return _NOT_DNS1123.sub("", name.lower()).strip("-.")


def generated_name(base: str) -> str:
    """Kubernetes apiserver pkg/storage/names/generate.go `SimpleNameGenerator`: the base cut to 58
    characters plus 5 random ones, as the JobSink webhook names its dry-run Job."""
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return base[:58] + "".join(secrets.choice(alphabet) for _ in range(5))


# -- helpers ------------------------------------------------------------------------------

def _p(field: str, message: str, source: str) -> Problem:
    return Problem(field=field, message=message, source=source)


def _duration_seconds(text: str) -> Optional[float]:
    """Go's time.ParseDuration for the forms used in annotations (e.g. `60s`, `1m30s`, `1.5h`)."""
    if not text:
        return None
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.lstrip("+"):
        return 0.0 if text == "0" else None
    return sum(float(n) * units[u] for n, u in parts)


def _int(text: str) -> Optional[int]:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


# -- Serving: Service ---------------------------------------------------------------------

def service_problems(svc: dict, config: ClusterConfig = ClusterConfig()) -> list[Problem]:
    name = (svc.get("metadata") or {}).get("name", "")
    spec = svc.get("spec") or {}
    template = spec.get("template") or {}
    out = list(_service_name(name))
    out += _revision_name(name, (template.get("metadata") or {}).get("name", ""))
    out += _autoscaling(((template.get("metadata") or {}).get("annotations") or {}), config)
    out += _no_autoscaling_on_service(((svc.get("metadata") or {}).get("annotations") or {}))
    out += _revision_spec(template.get("spec") or {}, config)
    out += _traffic(spec.get("traffic") or [])
    out += _labels((svc.get("metadata") or {}).get("labels") or {}, "metadata.labels")
    out += _labels((template.get("metadata") or {}).get("labels") or {}, "spec.template.metadata.labels")
    return out


def _service_name(name: str) -> Iterator[Problem]:
    # The Route of a Service creates a Kubernetes Service of the same name, and Kubernetes
    # Service names are DNS-1035 labels (kubernetes pkg/apis/core/validation ValidateServiceName;
    # knative/serving pkg/reconciler/route/resources/service.go).
    if not is_dns1035_label(name):
        yield _p("metadata.name", f"{name!r} is not a DNS-1035 label (lowercase letters, digits and '-', starting "
                 "with a letter, at most 63 characters): Knative creates a Kubernetes Service of this name",
                 f"{SERVING} pkg/reconciler/route/resources/service.go MakeK8sPlaceholderService; "
                 f"{K8S_VALIDATION} IsDNS1035Label")


def _revision_name(service: str, revision: str) -> Iterator[Problem]:
    # serving pkg/apis/serving/v1/revision_validation.go validateRevisionName
    source = f"{SERVING} pkg/apis/serving/v1/revision_validation.go validateRevisionName"
    if not revision:
        return
    if not is_dns1035_label(revision):
        yield _p("spec.template.metadata.name", f"revision name {revision!r} is not a DNS-1035 label (starts with "
                 f"a letter, at most 63 characters; it has {len(revision)})", source)
    if not revision.startswith(service + "-"):
        yield _p("spec.template.metadata.name", f"{revision!r} must have prefix {service + '-'!r}", source)


def _no_autoscaling_on_service(annotations: dict) -> Iterator[Problem]:
    # serving pkg/apis/serving/metadata_validation.go ValidateObjectMetadata -> ValidateHasNoAutoscalingAnnotation
    for key in annotations:
        if key.startswith("autoscaling.knative.dev/"):
            yield _p(f"metadata.annotations.{key}", "autoscaling annotations must be put under "
                     "spec.template.metadata.annotations to work",
                     f"{SERVING} pkg/apis/serving/metadata_validation.go ValidateHasNoAutoscalingAnnotation")


_KPA, _HPA = "kpa.autoscaling.knative.dev", "hpa.autoscaling.knative.dev"
_WINDOW_MAX = 3600.0  # serving pkg/apis/autoscaling/register.go WindowMax (1h)


def _autoscaling(ann: dict, config: ClusterConfig) -> Iterator[Problem]:
    """serving pkg/apis/autoscaling/annotation_validation.go ValidateAnnotations."""
    source = f"{SERVING} pkg/apis/autoscaling/annotation_validation.go"
    at = "spec.template.metadata.annotations."
    g = "autoscaling.knative.dev/"
    cls = ann.get(g + "class", _KPA)
    if cls.endswith(".autoscaling.knative.dev") and cls not in (_KPA, _HPA):
        yield _p(at + g + "class", f"invalid autoscaler class {cls!r}", f"{source} validateClass")
    bounds = {}
    for key in ("min-scale", "max-scale"):
        if g + key in ann:
            value = _int(ann[g + key])
            if value is None or value < 0:
                yield _p(at + g + key, f"{ann[g + key]!r} is not a whole number >= 0", f"{source} getIntGE0")
            else:
                bounds[key] = value
    low, high = bounds.get("min-scale", 0), bounds.get("max-scale", 0)
    if high and high < low:
        yield _p(at + g + "max-scale", f"max-scale={high} is less than min-scale={low}",
                 f"{source} validateMinMaxScale")
    if config.max_scale_limit and g + "max-scale" in ann and (high == 0 or high > config.max_scale_limit):
        yield _p(at + g + "max-scale", f"max-scale={high} is over the cluster's max-scale-limit "
                 f"{config.max_scale_limit} (0 means unlimited)", f"{source} validateMaxScaleWithinLimit")
    if g + "target" in ann:
        try:
            if float(ann[g + "target"]) < 0.01:
                yield _p(at + g + "target", f"target {ann[g + 'target']} should be at least 0.01",
                         f"{source} validateFloats")
        except ValueError:
            yield _p(at + g + "target", f"{ann[g + 'target']!r} is not a number", f"{source} validateFloats")
    for key, second_precision in (("scale-to-zero-pod-retention-period", False), ("scale-down-delay", True)):
        if g + key in ann:
            seconds = _duration_seconds(ann[g + key])
            if seconds is None:
                yield _p(at + g + key, f"{ann[g + key]!r} is not a duration", source)
            elif not 0 <= seconds <= _WINDOW_MAX:
                yield _p(at + g + key, f"{ann[g + key]} is out of bounds: at most 1h (Knative's longest window)",
                         f"{source} {'validateScaleDownDelay' if second_precision else 'validateLastPodRetention'}")
            elif second_precision and seconds != int(seconds):
                yield _p(at + g + key, "must be specified with at most second precision",
                         f"{source} validateScaleDownDelay")
    if g + "metric" in ann and cls == _KPA and ann[g + "metric"] not in ("concurrency", "rps"):
        yield _p(at + g + "metric", f"metric {ann[g + 'metric']!r} is not one the KPA knows (concurrency, rps)",
                 f"{source} validateMetric")
    if g + "initial-scale" in ann:
        value = _int(ann[g + "initial-scale"])
        if value is None or value < 0:
            yield _p(at + g + "initial-scale", f"{ann[g + 'initial-scale']!r} is not a whole number >= 0",
                     f"{source} validateInitialScale")
        elif value == 0 and not config.allow_zero_initial_scale:
            yield _p(at + g + "initial-scale", "initial-scale=0 is not allowed by the cluster "
                     "(config-autoscaler allow-zero-initial-scale)", f"{source} validateInitialScale")


def _revision_spec(spec: dict, config: ClusterConfig) -> Iterator[Problem]:
    at = "spec.template.spec"
    source = f"{SERVING} pkg/apis/serving/v1/revision_validation.go"
    timeout = spec.get("timeoutSeconds")
    if timeout is not None and timeout != 0 and not 0 <= timeout <= config.max_revision_timeout_seconds:
        yield _p(f"{at}.timeoutSeconds", f"{timeout} s is out of bounds: 0 to {config.max_revision_timeout_seconds} s "
                 "(max-revision-timeout-seconds)", f"{source} validateTimeoutSeconds")
    cc = spec.get("containerConcurrency")
    if cc is not None and not 0 <= cc <= config.container_concurrency_max:
        yield _p(f"{at}.containerConcurrency", f"{cc} is out of bounds: 0 to {config.container_concurrency_max}",
                 f"{SERVING} pkg/apis/serving/metadata_validation.go ValidateContainerConcurrency")
    yield from pod_spec_problems(spec, config, at)


# What Knative's field masks let through a Service's pod spec and containers
# (serving pkg/apis/serving/fieldmask.go PodSpecMask, ContainerMask, SecurityContextMask).
_REVISION_SPEC_ONLY = {"timeoutSeconds", "containerConcurrency", "idleTimeoutSeconds", "responseStartTimeoutSeconds"}
_POD_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks",
               "automountServiceAccountToken"}
_CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                     "livenessProbe", "ports", "readinessProbe", "resources", "securityContext", "startupProbe",
                     "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
_SECURITY_FIELDS = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                    "allowPrivilegeEscalation", "seccompProfile", "privileged"}
_RESERVED_CONTAINER_NAMES = {"queue-proxy"}  # k8s_validation.go reservedContainerNames
_RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}  # k8s_validation.go reservedEnvVars
_RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}  # k8s_validation.go reservedPorts (networking, profiling)
_RESERVED_PATHS = {"/", "/dev", "/dev/log"}  # k8s_validation.go reservedPaths
_PORT_NAMES = {"", "h2c", "http1"}  # k8s_validation.go validPortNames


def pod_spec_problems(spec: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    """serving pkg/apis/serving/k8s_validation.go ValidatePodSpec, on a revision's pod spec."""
    source = f"{SERVING} pkg/apis/serving/k8s_validation.go"
    mask = f"{SERVING} pkg/apis/serving/fieldmask.go"
    allowed = set(_POD_FIELDS) | _REVISION_SPEC_ONLY
    if config.pod_security_context:
        allowed.add("securityContext")
    if config.init_containers:
        allowed.add("initContainers")
    for key in spec:
        if key not in allowed:
            yield _p(f"{at}.{key}", f"field {key!r} is not allowed in a Knative revision (or only behind a "
                     "config-features flag)", f"{mask} PodSpecMask")
    if spec.get("automountServiceAccountToken") is True:
        yield _p(f"{at}.automountServiceAccountToken", "may only be set to false", f"{mask} PodSpecMask")
    if spec.get("serviceAccountName") and not is_dns1123_subdomain(spec["serviceAccountName"]):
        yield _p(f"{at}.serviceAccountName", f"{spec['serviceAccountName']!r} is not a DNS-1123 subdomain",
                 f"{source} ValidatePodSpec")
    containers = spec.get("containers") or []
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounted = {m.get("name") for c in containers for m in c.get("volumeMounts") or []}
    seen_volumes: set = set()
    for i, v in enumerate(spec.get("volumes") or []):
        vat = f"{at}.volumes[{i}]"
        if v.get("name") in seen_volumes:
            yield _p(f"{vat}.name", f"duplicate volume name {v.get('name')!r}", f"{source} ValidateVolumes")
        seen_volumes.add(v.get("name"))
        if v.get("name") not in mounted:
            yield _p(f"{vat}.name", f"volume with name {v.get('name')!r} not mounted", f"{source} ValidateVolumes")
        if not is_dns1123_label(v.get("name") or ""):
            yield _p(f"{vat}.name", f"{v.get('name')!r} is not a DNS-1123 label", f"{source} validateVolume")
        if "emptyDir" in v and not config.emptydir_volumes:
            yield _p(vat, "emptyDir volumes are off (config-features kubernetes.podspec-volumes-emptydir)",
                     f"{source} validateVolume")
    if not containers:
        yield _p(f"{at}.containers", "missing field: a revision needs a container", f"{source} ValidatePodSpec")
        return
    if len(containers) > 1 and not config.multi_container:
        yield _p(f"{at}.containers", f"multi-container is off, but found {len(containers)} containers",
                 f"{source} validateContainers")
    with_ports = [i for i, c in enumerate(containers) if c.get("ports")]
    if len(containers) > 1 and not with_ports:
        yield _p(f"{at}.containers[*].ports", "missing field: one container must name the port Knative routes to",
                 f"{source} validateContainersPorts")
    if len(with_ports) > 1 or any(len(containers[i]["ports"]) > 1 for i in with_ports):
        yield _p(f"{at}.containers[*].ports", "more than one container port is set: only a single port is "
                 "allowed across all containers", f"{source} validateContainersPorts")
    serving = with_ports[0] if with_ports else 0
    names: set = set()
    for i, c in enumerate(containers):
        yield from _container(c, f"{at}.containers[{i}]", serving=i == serving, volumes=volumes, names=names)


def _container(c: dict, at: str, *, serving: bool, volumes: dict, names: set) -> Iterator[Problem]:
    source = f"{SERVING} pkg/apis/serving/k8s_validation.go"
    mask = f"{SERVING} pkg/apis/serving/fieldmask.go"
    name = c.get("name", "")
    for key in c:
        if key not in _CONTAINER_FIELDS:
            yield _p(f"{at}.{key}", f"field {key!r} is not allowed on a Knative container", f"{mask} ContainerMask")
    if name in names:
        yield _p(f"{at}.name", f"duplicate container name {name!r}", f"{source} validateContainers")
    names.add(name)
    if name in _RESERVED_CONTAINER_NAMES:
        yield _p(f"{at}.name", f"{name!r} is a reserved container name", f"{source} validate")
    if not c.get("image"):
        yield _p(f"{at}.image", "missing field: image", f"{source} validate")
    reserved = _RESERVED_ENV if serving else _RESERVED_ENV - {"PORT"}  # reservedSidecarEnvVars
    for j, e in enumerate(c.get("env") or []):
        if e.get("name") in reserved:
            yield _p(f"{at}.env[{j}].name", f"{e.get('name')!r} is a reserved environment variable",
                     f"{source} validateEnvVar")
        elif not _ENV_NAME.match(e.get("name") or ""):
            yield _p(f"{at}.env[{j}].name", f"{e.get('name')!r} is not a valid environment variable name",
                     f"{source} validateEnvVar; {K8S_VALIDATION} IsEnvVarName")
    for j, port in enumerate(c.get("ports") or []):
        if port.get("containerPort") in _RESERVED_PORTS:
            yield _p(f"{at}.ports[{j}].containerPort", f"{port['containerPort']} is a reserved port",
                     f"{source} validateContainerPortBasic")
        if port.get("name", "") not in _PORT_NAMES:
            yield _p(f"{at}.ports[{j}].name", f"port name {port.get('name')!r} is not allowed: empty, 'h2c' or "
                     "'http1'", f"{source} validateContainerPorts")
        if port.get("protocol", "TCP") != "TCP":
            yield _p(f"{at}.ports[{j}].protocol", f"{port.get('protocol')!r}: only TCP", f"{source} validateContainerPorts")
    port_name = ((c.get("ports") or [{}])[0]).get("name", "")
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        if c.get(kind):
            yield from _probe(c[kind], f"{at}.{kind}", serving=serving, port_name=port_name,
                              readiness=kind == "readinessProbe")
    yield from _security_context(c.get("securityContext"), f"{at}.securityContext")
    seen_paths: set = set()
    for j, m in enumerate(c.get("volumeMounts") or []):
        mat = f"{at}.volumeMounts[{j}]"
        volume = volumes.get(m.get("name"))
        if volume is None:
            yield _p(f"{mat}.name", f"volumeMount {m.get('name')!r} has no matching volume",
                     f"{source} validateVolumeMounts")
        path = posixpath.normpath(m.get("mountPath") or "")
        if not m.get("mountPath"):
            yield _p(f"{mat}.mountPath", "missing field: mountPath", f"{source} validateVolumeMounts")
        elif path in _RESERVED_PATHS or m["mountPath"] == "/":
            yield _p(f"{mat}.mountPath", f"mountPath {path!r} is a reserved path", f"{source} validateVolumeMounts")
        elif not m["mountPath"].startswith("/"):
            yield _p(f"{mat}.mountPath", f"{m['mountPath']!r} is not an absolute path", f"{source} validateVolumeMounts")
        elif path in seen_paths:
            yield _p(f"{mat}.mountPath", f"{m['mountPath']!r} must be unique", f"{source} validateVolumeMounts")
        seen_paths.add(path)
        writable_kinds = ("emptyDir", "persistentVolumeClaim", "ephemeral")
        if volume is not None and not any(k in volume for k in writable_kinds) and not m.get("readOnly"):
            yield _p(f"{mat}.readOnly", "volume mount should be readOnly for this type of volume",
                     f"{source} validateVolumeMounts")


def _probe(p: dict, at: str, *, serving: bool, port_name: str, readiness: bool) -> Iterator[Problem]:
    source = f"{SERVING} pkg/apis/serving/k8s_validation.go"
    if not serving:
        # A sidecar may carry probes only with config-features multi-container-probing (off by default).
        yield _p(at, "probes on a non-serving container need config-features multi-container-probing",
                 f"{source} validateSidecarContainer")
        return
    handlers = [h for h in ("httpGet", "tcpSocket", "exec", "grpc") if h in p]
    if not handlers:
        yield _p(at, "expected exactly one of httpGet, tcpSocket, exec, grpc", f"{source} validateProbe")
    elif len(handlers) > 1:
        yield _p(at, f"expected exactly one handler, got {', '.join(handlers)}", f"{source} validateProbe")
    for h in ("httpGet", "tcpSocket"):
        port = (p.get(h) or {}).get("port")
        if isinstance(port, str) and port != port_name:
            yield _p(f"{at}.{h}.port", f"probe port {port!r} must match the container port", f"{source} validateProbe")
    if readiness:
        # After Knative's defaults (revision_defaults.go applyReadinessProbeDefaults).
        period = p.get("periodSeconds", 0)
        if period < 0:
            yield _p(f"{at}.periodSeconds", "must be >= 0", f"{source} validateReadinessProbe")
        if period == 0 and (p.get("failureThreshold") or p.get("timeoutSeconds")):
            yield _p(at, "failureThreshold and timeoutSeconds are disallowed when periodSeconds is zero",
                     f"{source} validateReadinessProbe")
        if period and (p.get("timeoutSeconds", 1) < 1 or p.get("failureThreshold", 3) < 1):
            yield _p(at, "timeoutSeconds and failureThreshold must be >= 1", f"{source} validateReadinessProbe")


def _security_context(sc: Optional[dict], at: str) -> Iterator[Problem]:
    mask = f"{SERVING} pkg/apis/serving/fieldmask.go"
    if not sc:
        return
    for key in sc:
        if key not in _SECURITY_FIELDS:
            yield _p(f"{at}.{key}", f"field {key!r} is not allowed in a Knative container's securityContext",
                     f"{mask} SecurityContextMask")
    if sc.get("privileged") is True:
        yield _p(f"{at}.privileged", "may only be set to false", f"{mask} SecurityContextMask")
    caps = sc.get("capabilities") or {}
    if caps.get("add"):
        yield _p(f"{at}.capabilities.add", "adding capabilities needs config-features "
                 "kubernetes.containerspec-addcapabilities (or secure-pod-defaults, for NET_BIND_SERVICE)",
                 f"{mask} CapabilitiesMask")


def _traffic(traffic: list) -> Iterator[Problem]:
    """serving pkg/apis/serving/v1/route_validation.go validateTrafficList (in a Service's spec)."""
    source = f"{SERVING} pkg/apis/serving/v1/route_validation.go"
    if not traffic:
        return
    total, tags = 0, {}
    for i, t in enumerate(traffic):
        at = f"spec.traffic[{i}]"
        percent = t.get("percent")
        if percent is not None:
            total += percent
            if not 0 <= percent <= 100:
                yield _p(f"{at}.percent", f"{percent} is out of bounds: 0 to 100", f"{source} validateTrafficPercentage")
        if t.get("configurationName"):
            yield _p(f"{at}.configurationName", "not allowed in a Service (its Configuration is implied)",
                     f"{source} validateRevisionAndConfiguration")
        revision = t.get("revisionName", "")
        if revision and not _QUALIFIED_NAME.match(revision):
            yield _p(f"{at}.revisionName", f"{revision!r} is not a qualified name",
                     f"{source} validateRevisionAndConfiguration")
        latest = t.get("latestRevision")
        if latest is not None and bool(revision) == latest:
            yield _p(f"{at}.latestRevision", f"may not set revisionName {revision!r} when latestRevision is "
                     f"{str(latest).lower()}", f"{source} validateLatestRevision")
        tag = t.get("tag")
        if tag:
            if not is_dns1035_label(tag):
                yield _p(f"{at}.tag", f"tag {tag!r} is not a DNS-1035 label", f"{source} validateTrafficList")
            if tag in tags:
                yield _p(f"{at}.tag", f"multiple definitions for {tag!r}", f"{source} validateTrafficList")
            tags[tag] = i
    if total != 100:
        yield _p("spec.traffic", f"traffic targets sum to {total}, want 100", f"{source} validateTrafficList")


def _labels(labels: dict, at: str) -> Iterator[Problem]:
    for key, value in labels.items():
        if not isinstance(value, str) or not is_label_value(value):
            yield _p(f"{at}.{key}", f"label value {value!r} is not valid (at most 63 characters: letters, digits, "
                     "'-', '_', '.', alphanumeric at both ends)", f"{K8S_VALIDATION} IsValidLabelValue")
    visibility = labels.get("networking.knative.dev/visibility")
    if visibility not in (None, "cluster-local"):
        yield _p(f"{at}.networking.knative.dev/visibility", f"{visibility!r}: the one value Knative acts on is "
                 "'cluster-local'", f"{SERVING} pkg/reconciler/route/config/domain.go")


# -- Eventing: JobSink --------------------------------------------------------------------

EVENT_VOLUME = "jobsink-event"  # what the dispatcher adds (eventing cmd/jobsink/main.go)


def jobsink_problems(sink: dict) -> list[Problem]:
    """eventing pkg/apis/sinks/v1alpha1/job_sink_validation.go: `spec.job` is required and is
    dry-run created as written (so what the API server refuses for a Job is refused here too);
    and cmd/jobsink/main.go, which adds the event volume to main containers only."""
    source = f"{EVENTING} pkg/apis/sinks/v1alpha1/job_sink_validation.go"
    name = (sink.get("metadata") or {}).get("name", "")
    job = (sink.get("spec") or {}).get("job")
    if not job:
        return [_p("spec.job", "expected exactly one, got neither: a JobSink needs spec.job", source)]
    out = []
    # The dispatcher labels every Job it creates with the JobSink's name
    # (sinks.knative.dev/job-sink-name), so the name must also be a label value: 63 at most.
    # (Job names themselves are child_name(name + "-", md5 hex): 63 at most whatever the name.)
    if not is_dns1123_subdomain(name) or not is_label_value(name):
        out.append(_p("metadata.name", f"{name!r} must be a DNS-1123 name of at most 63 characters: the "
                      "dispatcher labels each Job with it", f"{EVENTING} cmd/jobsink/main.go ServeHTTP; "
                      f"{K8S_VALIDATION} IsValidLabelValue"))
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    at = "spec.job.spec.template.spec"
    restart = pod.get("restartPolicy")
    if restart not in ("Never", "OnFailure"):
        out.append(_p(f"{at}.restartPolicy", f"{restart!r}: a Job's pods restart Never or OnFailure",
                      f"{source} (dry run: kubernetes pkg/apis/batch/validation ValidateJob)"))
    volumes = {v.get("name") for v in pod.get("volumes") or []}
    names: set = set()
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(pod.get(kind) or []):
            cat = f"{at}.{kind}[{i}]"
            if c.get("name") in names:
                out.append(_p(f"{cat}.name", f"duplicate container name {c.get('name')!r}",
                              f"{source} (dry run: kubernetes pkg/apis/core/validation)"))
            names.add(c.get("name"))
            if not is_dns1123_label(c.get("name") or ""):
                out.append(_p(f"{cat}.name", f"{c.get('name')!r} is not a DNS-1123 label",
                              f"{source} (dry run: kubernetes pkg/apis/core/validation)"))
            for j, e in enumerate(c.get("env") or []):
                if not _ENV_NAME.match(e.get("name") or ""):
                    out.append(_p(f"{cat}.env[{j}].name", f"{e.get('name')!r} is not a valid environment variable name",
                                  f"{source} (dry run); {K8S_VALIDATION} IsEnvVarName"))
            for j, m in enumerate(c.get("volumeMounts") or []):
                if m.get("name") == EVENT_VOLUME and kind == "initContainers":
                    out.append(_p(f"{cat}.volumeMounts[{j}]", f"an init container cannot read the event: Knative's "
                                  f"dispatcher adds the {EVENT_VOLUME!r} volume and K_EVENT_PATH to main containers "
                                  "only, and the webhook's dry run refuses a mount of an undeclared volume",
                                  f"{EVENTING} cmd/jobsink/main.go ServeHTTP; {source}"))
                elif m.get("name") not in volumes and m.get("name") != EVENT_VOLUME:
                    out.append(_p(f"{cat}.volumeMounts[{j}].name", f"volume {m.get('name')!r} is not declared",
                                  f"{source} (dry run: kubernetes pkg/apis/core/validation)"))
    if not pod.get("containers"):
        out.append(_p(f"{at}.containers", "a Job needs a container", f"{source} (dry run)"))
    return out


# -- Eventing: Trigger --------------------------------------------------------------------

_ATTRIBUTE = re.compile(r"^[a-z][a-z0-9]*$")  # trigger_validation.go validAttributeName
_DIALECTS = ("exact", "prefix", "suffix", "all", "any", "not", "cesql")


def trigger_problems(trigger: dict) -> list[Problem]:
    """eventing pkg/apis/eventing/v1/trigger_validation.go TriggerSpec.Validate."""
    source = f"{EVENTING} pkg/apis/eventing/v1/trigger_validation.go"
    spec = trigger.get("spec") or {}
    out = []
    if not spec.get("broker") and not spec.get("brokerRef"):
        out.append(_p("spec.broker", "missing field: broker", f"{source} TriggerSpec.Validate"))
    elif spec.get("broker") and spec.get("brokerRef"):
        out.append(_p("spec.broker", "expected exactly one of broker, brokerRef", f"{source} TriggerSpec.Validate"))
    for key in ((spec.get("filter") or {}).get("attributes") or {}):
        if not _ATTRIBUTE.match(key):
            out.append(_p(f"spec.filter.attributes.{key}", "attribute names start with a letter and hold only "
                          "lowercase letters and digits", f"{source} ValidateAttributesNames"))
    out += _filters(spec.get("filters") or [], "spec.filters", source)
    out += _destination(spec.get("subscriber") or {}, "spec.subscriber")
    return out


def _filters(filters: list, at: str, source: str) -> list[Problem]:
    out = []
    for i, f in enumerate(filters):
        fat = f"{at}[{i}]"
        dialects = [d for d in _DIALECTS if f.get(d)]
        if len(dialects) > 1:
            out.append(_p(fat, f"multiple dialects found ({', '.join(dialects)}), filters can have only one "
                          "dialect set", f"{source} ValidateOneOf"))
        for d in ("exact", "prefix", "suffix"):
            for key in f.get(d) or {}:
                if not _ATTRIBUTE.match(key):
                    out.append(_p(f"{fat}.{d}.{key}", "attribute names start with a letter and hold only lowercase "
                                  "letters and digits", f"{source} ValidateAttributesNames"))
        for d in ("all", "any"):
            out += _filters(f.get(d) or [], f"{fat}.{d}", source)
        if f.get("not"):
            out += _filters([f["not"]], f"{fat}.not", source)
    return out


def _destination(dest: dict, at: str) -> list[Problem]:
    """knative/pkg apis/duck/v1/destination.go Destination.Validate (and KReference.Validate)."""
    source = "knative/pkg apis/duck/v1/destination.go"
    ref, uri = dest.get("ref"), dest.get("uri")
    if not ref and not uri:
        return [_p(at, "expected at least one of ref, uri", source)]
    out = []
    if ref:
        for key in ("kind", "apiVersion", "name"):
            if not ref.get(key):
                out.append(_p(f"{at}.ref.{key}", f"missing field: {key}", "knative/pkg apis/duck/v1/knative_reference.go"))
    return out


# -- all of them --------------------------------------------------------------------------

_BY_KIND = {
    ("serving.knative.dev/v1", "Service"): lambda obj, config: service_problems(obj, config),
    ("sinks.knative.dev/v1alpha1", "JobSink"): lambda obj, config: jobsink_problems(obj),
    ("eventing.knative.dev/v1", "Trigger"): lambda obj, config: trigger_problems(obj),
}


def problems(obj: dict, config: ClusterConfig = ClusterConfig()) -> list[Problem]:
    """What Knative's webhooks would refuse in `obj` (a Service, JobSink or Trigger)."""
    check = _BY_KIND.get((obj.get("apiVersion"), obj.get("kind")))
    return check(obj, config) if check else []


__all__ = ["ClusterConfig", "Problem", "child_name", "generated_name", "problems", "service_problems",
           "jobsink_problems", "trigger_problems", "to_dns1123_subdomain", "pod_spec_problems"]
