"""Knative's admission rules for what modelplane renders, re-expressed in Python.

A real cluster runs Knative's webhooks on every Service, JobSink and Trigger (defaulting first,
then validation), and Kubernetes validates what Knative creates from them (the Deployment of a
revision, the Job of a JobSink) and admits their pods under the namespace's Pod Security level.
The cluster runtime checks the same rules before it sends anything, so that a model the cluster
would refuse -- or accept and then never run -- is refused by `modelplane deploy` with the field
named, not half-way through a deploy. A rule is only what some admission stage of the real
system refuses (Knative's webhooks, the API server, or its admission of the Revision,
Deployment, Job or Pod created from the object -- tests/test_knative_webhooks.py has the real
cluster judge every case); what the cluster accepts and only acts on differently later (a
garbage-collection annotation, a filter the Broker skips) is not refused here.

Each rule is a small function whose comment names the source it mirrors. Sources, read at:
knative/serving 98e5ef90 (v1.23 line), knative/eventing 8cf4c4b6 (v1.22 line), knative/pkg and
knative/networking as pinned by serving's go.mod, kubernetes/apimachinery v0.35.7,
k8s.io/api v0.35.6, google/go-containerregistry v0.20.3, and Kubernetes >= 1.34 behaviour
(the minimum knative/README.md names).

What is *not* ported: rules on objects modelplane never writes (Configuration, Route, Revision
created directly, DomainMapping, ...), update-only rules (immutability, creator annotations),
CESQL filter parsing, and cross-object checks that need the cluster (does the revision named in
a traffic target exist, does the ServiceAccount exist).

Pure functions of plain dicts: no Kubernetes client, nothing sent anywhere.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Iterator, Optional

__all__ = [
    "ClusterConfig", "Problem", "child_name", "generated_name", "jobsink_problems", "problems",
    "service_problems", "to_dns1123_subdomain", "trigger_problems",
    "is_dns1035_label", "is_dns1123_label", "is_dns1123_subdomain", "is_label_value", "is_qualified_name",
]

SERVING_API = "serving.knative.dev/v1"
JOBSINK_API = "sinks.knative.dev/v1alpha1"
TRIGGER_API = "eventing.knative.dev/v1"

# -- where each rule comes from -----------------------------------------------------------
_SERVING = "knative/serving "
REVISION_VALIDATION = _SERVING + "pkg/apis/serving/v1/revision_validation.go"
REVISION_DEFAULTS = _SERVING + "pkg/apis/serving/v1/revision_defaults.go"
ROUTE_VALIDATION = _SERVING + "pkg/apis/serving/v1/route_validation.go"
SERVICE_VALIDATION = _SERVING + "pkg/apis/serving/v1/service_validation.go"
METADATA_VALIDATION = _SERVING + "pkg/apis/serving/metadata_validation.go"
K8S_VALIDATION = _SERVING + "pkg/apis/serving/k8s_validation.go"
FIELDMASK = _SERVING + "pkg/apis/serving/fieldmask.go"
AUTOSCALING = _SERVING + "pkg/apis/autoscaling/annotation_validation.go"
DEPLOY = _SERVING + "pkg/reconciler/revision/resources/deploy.go"
ROUTE_SERVICE = _SERVING + "pkg/reconciler/route/resources/service.go"
NETWORKING_ANNOTATIONS = "knative/networking pkg/apis/networking/metadata_validation.go"
PKG_METADATA = "knative/pkg apis/metadata_validation.go"
PKG_DESTINATION = "knative/pkg apis/duck/v1/destination.go"
PKG_KREFERENCE = "knative/pkg apis/duck/v1/knative_reference.go"
PKG_DECODE = "knative/pkg webhook/json/decode.go"
_EVENTING = "knative/eventing "
JOBSINK_VALIDATION = _EVENTING + "pkg/apis/sinks/v1alpha1/job_sink_validation.go"
JOBSINK_DISPATCHER = _EVENTING + "cmd/jobsink/main.go"
TRIGGER_VALIDATION = _EVENTING + "pkg/apis/eventing/v1/trigger_validation.go"
TRIGGER_DEFAULTS = _EVENTING + "pkg/apis/eventing/v1/trigger_defaults.go"
_K8S = "kubernetes "
K8S_NAMES = _K8S + "apimachinery pkg/util/validation/validation.go"
K8S_CONTENT = _K8S + "apimachinery pkg/api/validate/content/kube.go"
K8S_OBJECTMETA = _K8S + "apimachinery pkg/api/validation/objectmeta.go"
K8S_CORE = _K8S + "pkg/apis/core/validation/validation.go"
K8S_BATCH = _K8S + "pkg/apis/batch/validation/validation.go"
K8S_JOB_STRATEGY = _K8S + "pkg/registry/batch/job/strategy.go"
K8S_QUANTITY = _K8S + "apimachinery pkg/api/resource/quantity.go"
K8S_PSA = _K8S + "pod-security-admission policy/"
GGCR_NAME = "google/go-containerregistry pkg/name"


@dataclass(frozen=True)
class Problem:
    field: str    # path in the object, e.g. "spec.template.spec.containers[1].env[0].name"
    message: str  # what Knative (or Kubernetes) would say, and what to change
    source: str   # the Knative (or Kubernetes) source file (and function) the rule mirrors


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster settings the rules depend on, with Knative's defaults."""

    # config-defaults max-revision-timeout-seconds
    # (serving pkg/apis/config/defaults.go DefaultMaxRevisionTimeoutSeconds: 600)
    max_revision_timeout_seconds: int = 600
    # config-defaults container-concurrency-max-limit
    # (serving pkg/apis/config/defaults.go DefaultMaxRevisionContainerConcurrency: 1000)
    container_concurrency_max_limit: int = 1000
    # config-defaults allow-container-concurrency-zero
    # (serving pkg/apis/config/defaults.go DefaultAllowContainerConcurrencyZero: true)
    allow_container_concurrency_zero: bool = True
    # config-autoscaler max-scale-limit (serving pkg/autoscaler/config/config.go: 0, no limit)
    max_scale_limit: int = 0
    # config-autoscaler allow-zero-initial-scale (serving pkg/autoscaler/config/config.go: false)
    allow_zero_initial_scale: bool = False
    # config-autoscaler pod-autoscaler-class (serving pkg/autoscaler/config/config.go: the KPA)
    pod_autoscaler_class: str = "kpa.autoscaling.knative.dev"
    # config-features multi-container (serving pkg/apis/config/features.go: Enabled)
    multi_container: bool = True
    # config-features multi-container-probing (features.go: Disabled)
    multi_container_probing: bool = False
    # config-features kubernetes.podspec-volumes-emptydir (features.go: Enabled)
    podspec_volumes_emptydir: bool = True
    # config-features kubernetes.podspec-persistent-volume-claim and
    # kubernetes.podspec-persistent-volume-write (features.go: both Disabled)
    podspec_persistent_volume_claim: bool = False
    podspec_persistent_volume_write: bool = False
    # config-features kubernetes.podspec-fieldref (features.go: Disabled): env valueFrom.fieldRef
    podspec_fieldref: bool = False
    # config-features kubernetes.podspec-init-containers (features.go: Disabled)
    podspec_init_containers: bool = False
    # config-features kubernetes.podspec-securitycontext (features.go: Disabled): the pod-level
    # securityContext of a revision
    podspec_securitycontext: bool = False
    # config-features secure-pod-defaults (features.go: Disabled; or AllowRootBounded, Enabled)
    secure_pod_defaults: str = "Disabled"
    # config-features kubernetes.containerspec-addcapabilities (features.go: Disabled)
    containerspec_addcapabilities: bool = False
    # Other config-features keys that let a pod-spec field through PodSpecMask / VolumeSourceMask
    # when not Disabled, e.g. "kubernetes.podspec-affinity" (features.go: all Disabled)
    podspec_features: frozenset = frozenset()
    # config-observability logging.enable-var-log-collection (serving pkg/observability/config.go:
    # false): Knative then mounts its own volume on /var/log in every user container (deploy.go)
    var_log_collection: bool = False
    # config-features queueproxy.mount-podinfo (features.go: Disabled; Enabled, or Allowed for a
    # revision annotated features.knative.dev/queueproxy-podinfo: enabled): Knative then adds a
    # volume "pod-info" for queue-proxy to the revision's pod (deploy.go makePodSpec)
    queueproxy_mount_podinfo: str = "Disabled"
    # config-deployment queue-sidecar-token-audiences (serving pkg/deployment/config.go: none):
    # with an audience Knative adds a volume "knative-token-volume" (deploy.go makePodSpec)
    queue_sidecar_token_audiences: frozenset = frozenset()
    # config-network system-internal-tls (knative/networking pkg/config/config.go: disabled):
    # when enabled Knative adds a volume "server-certs" (deploy.go makePodSpec)
    system_internal_tls: bool = False
    # config-network tag-template (knative/networking pkg/config/config.go DefaultTagTemplate):
    # the name of the Kubernetes Service of a tagged traffic target
    tag_template: str = "{{.Tag}}-{{.Name}}"
    # The namespace's Pod Security Admission level (label pod-security.kubernetes.io/enforce):
    # "restricted" in modelplane's namespace (knative/namespace.yaml); Kubernetes' own default is
    # "privileged" (no checks). Pods Knative or the Job controller create are admitted under it.
    pod_security_level: str = "restricted"


# =========================================================================================
# Kubernetes names (kubernetes apimachinery pkg/util/validation/validation.go,
# pkg/api/validate/content/kube.go at v0.35.7)
# =========================================================================================

_DNS1123_LABEL_FMT = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL = re.compile(r"^" + _DNS1123_LABEL_FMT + r"$")
_DNS1123_SUBDOMAIN = re.compile(r"^" + _DNS1123_LABEL_FMT + r"(\." + _DNS1123_LABEL_FMT + r")*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_KEY_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _blen(text: str) -> int:
    """Go's len(string): bytes, not characters."""
    return len(text.encode("utf-8", "surrogateescape"))


def _full(pattern: re.Pattern, text: str) -> bool:
    # Go's regexp `$` matches only at the very end; Python's also before a final newline.
    return pattern.fullmatch(text) is not None


def is_dns1123_label(value: str) -> bool:
    """IsDNS1123Label: at most 63, [a-z0-9-], alphanumeric at both ends."""
    return _blen(value) <= 63 and _full(_DNS1123_LABEL, value)


def is_dns1123_subdomain(value: str) -> bool:
    """IsDNS1123Subdomain: at most 253, dot-separated DNS-1123 labels."""
    return _blen(value) <= 253 and _full(_DNS1123_SUBDOMAIN, value)


def is_dns1035_label(value: str) -> bool:
    """IsDNS1035Label: at most 63, [a-z0-9-], starts with a letter, ends alphanumeric."""
    return _blen(value) <= 63 and _full(_DNS1035_LABEL, value)


def is_label_value(value: str) -> bool:
    """content.IsLabelValue: empty, or at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends."""
    return isinstance(value, str) and _blen(value) <= 63 and _full(_LABEL_VALUE, value)


def is_qualified_name(value: str) -> bool:
    """content.IsLabelKey (alias IsQualifiedName): `[prefix/]name`, the prefix a DNS-1123
    subdomain, the name at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends."""
    parts = value.split("/")
    if len(parts) > 2:
        return False
    if len(parts) == 2 and (not parts[0] or not is_dns1123_subdomain(parts[0])):
        return False
    name = parts[-1]
    return 0 < _blen(name) <= 63 and _full(_LABEL_KEY_NAME, name)


def is_relaxed_env_var_name(value: str) -> bool:
    """IsRelaxedEnvVarName (RelaxedEnvironmentVariableValidation, GA and locked on in Kubernetes
    1.34): non-empty, printable ASCII (space included) other than '='."""
    return bool(value) and all(0x20 <= ord(c) <= 0x7E and c != "=" for c in value)


# =========================================================================================
# Names Knative derives
# =========================================================================================

_LONGEST, _MD5_LEN = 63, 32
_HEAD = _LONGEST - _MD5_LEN  # 31


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def child_name(parent: str, suffix: str) -> str:
    """knative/pkg kmeta/names.go `ChildName` (lengths in bytes, as Go counts them).

    - `parent + suffix` when it fits in 63;
    - else, when the suffix is 31 or longer: the parent cut to 31, then md5hex(parent + suffix),
      padded to 63 with the start of the suffix, trailing non-alphanumerics removed (makeValidName);
    - else: the parent cut to 31 - len(suffix), md5hex(parent), then the suffix.
    """
    p, s = _bytes(parent), _bytes(suffix)
    if len(p) <= _LONGEST - len(s):
        return _text(p + s)
    if _HEAD - len(s) <= 0:
        digest = hashlib.md5(p + s).hexdigest().encode()  # noqa: S324 - a name, not security
        ret = p[:_HEAD] + digest
        if len(ret) < _LONGEST:
            ret += s[:_LONGEST - len(ret)]
        # makeValidName: drop trailing bytes that are not [a-zA-Z0-9] (the md5 ends the loop)
        while ret and not (chr(ret[-1]).isascii() and chr(ret[-1]).isalnum()):
            ret = ret[:-1]
        return _text(ret)
    digest = hashlib.md5(p).hexdigest().encode()  # noqa: S324 - a name, not security
    return _text(p[:_HEAD - len(s)] + digest + s)


_NOT_DNS1123_CHARS = re.compile(r"[^-.a-z0-9]+")


def to_dns1123_subdomain(name: str) -> str:
    """knative/eventing pkg/utils/utils.go `ToDNS1123Subdomain`: a valid DNS-1123 subdomain is
    returned as is; anything else is cut to 253 - 10 bytes, lower-cased, stripped of every
    character but [-.a-z0-9], then of leading and trailing '-' and '.'."""
    if is_dns1123_subdomain(name):
        return name
    data = _bytes(name)
    if len(data) > 253:
        data = data[:253 - 10]  # generateNameSafety
    text = data.decode("utf-8", "replace")  # Go maps invalid UTF-8 to U+FFFD, removed below
    return _NOT_DNS1123_CHARS.sub("", text.lower()).strip("-.")


_GENERATED_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery pkg/util/rand/rand.go alphanums


def generated_name(base: str) -> str:
    """kubernetes apiserver pkg/storage/names/generate.go `SimpleNameGenerator.GenerateName`: the
    base cut to 58 bytes (63 - 5) plus 5 random characters. The JobSink webhook names its dry-run
    Job so (job_sink_validation.go)."""
    return _text(_bytes(base)[:58]) + "".join(secrets.choice(_GENERATED_ALPHABET) for _ in range(5))


# =========================================================================================
# Go parsing, as the Go code parses annotation values and quantities
# =========================================================================================

_SECOND_NS = 10**9
_MAX_INT64 = 2**63 - 1
_DURATION_UNITS_NS = {"ns": 1, "us": 10**3, "\u00b5s": 10**3, "\u03bcs": 10**3, "ms": 10**6,
                      "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def go_duration_ns(text: str) -> Optional[int]:
    """Go's time.ParseDuration, in nanoseconds; None where Go returns an error."""
    s = text
    neg = False
    if s[:1] in ("+", "-"):
        neg, s = s[0] == "-", s[1:]
    if s == "0":
        return 0
    if not s:
        return None
    total = 0
    while s:
        m = re.match(r"(\d*)(?:\.(\d*))?", s)
        whole, frac = m.group(1), m.group(2)
        if not whole and not frac:  # neither digits before nor after the dot
            return None
        s = s[m.end():]
        unit_end = 0
        while unit_end < len(s) and not (s[unit_end] == "." or s[unit_end].isdigit()):
            unit_end += 1
        unit = s[:unit_end]
        if unit not in _DURATION_UNITS_NS:
            return None
        s = s[unit_end:]
        ns = _DURATION_UNITS_NS[unit]
        value = int(whole or "0") * ns
        if frac:
            value += int(Fraction(int(frac), 10 ** len(frac)) * ns)
        total += value
        if total > _MAX_INT64 + (1 if neg else 0):
            return None
    return -total if neg else total


def go_parse_int(text: str, bits: int = 64) -> tuple[Optional[int], Optional[str]]:
    """Go's strconv.ParseInt(text, 10, bits): (value, None), or (None, "syntax" | "range")."""
    if not isinstance(text, str) or not re.fullmatch(r"[+-]?[0-9]+", text):
        return None, "syntax"
    value = int(text)
    if not -(2 ** (bits - 1)) <= value <= 2 ** (bits - 1) - 1:
        return None, "range"
    return value, None


_GO_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_GO_HEX_FLOAT = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?\d+")
_GO_FLOAT_SPECIAL = re.compile(r"[+-]?(inf|infinity|nan)", re.IGNORECASE)


def go_parse_float(text: str) -> Optional[float]:
    """Go's strconv.ParseFloat(text, 64); None where Go returns an error (syntax or range)."""
    if not isinstance(text, str):
        return None
    if _GO_FLOAT_SPECIAL.fullmatch(text):
        return float(text.lower().replace("infinity", "inf"))
    if _GO_HEX_FLOAT.fullmatch(text):
        try:
            return float.fromhex(text)
        except (OverflowError, ValueError):
            return None
    if not _GO_FLOAT.fullmatch(text):
        return None
    value = float(text)
    return None if value in (float("inf"), float("-inf")) else value


_QUANTITY = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?")
_QUANTITY_SUFFIX = {None: Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
                    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
                    "P": Fraction(10**15), "E": Fraction(10**18), "Ki": Fraction(2**10), "Mi": Fraction(2**20),
                    "Gi": Fraction(2**30), "Ti": Fraction(2**40), "Pi": Fraction(2**50), "Ei": Fraction(2**60)}


def parse_quantity(text: Any) -> Optional[Fraction]:
    """Kubernetes resource.ParseQuantity (apimachinery pkg/api/resource/quantity.go): a signed
    decimal number then an optional binary-SI, decimal-SI or e-exponent suffix."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        return Fraction(text)
    if not isinstance(text, str):
        return None
    m = _QUANTITY.fullmatch(text)
    if not m:
        return None
    number, suffix = Fraction(m.group(1)), m.group(2)
    if suffix and suffix[0] in "eE" and len(suffix) > 1:
        return number * Fraction(10) ** int(suffix[1:])
    return number * _QUANTITY_SUFFIX[suffix]


def _go_path_clean(p: str) -> str:
    """Go's path.Clean (unlike posixpath.normpath, also folds a leading '//')."""
    if not p:
        return "."
    rooted = p.startswith("/")
    parts: list[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    out = "/".join(parts)
    return ("/" + out) if rooted else (out or ".")


# =========================================================================================
# Small helpers
# =========================================================================================

def _mask_trailing_dash(name: str) -> str:
    """apimachinery pkg/api/validation/generic.go maskTrailingDash (for generateName prefixes)."""
    return name[:-2] + "a" if len(name) > 1 and name.endswith("-") else name


def _p(field: str, message: str, source: str) -> Problem:
    return Problem(field=field, message=message, source=source)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _is_set(value: Any, go_value_type: bool = False) -> bool:
    """Whether a JSON field counts as set for knative/pkg kmp.CompareSetFields: null never is;
    for Go value (non-pointer) fields their zero value ("", false, 0) is not either. Nor is an
    empty list: before validation Knative's defaulting webhook round-trips the object through
    its Go types (knative/pkg webhook/resourcesemantics/defaulting/defaulting.go
    roundTripPatch), and every list field of those types is `omitempty`, so `[]` is removed
    (the real webhook accepts e.g. `initContainers: []` with the feature off). An empty object
    stays set: it is a pointer to a struct (e.g. `affinity: {}`), marshalled as `{}`."""
    if value is None or value == []:
        return False
    if go_value_type and value in ("", False, 0) and not isinstance(value, (list, dict)):
        return False
    return True


def _disallowed(obj: dict, allowed: Iterable[str], at: str, source: str, *, what: str,
                known: Iterable[str] = (), value_fields: Iterable[str] = (),
                hint: str = "") -> Iterator[Problem]:
    """knative/pkg apis/field_error.go CheckDisallowedFields against a fieldmask.go mask: every
    set field the mask drops is refused ("must not set the field(s)")."""
    allowed, known, value_fields = set(allowed), set(known), set(value_fields)
    for key, value in obj.items():
        if key in allowed or value is None:
            continue
        if known and key not in known:  # no Go field: not dropped by the round trip, even if empty
            yield _p(f"{at}.{key}", f"must not set the field(s): {key} -- {what} has no field {key!r} in Knative's "
                     "schema (a typo?): the API server refuses it (fieldValidation=Strict, as modelplane and kubectl "
                     "send) or drops it", source)
        elif _is_set(value, key in value_fields):
            yield _p(f"{at}.{key}", f"must not set the field(s): {key} -- Knative does not allow {key!r} on "
                     f"{what}{hint}", source)


def _ann_key(at: str, key: str) -> str:
    return f"{at}.{key}"


# =========================================================================================
# Object metadata (Kubernetes validates it for every object it stores)
# =========================================================================================

ANNOTATIONS_SIZE_LIMIT = 256 * (1 << 10)  # apimachinery pkg/api/validation/objectmeta.go TotalAnnotationSizeLimitB


def _labels(labels: Any, at: str, where: str) -> Iterator[Problem]:
    # apimachinery pkg/apis/meta/v1/validation/validation.go ValidateLabels: keys are qualified
    # names, values label values.
    for key, value in _dict(labels).items():
        if not is_qualified_name(key):
            yield _p(_ann_key(at, key), f"label key {key!r} is not a qualified name ([prefix/]name, the name at most "
                     f"63 characters of letters, digits, '-', '_', '.'){where}",
                     K8S_CONTENT + " IsLabelKey (meta/v1/validation ValidateLabels)")
        if not is_label_value(value):
            yield _p(_ann_key(at, key), f"label value {value!r} is not valid: at most 63 characters of letters, "
                     f"digits, '-', '_', '.', starting and ending alphanumeric{where}",
                     K8S_CONTENT + " IsLabelValue (meta/v1/validation ValidateLabels)")


def _annotations(annotations: Any, at: str, where: str) -> Iterator[Problem]:
    # apimachinery pkg/api/validation/objectmeta.go ValidateAnnotations: keys are qualified names
    # (compared lower-cased); all keys and values together at most 256 KiB.
    ann = _dict(annotations)
    for key in ann:
        if not is_qualified_name(key.lower()):
            yield _p(_ann_key(at, key), f"annotation key {key!r} is not a qualified name{where}",
                     K8S_OBJECTMETA + " ValidateAnnotations")
    size = sum(_blen(k) + _blen(v if isinstance(v, str) else str(v)) for k, v in ann.items())
    if size > ANNOTATIONS_SIZE_LIMIT:
        yield _p(at, f"annotations total {size} bytes, more than Kubernetes' limit of {ANNOTATIONS_SIZE_LIMIT} "
                 f"(256 KiB){where}: store less in annotations (e.g. a shorter manifest)",
                 K8S_OBJECTMETA + " ValidateAnnotationsSize")


def _metadata(meta: Any, at: str, where: str = "") -> Iterator[Problem]:
    meta = _dict(meta)
    yield from _labels(meta.get("labels"), f"{at}.labels", where)
    yield from _annotations(meta.get("annotations"), f"{at}.annotations", where)


# =========================================================================================
# Serving: Service
# =========================================================================================

def service_problems(svc: dict, config: ClusterConfig = ClusterConfig()) -> list[Problem]:
    """What Knative Serving (and Kubernetes, for what Knative creates from it) would refuse in a
    serving.knative.dev/v1 Service; serving pkg/apis/serving/v1/service_validation.go
    Service.Validate, with the defaults of *_defaults.go applied first as the webhook does."""
    meta = _dict(svc.get("metadata"))
    spec = _dict(svc.get("spec"))
    template = _dict(spec.get("template"))
    tmeta = _dict(template.get("metadata"))
    name = meta.get("name") or ""
    ann, tann = _dict(meta.get("annotations")), _dict(tmeta.get("annotations"))
    out: list[Problem] = []
    out += _object_name(meta)
    out += _rollout_duration(ann, "metadata.annotations")
    out += _no_autoscaling_annotations(ann, "metadata.annotations")
    out += _metadata(meta, "metadata")
    # The template: serving pkg/apis/serving/v1/revision_validation.go RevisionTemplateSpec.Validate
    out += _revision_name(name, tmeta)
    out += _autoscaling_annotations(tann, "spec.template.metadata.annotations", config)
    out += _networking_annotations(tann, "spec.template.metadata.annotations")
    out += _queue_sidecar_annotations(tann, "spec.template.metadata.annotations")
    out += _progress_deadline(tann, "spec.template.metadata.annotations")
    out += _metadata(tmeta, "spec.template.metadata", " (the Revision Knative creates from the template "
                     "would be refused)")
    rspec = _dict(template.get("spec"))
    out += _timeout_seconds(rspec, config)
    out += _container_concurrency(rspec, config)
    out += _pod_spec(rspec, config, "spec.template.spec")
    out += _deployment_pod(rspec, config, "spec.template.spec")
    out += _knative_volumes(rspec, tann, config, "spec.template.spec")
    out += _traffic(spec.get("traffic"), name, config)
    return out


def _object_name(meta: dict) -> Iterator[Problem]:
    # knative/pkg apis/metadata_validation.go ValidateObjectMetadata (called by serving
    # metadata_validation.go ValidateObjectMetadata): the name is a DNS-1035 label
    # (NameIsDNS1035Label). The Route also creates a Kubernetes Service of this very name
    # (route/resources/service.go MakeK8sPlaceholderService), whose names are DNS-1035 labels too
    # (Kubernetes ValidateServiceName).
    name, generate = meta.get("name") or "", meta.get("generateName") or ""
    if generate and not is_dns1035_label(_mask_trailing_dash(generate)):
        yield _p("metadata.generateName", f"not a DNS 1035 label prefix: {generate!r}", PKG_METADATA)
    elif name and not is_dns1035_label(name):
        yield _p("metadata.name", f"not a DNS 1035 label: {name!r} -- a Knative Service name must start with a "
                 f"letter, hold only lowercase letters, digits and '-', end alphanumeric and be at most 63 "
                 f"characters (it has {_blen(name)}); Knative also names a Kubernetes Service after it. "
                 "Rename the model",
                 PKG_METADATA + " ValidateObjectMetadata; " + ROUTE_SERVICE + " MakeK8sPlaceholderService")
    if not name and not generate:
        yield _p("metadata.name", "name or generateName is required", PKG_METADATA + " ValidateObjectMetadata")


def _rollout_duration(ann: dict, at: str) -> Iterator[Problem]:
    # serving pkg/apis/serving/metadata_validation.go ValidateRolloutDurationAnnotation
    # (keys serving.knative.dev/rollout-duration, then rolloutDuration; register.go)
    yield from _duration_annotation(ann, at, ("serving.knative.dev/rollout-duration",
                                              "serving.knative.dev/rolloutDuration"), "rollout-duration",
                                    METADATA_VALIDATION + " ValidateRolloutDurationAnnotation")


def _progress_deadline(ann: dict, at: str) -> Iterator[Problem]:
    # serving pkg/apis/serving/v1/revision_validation.go validateProgressDeadlineAnnotation
    yield from _duration_annotation(ann, at, ("serving.knative.dev/progress-deadline",), "progress-deadline",
                                    REVISION_VALIDATION + " validateProgressDeadlineAnnotation")


def _duration_annotation(ann: dict, at: str, keys: tuple, what: str, source: str) -> Iterator[Problem]:
    key, value = _get_priority(ann, keys)
    if not value:
        return
    ns = go_duration_ns(value)
    if ns is None:
        yield _p(_ann_key(at, key), f"invalid value: {value} -- not a duration such as 90s or 5m", source)
    elif ns % _SECOND_NS:
        yield _p(_ann_key(at, key), f"{what}={value} is not at second precision", source)
    elif ns < 0:
        yield _p(_ann_key(at, key), f"{what}={value} must be positive", source)


def _no_autoscaling_annotations(ann: dict, at: str) -> Iterator[Problem]:
    # serving pkg/apis/serving/metadata_validation.go ValidateHasNoAutoscalingAnnotation: on the
    # Service itself (not its template) no key may start with "autoscaling.knative.dev".
    for key in ann:
        if key.startswith("autoscaling.knative.dev"):
            yield _p(_ann_key(at, key), 'autoscaling annotations must be put under '
                     '"spec.template.metadata.annotations" to work', METADATA_VALIDATION +
                     " ValidateHasNoAutoscalingAnnotation")


def _revision_name(service: str, tmeta: dict) -> Iterator[Problem]:
    # serving pkg/apis/serving/v1/revision_validation.go validateRevisionName: a DNS-1035 label
    # (NameIsDNS1035Label: at most 63, starts with a letter); then it must start with the
    # Service's name and '-'. Knative reports the first failure only.
    source = REVISION_VALIDATION + " validateRevisionName"
    name, generate = tmeta.get("name") or "", tmeta.get("generateName") or ""
    if generate and not is_dns1035_label(_mask_trailing_dash(generate)):
        yield _p("spec.template.metadata.generateName", f"not a DNS 1035 label prefix: {generate!r}", source)
        return
    if not name:
        return
    if not is_dns1035_label(name):
        yield _p("spec.template.metadata.name", f"not a DNS 1035 label: {name!r} -- a revision name must start with "
                 f"a letter, hold only lowercase letters, digits and '-', and be at most 63 characters (it has "
                 f"{_blen(name)}): shorten the model name or the version", source)
    elif not name.startswith(service + "-"):
        yield _p("spec.template.metadata.name", f"invalid value: {name!r} must have prefix {service + '-'!r}", source)


# -- autoscaling annotations: serving pkg/apis/autoscaling/annotation_validation.go -----------

_AUTOSCALING = "autoscaling.knative.dev"
KPA = "kpa.autoscaling.knative.dev"
HPA = "hpa.autoscaling.knative.dev"
_WINDOW_MIN_NS, _WINDOW_MAX_NS = 6 * _SECOND_NS, 3600 * _SECOND_NS  # autoscaling/register.go WindowMin/Max
_A = _AUTOSCALING + "/"
# autoscaling/register.go: each annotation and its older spellings, first found wins (kmap.KeyPriority)
CLASS_KEYS = (_A + "class",)
MIN_SCALE_KEYS = (_A + "min-scale", _A + "minScale")
MAX_SCALE_KEYS = (_A + "max-scale", _A + "maxScale")
INITIAL_SCALE_KEYS = (_A + "initial-scale", _A + "initialScale")
ACTIVATION_SCALE_KEYS = (_A + "activation-scale",)
METRIC_KEYS = (_A + "metric",)
TARGET_KEYS = (_A + "target",)
TARGET_UTILIZATION_KEYS = (_A + "target-utilization-percentage", _A + "targetUtilizationPercentage")
TARGET_BURST_KEYS = (_A + "target-burst-capacity", _A + "targetBurstCapacity")
PANIC_WINDOW_KEYS = (_A + "panic-window-percentage", _A + "panicWindowPercentage")
PANIC_THRESHOLD_KEYS = (_A + "panic-threshold-percentage", _A + "panicThresholdPercentage")
WINDOW_KEYS = (_A + "window",)
RETENTION_KEYS = (_A + "scale-to-zero-pod-retention-period", _A + "scaleToZeroPodRetentionPeriod")
SCALE_DOWN_DELAY_KEYS = (_A + "scale-down-delay", _A + "scaleDownDelay")
ALGORITHM_KEYS = (_A + "metric-aggregation-algorithm", _A + "metricAggregationAlgorithm")


def _get_priority(ann: dict, keys: tuple) -> tuple[str, Optional[str]]:
    """knative/pkg kmap KeyPriority.Get: the first of `keys` present."""
    for key in keys:
        if key in ann:
            value = ann[key]
            return key, value if isinstance(value, str) else str(value)
    return keys[0], None


def _autoscaling_annotations(ann: dict, at: str, config: ClusterConfig) -> Iterator[Problem]:
    """serving pkg/apis/autoscaling/annotation_validation.go ValidateAnnotations."""
    yield from _validate_class(ann, at)
    yield from _validate_min_max_scale(ann, at, config)
    yield from _validate_floats(ann, at)
    yield from _validate_window(ann, at)
    yield from _validate_last_pod_retention(ann, at)
    yield from _validate_scale_down_delay(ann, at)
    yield from _validate_metric(ann, at, config)
    yield from _validate_algorithm(ann, at)
    yield from _validate_initial_scale(ann, at, config)


def _validate_class(ann: dict, at: str) -> Iterator[Problem]:
    # validateClass: a class ending in ".knative.dev" must be the KPA or the HPA.
    key, value = _get_priority(ann, CLASS_KEYS)
    if value is not None and value.endswith(".knative.dev") and value not in (KPA, HPA):
        yield _p(_ann_key(at, key), f"invalid value: {value} -- Knative's autoscaler classes are {KPA} and {HPA}",
                 AUTOSCALING + " validateClass")


def _int_ge0(ann: dict, keys: tuple, at: str) -> tuple[int, Optional[Problem]]:
    # getIntGE0: strconv.ParseInt(v, 10, 32), >= 0.
    key, value = _get_priority(ann, keys)
    if value is None:
        return 0, None
    number, err = go_parse_int(value, 32)
    if err == "range" or (number is not None and number < 0):
        return 0, _p(_ann_key(at, key), f"expected 0 <= {value} <= 2147483647: a whole number of replicas",
                     AUTOSCALING + " getIntGE0")
    if err:
        return 0, _p(_ann_key(at, key), f"invalid value: {value} -- expected a whole number of replicas",
                     AUTOSCALING + " getIntGE0")
    return number, None


def _validate_min_max_scale(ann: dict, at: str, config: ClusterConfig) -> Iterator[Problem]:
    # validateMinMaxScale: min and max are int32 >= 0; max (unless 0, unlimited) >= min; max within
    # config-autoscaler max-scale-limit (validateMaxScaleWithinLimit); activation-scale within them.
    low, problem = _int_ge0(ann, MIN_SCALE_KEYS, at)
    if problem:
        yield problem
    high, problem = _int_ge0(ann, MAX_SCALE_KEYS, at)
    if problem:
        yield problem
    max_key, max_value = _get_priority(ann, MAX_SCALE_KEYS)
    if high != 0 and high < low:
        yield _p(_ann_key(at, max_key), f"max-scale={high} is less than min-scale={low}",
                 AUTOSCALING + " validateMinMaxScale")
    if max_value is not None and config.max_scale_limit:
        if high > config.max_scale_limit:
            yield _p(_ann_key(at, max_key), f"expected 1 <= {high} <= {config.max_scale_limit}: the cluster's "
                     "config-autoscaler max-scale-limit", AUTOSCALING + " validateMaxScaleWithinLimit")
        if high == 0:
            yield _p(_ann_key(at, max_key), f"max-scale=0 (unlimited), must be less than {config.max_scale_limit} "
                     "(config-autoscaler max-scale-limit)", AUTOSCALING + " validateMaxScaleWithinLimit")
    key, value = _get_priority(ann, ACTIVATION_SCALE_KEYS)
    if value is not None:
        nz, err = go_parse_int(value, 32)
        source = AUTOSCALING + " validateMinMaxScale"
        if err:
            yield _p(_ann_key(at, key), f"invalid value: {value}", source)
        elif low > nz:
            yield _p(_ann_key(at, key), f"min-scale={low} is greater than activation-scale={nz}", source)
        elif high < nz and high != 0:
            yield _p(_ann_key(at, key), f"max-scale={high} is less than activation-scale={nz}", source)
        elif nz < 2:
            yield _p(_ann_key(at, key), f"activation-scale={nz} must be greater than 1", source)


def _validate_floats(ann: dict, at: str) -> Iterator[Problem]:
    # validateFloats: panic-window-percentage in [1, 100], panic-threshold-percentage in
    # [110, 1000], target >= 0.01 (TargetMin), target-utilization-percentage in [1, 100],
    # target-burst-capacity >= 0 or exactly -1; each a Go float (strconv.ParseFloat).
    source = AUTOSCALING + " validateFloats"
    for keys, low, high in ((PANIC_WINDOW_KEYS, 1.0, 100.0), (PANIC_THRESHOLD_KEYS, 110.0, 1000.0),
                            (TARGET_UTILIZATION_KEYS, 1.0, 100.0)):
        key, value = _get_priority(ann, keys)
        if value is None:
            continue
        number = go_parse_float(value)
        if number is None:
            yield _p(_ann_key(at, key), f"invalid value: {value} -- not a number", source)
        elif number < low or number > high:
            yield _p(_ann_key(at, key), f"expected {low:g} <= {value} <= {high:g}", source)
    key, value = _get_priority(ann, TARGET_KEYS)
    if value is not None:
        number = go_parse_float(value)
        if number is None:
            yield _p(_ann_key(at, key), f"invalid value: {value} -- not a number", source)
        elif number < 0.01:
            yield _p(_ann_key(at, key), f"target {value} should be at least 0.01 (in-flight requests per replica)",
                     source)
    key, value = _get_priority(ann, TARGET_BURST_KEYS)
    if value is not None:
        number = go_parse_float(value)
        if number is None or (number < 0 and number != -1):
            yield _p(_ann_key(at, key), f"invalid value: {value} -- expected a number >= 0, or -1 (unlimited)", source)


def _validate_window(ann: dict, at: str) -> Iterator[Problem]:
    # validateWindow: a duration in [6s, 1h], whole seconds.
    key, value = _get_priority(ann, WINDOW_KEYS)
    if value is None:
        return
    ns = go_duration_ns(value)
    source = AUTOSCALING + " validateWindow"
    if ns is None:
        yield _p(_ann_key(at, key), f"invalid value: {value} -- not a duration such as 60s", source)
    elif not _WINDOW_MIN_NS <= ns <= _WINDOW_MAX_NS:
        yield _p(_ann_key(at, key), f"expected 6s <= {value} <= 1h0m0s", source)
    elif ns % _SECOND_NS:
        yield _p(_ann_key(at, key), "must be specified with at most second precision", source)


def _validate_last_pod_retention(ann: dict, at: str) -> Iterator[Problem]:
    # validateLastPodRetention: scale-to-zero-pod-retention-period is a duration in [0, 1h].
    key, value = _get_priority(ann, RETENTION_KEYS)
    if value is None:
        return
    ns = go_duration_ns(value)
    source = AUTOSCALING + " validateLastPodRetention"
    if ns is None:
        yield _p(_ann_key(at, key), f"invalid value: {value} -- not a duration such as 60s or 5m", source)
    elif not 0 <= ns <= _WINDOW_MAX_NS:
        yield _p(_ann_key(at, key), f"expected 0s <= {value} <= 1h0m0s: Knative keeps an idle last replica at most "
                 "an hour (its longest window)", source)


def _validate_scale_down_delay(ann: dict, at: str) -> Iterator[Problem]:
    # validateScaleDownDelay: a duration in [0, 1h], whole seconds.
    key, value = _get_priority(ann, SCALE_DOWN_DELAY_KEYS)
    if value is None:
        return
    ns = go_duration_ns(value)
    source = AUTOSCALING + " validateScaleDownDelay"
    if ns is None:
        yield _p(_ann_key(at, key), f"invalid value: {value} -- not a duration such as 60s", source)
    elif not 0 <= ns <= _WINDOW_MAX_NS:
        yield _p(_ann_key(at, key), f"expected 0s <= {value} <= 1h0m0s", source)
    elif ns % _SECOND_NS:
        yield _p(_ann_key(at, key), "must be specified with at most second precision", source)


def _validate_metric(ann: dict, at: str, config: ClusterConfig) -> Iterator[Problem]:
    # validateMetric: with the KPA (the annotation's class, else config-autoscaler
    # pod-autoscaler-class) the metric is "concurrency" or "rps"; with the HPA anything but "";
    # other classes are not checked.
    key, metric = _get_priority(ann, METRIC_KEYS)
    if metric is None:
        return
    _, cls = _get_priority(ann, CLASS_KEYS)
    cls = config.pod_autoscaler_class if cls is None else cls
    if (cls == KPA and metric not in ("concurrency", "rps")) or (cls == HPA and metric == ""):
        yield _p(_ann_key(at, key), f"invalid value: {metric} -- the {'KPA' if cls == KPA else 'HPA'} scales on "
                 f"{'concurrency or rps' if cls == KPA else 'a named metric (cpu, memory, ...)'}",
                 AUTOSCALING + " validateMetric")


def _validate_algorithm(ann: dict, at: str) -> Iterator[Problem]:
    # validateAlgorithm: only when the class annotation is the KPA: linear, weighted-exponential
    # (or weightedExponential).
    _, cls = _get_priority(ann, CLASS_KEYS)
    key, value = _get_priority(ann, ALGORITHM_KEYS)
    if cls == KPA and value and value not in ("linear", "weighted-exponential", "weightedExponential"):
        yield _p(_ann_key(at, key), f"invalid value: {value} -- linear or weighted-exponential",
                 AUTOSCALING + " validateAlgorithm")


def _validate_initial_scale(ann: dict, at: str, config: ClusterConfig) -> Iterator[Problem]:
    # validateInitialScale: strconv.Atoi, >= 0, and 0 only with config-autoscaler
    # allow-zero-initial-scale.
    key, value = _get_priority(ann, INITIAL_SCALE_KEYS)
    if value is None:
        return
    number, err = go_parse_int(value, 64)
    source = AUTOSCALING + " validateInitialScale"
    if err:
        yield _p(_ann_key(at, key), f"invalid value: {value} -- expected a whole number of replicas", source)
    elif number < 0:
        yield _p(_ann_key(at, key), f"invalid value: {value}: {key} must be greater than 0", source)
    elif number == 0 and not config.allow_zero_initial_scale:
        yield _p(_ann_key(at, key), f"invalid value: {value}: {key}=0 not allowed by cluster "
                 "(config-autoscaler allow-zero-initial-scale is false)", source)


# -- other template annotations -----------------------------------------------------------

_NETWORKING_ALLOWED = {  # knative/networking pkg/apis/networking/metadata_validation.go allowedAnnotations
    "networking.knative.dev/ingress.class", "networking.knative.dev/certificate.class",
    "networking.knative.dev/disableAutoTLS", "networking.knative.dev/disable-external-domain-tls",
    "networking.knative.dev/httpOption", "networking.knative.dev/ingress-class",
    "networking.knative.dev/certificate-class", "networking.knative.dev/disable-auto-tls",
    "networking.knative.dev/http-protocol",
}


VISIBILITY = "networking.knative.dev/visibility"  # knative/networking VisibilityLabelKey


def _networking_annotations(ann: dict, at: str) -> Iterator[Problem]:
    # knative/networking pkg/apis/networking/metadata_validation.go ValidateAnnotations (called by
    # RevisionTemplateSpec.Validate): keys starting "networking.knative.dev" must be known ones.
    # (The visibility *label* networking.knative.dev/visibility is refused as an annotation.)
    for key in ann:
        if key.startswith("networking.knative.dev") and key not in _NETWORKING_ALLOWED:
            yield _p(_ann_key(at, key), f"invalid key name {key!r}: not an annotation Knative knows"
                     + (" (visibility is a label of the Service, not an annotation)" if key == VISIBILITY else ""),
                     NETWORKING_ANNOTATIONS + " ValidateAnnotations")


_QP = "queue.sidecar.serving.knative.dev/"


def _queue_sidecar_annotations(ann: dict, at: str) -> Iterator[Problem]:
    # serving pkg/apis/serving/v1/revision_validation.go validateQueueSidecarResourceAnnotations:
    # resource-percentage (deprecated, a warning) is a float in [0.1, 100]; the explicit queue-proxy
    # resources are Kubernetes quantities.
    source = REVISION_VALIDATION + " validateQueueSidecarResourceAnnotations"
    key, value = _get_priority(ann, (_QP + "resource-percentage", _QP + "resourcePercentage"))
    if value is not None:
        number = go_parse_float(value)
        if number is None:
            yield _p(_ann_key(at, key), f"invalid value: {value}", source)
        elif not 0.1 <= number <= 100:
            yield _p(_ann_key(at, key), f"expected 0.1 <= {value} <= 100", source)
    for suffix in ("cpu-resource-request", "cpu-resource-limit", "memory-resource-request", "memory-resource-limit",
                   "ephemeral-storage-resource-request", "ephemeral-storage-resource-limit"):
        value = ann.get(_QP + suffix)
        if value is not None and parse_quantity(value) is None:
            yield _p(_ann_key(at, _QP + suffix), f"invalid value: {value} -- not a Kubernetes quantity", source)


# -- the revision spec --------------------------------------------------------------------

def _timeout_seconds(spec: dict, config: ClusterConfig) -> Iterator[Problem]:
    # serving pkg/apis/serving/v1/revision_validation.go validateTimeoutSeconds: after defaulting
    # (0 or unset becomes config-defaults revision-timeout-seconds), 0 <= t <= max-revision-timeout-seconds.
    value = spec.get("timeoutSeconds")
    if isinstance(value, bool) or not isinstance(value, int) or value == 0:
        return
    if value < 0 or value > config.max_revision_timeout_seconds:
        yield _p("spec.template.spec.timeoutSeconds", f"expected 0 <= {value} <= "
                 f"{config.max_revision_timeout_seconds}: the revision timeout is out of bounds for this cluster "
                 "(config-defaults max-revision-timeout-seconds)", REVISION_VALIDATION + " validateTimeoutSeconds")


def _container_concurrency(spec: dict, config: ClusterConfig) -> Iterator[Problem]:
    # serving pkg/apis/serving/metadata_validation.go ValidateContainerConcurrency: from 0 (1 when
    # config-defaults allow-container-concurrency-zero is false) to container-concurrency-max-limit.
    value = spec.get("containerConcurrency")
    if isinstance(value, bool) or not isinstance(value, int):
        return
    low = 0 if config.allow_container_concurrency_zero else 1
    if not low <= value <= config.container_concurrency_max_limit:
        yield _p("spec.template.spec.containerConcurrency", f"expected {low} <= {value} <= "
                 f"{config.container_concurrency_max_limit}: requests one replica takes at once "
                 "(config-defaults container-concurrency-max-limit)",
                 METADATA_VALIDATION + " ValidateContainerConcurrency")


# serving pkg/apis/serving/fieldmask.go PodSpecMask (+ the RevisionSpec's own fields, types.go)
_REVISION_FIELDS = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
_PODSPEC_ALWAYS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks"}
_PODSPEC_FEATURES = {  # field -> config-features key (features.go), let through when not Disabled
    "affinity": "kubernetes.podspec-affinity",
    "topologySpreadConstraints": "kubernetes.podspec-topologyspreadconstraints",
    "hostAliases": "kubernetes.podspec-hostaliases",
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "tolerations": "kubernetes.podspec-tolerations",
    "shareProcessNamespace": "kubernetes.podspec-shareprocessnamespace",
    "priorityClassName": "kubernetes.podspec-priorityclassname",
    "schedulerName": "kubernetes.podspec-schedulername",
    "dnsPolicy": "kubernetes.podspec-dnspolicy",
    "dnsConfig": "kubernetes.podspec-dnsconfig",
    "hostIPC": "kubernetes.podspec-hostipc",
    "hostPID": "kubernetes.podspec-hostpid",
    "hostNetwork": "kubernetes.podspec-hostnetwork",
}
# k8s.io/api core/v1 PodSpec (v0.35), and which of its fields are Go values (not pointers)
_PODSPEC_KNOWN = {
    "volumes", "initContainers", "containers", "ephemeralContainers", "restartPolicy", "terminationGracePeriodSeconds",
    "activeDeadlineSeconds", "dnsPolicy", "nodeSelector", "serviceAccountName", "serviceAccount",
    "automountServiceAccountToken", "nodeName", "hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace",
    "securityContext", "imagePullSecrets", "hostname", "subdomain", "affinity", "schedulerName", "tolerations",
    "hostAliases", "priorityClassName", "priority", "dnsConfig", "readinessGates", "runtimeClassName",
    "enableServiceLinks", "preemptionPolicy", "overhead", "topologySpreadConstraints", "setHostnameAsFQDN", "os",
    "hostUsers", "schedulingGates", "resourceClaims", "resources", "hostnameOverride", "workloadRef",
}
_PODSPEC_VALUES = {"restartPolicy", "dnsPolicy", "serviceAccountName", "serviceAccount", "nodeName", "hostNetwork",
                   "hostPID", "hostIPC", "hostname", "subdomain", "schedulerName", "priorityClassName"}
_CONTAINER_ALLOWED = {  # fieldmask.go ContainerMask
    "name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy", "livenessProbe", "ports",
    "readinessProbe", "resources", "securityContext", "startupProbe", "terminationMessagePath",
    "terminationMessagePolicy", "volumeMounts"}
_CONTAINER_KNOWN = _CONTAINER_ALLOWED | {  # k8s.io/api core/v1 Container
    "resizePolicy", "restartPolicy", "restartPolicyRules", "volumeDevices", "lifecycle", "stdin", "stdinOnce", "tty"}
_CONTAINER_VALUES = {"name", "image", "workingDir", "terminationMessagePath", "terminationMessagePolicy",
                     "imagePullPolicy", "stdin", "stdinOnce", "tty"}
_SECURITY_CONTEXT_ALLOWED = {  # fieldmask.go SecurityContextMask (privileged: only false)
    "capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot", "allowPrivilegeEscalation",
    "seccompProfile"}
_SECURITY_CONTEXT_KNOWN = _SECURITY_CONTEXT_ALLOWED | {
    "privileged", "seLinuxOptions", "windowsOptions", "procMount", "appArmorProfile"}
_POD_SECURITY_CONTEXT_ALLOWED = {  # fieldmask.go PodSecurityContextMask, with kubernetes.podspec-securitycontext
    "runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "supplementalGroups", "seccompProfile"}
_POD_SECURITY_CONTEXT_KNOWN = _POD_SECURITY_CONTEXT_ALLOWED | {
    "seLinuxOptions", "windowsOptions", "supplementalGroupsPolicy", "sysctls", "fsGroupChangePolicy",
    "appArmorProfile", "seLinuxChangePolicy"}
_VOLUME_MOUNT_ALLOWED = {"name", "readOnly", "mountPath", "subPath"}  # fieldmask.go VolumeMountMask
_VOLUME_MOUNT_KNOWN = _VOLUME_MOUNT_ALLOWED | {"recursiveReadOnly", "mountPropagation", "subPathExpr"}
_PORT_ALLOWED = {"containerPort", "name", "protocol"}  # fieldmask.go ContainerPortMask
_PROBE_ALLOWED = {"exec", "httpGet", "tcpSocket", "grpc", "initialDelaySeconds", "timeoutSeconds", "periodSeconds",
                  "successThreshold", "failureThreshold", "terminationGracePeriodSeconds"}  # ProbeMask + HandlerMask
_ENV_VAR_ALLOWED = {"name", "value", "valueFrom"}  # EnvVarMask
_RESOURCES_ALLOWED = {"limits", "requests"}  # ResourceRequirementsMask (claims refused)
_VOLUME_SOURCES = (  # k8s.io/api core/v1 VolumeSource
    "hostPath", "emptyDir", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "secret", "nfs", "iscsi",
    "glusterfs", "persistentVolumeClaim", "rbd", "flexVolume", "cinder", "cephfs", "flocker", "downwardAPI", "fc",
    "azureFile", "configMap", "vsphereVolume", "quobyte", "azureDisk", "photonPersistentDisk", "projected",
    "portworxVolume", "scaleIO", "storageos", "csi", "ephemeral", "image")

# serving pkg/apis/serving/k8s_validation.go
RESERVED_CONTAINER_NAMES = {"queue-proxy"}
RESERVED_ENV_VARS = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
RESERVED_SIDECAR_ENV_VARS = RESERVED_ENV_VARS - {"PORT"}
# networking.BackendHTTPPort, BackendHTTP2Port, QueueAdminPort, AutoscalingQueueMetricsPort,
# UserQueueMetricsPort (knative/networking pkg/apis/networking/register.go) and the profiling port
RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}
RESERVED_PATHS = {"/", "/dev", "/dev/log"}
VALID_PORT_NAMES = {"h2c", "http1", ""}
PODINFO_ANNOTATION = "features.knative.dev/queueproxy-podinfo"  # serving pkg/apis/config/features.go


def _flag(config: ClusterConfig, key: str) -> bool:
    return key in config.podspec_features


def _pod_spec(spec: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    """serving pkg/apis/serving/k8s_validation.go ValidatePodSpec."""
    # PodSpecMask (fieldmask.go), through CheckDisallowedFields.
    allowed = set(_PODSPEC_ALWAYS) | _REVISION_FIELDS
    allowed |= {f for f, key in _PODSPEC_FEATURES.items() if _flag(config, key)}
    if config.podspec_init_containers:
        allowed.add("initContainers")
    if config.podspec_securitycontext or config.secure_pod_defaults != "Disabled":
        allowed.add("securityContext")
    if spec.get("automountServiceAccountToken") is False:  # only false may be set
        allowed.add("automountServiceAccountToken")
    flags = {"securityContext": "kubernetes.podspec-securitycontext",
             "initContainers": "kubernetes.podspec-init-containers", **_PODSPEC_FEATURES}
    for problem in _disallowed(spec, allowed, at, FIELDMASK + " PodSpecMask", what="a revision's pod spec",
                               known=_PODSPEC_KNOWN | _REVISION_FIELDS, value_fields=_PODSPEC_VALUES):
        key = problem.field.rsplit(".", 1)[-1]
        if key in flags:
            problem = _p(problem.field, problem.message + f" unless config-features {flags[key]} is enabled",
                         problem.source)
        elif key == "automountServiceAccountToken":
            problem = _p(problem.field, problem.message + " (it may only be set to false)", problem.source)
        yield problem
    if "securityContext" in allowed:
        yield from _pod_security_context_mask(_dict(spec.get("securityContext")), config, f"{at}.securityContext")
    containers = [c if isinstance(c, dict) else {} for c in _list(spec.get("containers"))]
    inits = [c if isinstance(c, dict) else {} for c in _list(spec.get("initContainers"))]
    volumes = yield from _volumes(_list(spec.get("volumes")), inits + containers, config, f"{at}.volumes")
    if "initContainers" in allowed:
        yield from _init_containers(inits, containers, volumes, config, f"{at}.initContainers")
    port = yield from _containers_ports(containers, at)
    if not containers:
        yield _p(f"{at}.containers", "missing field(s): containers -- a revision needs a container",
                 K8S_VALIDATION + " ValidatePodSpec")
    elif len(containers) == 1:
        yield from _user_container(containers[0], volumes, port, config, f"{at}.containers[0]")
    else:
        yield from _multi_containers(containers, volumes, port, config, at)
    account = spec.get("serviceAccountName")
    if account and not is_dns1123_subdomain(account):
        yield _p(f"{at}.serviceAccountName", f"invalid value: {account} -- not a DNS-1123 subdomain",
                 K8S_VALIDATION + " ValidatePodSpec")


def _pod_security_context_mask(sc: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    # fieldmask.go PodSecurityContextMask and k8s_validation.go ValidatePodSecurityContext.
    allowed: set = set()
    if config.podspec_securitycontext:
        allowed |= _POD_SECURITY_CONTEXT_ALLOWED
    elif config.secure_pod_defaults in ("Enabled", "AllowRootBounded"):
        profile = _dict(sc.get("seccompProfile"))
        if set(profile) <= {"type"} and profile.get("type") in ("RuntimeDefault", "Unconfined"):
            allowed.add("seccompProfile")
    yield from _disallowed(sc, allowed, at, FIELDMASK + " PodSecurityContextMask", what="a revision's pod "
                           "securityContext", known=_POD_SECURITY_CONTEXT_KNOWN,
                           hint=" (config-features kubernetes.podspec-securitycontext)")
    yield from _id_bounds(sc, at, ("runAsUser", "runAsGroup", "fsGroup"),
                          K8S_VALIDATION + " ValidatePodSecurityContext")


def _id_bounds(sc: dict, at: str, keys: tuple, source: str) -> Iterator[Problem]:
    for key in keys:
        value = sc.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= 2**31 - 1:
            yield _p(f"{at}.{key}", f"expected 0 <= {value} <= 2147483647", source)


def _volumes(volumes: list, containers: list, config: ClusterConfig, at: str) -> Iterator[Problem]:
    """k8s_validation.go ValidateVolumes (returns the volumes by name)."""
    source = K8S_VALIDATION + " ValidateVolumes"
    mounted = {m.get("name") for c in containers for m in _list(c.get("volumeMounts")) if isinstance(m, dict)}
    by_name: dict = {}
    for i, v in enumerate(volumes):
        v = _dict(v)
        name = v.get("name") or ""
        if name in by_name:
            yield _p(f"{at}[{i}].name", f"duplicate volume name {name!r}", source)
        if name not in mounted:
            yield _p(f"{at}[{i}].name", f"volume with name {name!r} not mounted -- mount it in a container or remove "
                     "it", source)
        yield from _volume(v, config, f"{at}[{i}]")
        by_name[name] = v
    return by_name


def _volume(v: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    # k8s_validation.go validateVolume (+ fieldmask.go VolumeMask, VolumeSourceMask).
    source = K8S_VALIDATION + " validateVolume"
    name = v.get("name") or ""
    gates = {"emptyDir": ("kubernetes.podspec-volumes-emptydir", config.podspec_volumes_emptydir),
             "persistentVolumeClaim": ("kubernetes.podspec-persistent-volume-claim",
                                       config.podspec_persistent_volume_claim),
             "hostPath": ("kubernetes.podspec-volumes-hostpath", _flag(config, "kubernetes.podspec-volumes-hostpath")),
             "csi": ("kubernetes.podspec-volumes-csi", _flag(config, "kubernetes.podspec-volumes-csi")),
             "ephemeral": ("kubernetes.podspec-volumes-ephemeral",
                           _flag(config, "kubernetes.podspec-volumes-ephemeral")),
             "image": ("kubernetes.podspec-volumes-image", _flag(config, "kubernetes.podspec-volumes-image"))}
    specified = [k for k in ("secret", "configMap", "projected", "emptyDir", "persistentVolumeClaim", "hostPath",
                             "csi", "ephemeral", "image") if _is_set(v.get(k))]
    for key, (flag, on) in gates.items():
        if _is_set(v.get(key)) and not on:
            yield _p(f"{at}.{key}", f"{key} volume support is disabled, but found {key} volume {name} "
                     f"(config-features {flag})", source)
    for key in v:
        if key != "name" and key not in specified and _is_set(v[key]) and key not in gates:
            yield _p(f"{at}.{key}", f"must not set the field(s): {key} -- Knative allows secret, configMap, "
                     "projected and (behind flags) emptyDir, persistentVolumeClaim, hostPath, csi, ephemeral, image "
                     "volumes", FIELDMASK + " VolumeSourceMask")
    if not name:
        yield _p(f"{at}.name", "missing field(s): name", source)
    elif not is_dns1123_label(name):
        yield _p(f"{at}.name", f"invalid value: {name} -- a volume name is a DNS-1123 label", source)
    if not specified:
        yield _p(at, "expected exactly one, got neither: secret, configMap, projected"
                 + (", emptyDir" if config.podspec_volumes_emptydir else ""), source)
    elif len(specified) > 1:
        yield _p(at, f"expected exactly one, got both: {', '.join(specified)}", source)
    empty = v.get("emptyDir")
    if isinstance(empty, dict):
        if empty.get("medium") not in (None, "", "Memory"):
            yield _p(f"{at}.emptyDir.medium", f"invalid value: {empty['medium']} -- \"\" or \"Memory\"",
                     K8S_VALIDATION + " validateEmptyDirFields")
        if "sizeLimit" in empty and empty["sizeLimit"] is not None:
            size = parse_quantity(empty["sizeLimit"])
            if size is None or size < 0:
                yield _p(f"{at}.emptyDir.sizeLimit", f"invalid value: {empty['sizeLimit']}",
                         K8S_VALIDATION + " validateEmptyDirFields")
    claim = _dict(v.get("persistentVolumeClaim"))
    if claim and not claim.get("readOnly") and not config.podspec_persistent_volume_write:
        yield _p(f"{at}.persistentVolumeClaim", "Persistent volume write support is disabled, but found persistent "
                 f"volume claim {claim.get('claimName')} that is not read-only", K8S_VALIDATION +
                 " validatePersistentVolumeClaims")
    for key in ("secret", "configMap"):
        for j, item in enumerate(_list(_dict(v.get(key)).get("items"))):
            item = _dict(item)
            for part in ("key", "path"):
                if not item.get(part):
                    yield _p(f"{at}.{key}.items[{j}].{part}", f"missing field(s): {part}",
                             K8S_VALIDATION + " validateKeyToPath")


def _containers_ports(containers: list, at: str) -> Iterator[Problem]:
    """k8s_validation.go validateContainersPorts: one port across all containers (returns it)."""
    count, port = 0, {}
    for c in containers:
        ports = _list(c.get("ports"))
        if ports:
            count += len(ports)
            port = _dict(ports[0])
    port = {"name": port.get("name") or "http", "containerPort": port.get("containerPort") or 8080}
    if count == 0 and len(containers) > 1:
        yield _p(f"{at}.containers[*].ports", "missing field(s): ports -- with several containers, exactly one "
                 "(the one Knative routes requests to) declares its port", K8S_VALIDATION + " validateContainersPorts")
    elif count > 1:
        yield _p(f"{at}.containers[*].ports", "more than one container port is set: only a single port is allowed "
                 "across all containers (the serving container's)", K8S_VALIDATION + " validateContainersPorts")
    return port


def _multi_containers(containers: list, volumes: dict, port: dict, config: ClusterConfig,
                      at: str) -> Iterator[Problem]:
    # k8s_validation.go validateContainers: config-features multi-container; unique names; the
    # container with ports is the serving (user) container, the others sidecars.
    source = K8S_VALIDATION + " validateContainers"
    if not config.multi_container:
        yield _p(f"{at}.containers", f"multi-container is off, but found {len(containers)} containers "
                 "(config-features multi-container)", source)
        return
    names: set = set()
    for i, c in enumerate(containers):
        name = c.get("name") or ""
        if name in names:
            yield _p(f"{at}.containers[{i}].name", f"duplicate container name {name!r}", source)
        names.add(name)
        if _list(c.get("ports")):
            yield from _user_container(c, volumes, port, config, f"{at}.containers[{i}]")
        else:
            yield from _sidecar_container(c, volumes, config, f"{at}.containers[{i}]")


def _init_containers(inits: list, containers: list, volumes: dict, config: ClusterConfig,
                     at: str) -> Iterator[Problem]:
    # k8s_validation.go validateInitContainers / validateInitContainer: names unique against the
    # containers; no probes or lifecycle; reserved env as for sidecars.
    source = K8S_VALIDATION + " validateInitContainers"
    names = {c.get("name") for c in containers}
    for i, c in enumerate(inits):
        if c.get("name") in names:
            yield _p(f"{at}[{i}].name", f"duplicate container name {c.get('name')!r}", source)
        for key in ("livenessProbe", "readinessProbe", "startupProbe", "lifecycle"):
            if _is_set(c.get(key)):
                yield _p(f"{at}[{i}].{key}", "field not allowed in an init container",
                         K8S_VALIDATION + " validateInitContainer")
        yield from _container(c, volumes, config, f"{at}[{i}]", role="init")


def _user_container(c: dict, volumes: dict, port: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    # k8s_validation.go ValidateUserContainer: probes checked against the serving port, after
    # revision_defaults.go applyUserContainerDefaultReadinessProbe / applyReadinessProbeDefaults.
    for kind in ("livenessProbe", "startupProbe"):
        if isinstance(c.get(kind), dict):
            yield from _probe(c[kind], port, True, f"{at}.{kind}")
    readiness = c.get("readinessProbe")
    readiness = dict(readiness) if isinstance(readiness, dict) else {}
    if not any(_is_set(readiness.get(h)) for h in ("tcpSocket", "httpGet", "exec", "grpc")):
        readiness["tcpSocket"] = {}
    yield from _readiness_probe(_probe_defaults(readiness), port, True, f"{at}.readinessProbe")
    yield from _container(c, volumes, config, at, role="user")


def _sidecar_container(c: dict, volumes: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    # k8s_validation.go validateSidecarContainer: without config-features multi-container-probing
    # a sidecar has no probes at all (ProbeMask of an empty probe); with it, each probe must name
    # its port.
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(kind)
        if not isinstance(probe, dict):
            continue
        if not config.multi_container_probing:
            for key, value in probe.items():
                if _is_set(value, key not in _PROBE_HANDLERS):
                    yield _p(f"{at}.{kind}.{key}", f"must not set the field(s): {key} -- only the serving container "
                             "may have probes, unless config-features multi-container-probing is enabled",
                             K8S_VALIDATION + " validateSidecarContainer")
        elif kind == "readinessProbe":
            yield from _readiness_probe(_probe_defaults(probe), None, False, f"{at}.{kind}")
        else:
            yield from _probe(probe, None, False, f"{at}.{kind}")
    yield from _container(c, volumes, config, at, role="sidecar")


_PROBE_HANDLERS = ("httpGet", "tcpSocket", "exec", "grpc")


def _probe_defaults(probe: dict) -> dict:
    # revision_defaults.go applyReadinessProbeDefaults: successThreshold 0 -> 1; with a period,
    # failureThreshold 0 -> 3 and timeoutSeconds 0 -> 1.
    probe = dict(probe)
    if not probe.get("successThreshold"):
        probe["successThreshold"] = 1
    if probe.get("periodSeconds"):
        probe["failureThreshold"] = probe.get("failureThreshold") or 3
        probe["timeoutSeconds"] = probe.get("timeoutSeconds") or 1
    return probe


def _readiness_probe(p: dict, port: Optional[dict], user: bool, at: str) -> Iterator[Problem]:
    """k8s_validation.go validateReadinessProbe."""
    yield from _probe(p, port, user, at)
    source = K8S_VALIDATION + " validateReadinessProbe"
    period, delay = p.get("periodSeconds") or 0, p.get("initialDelaySeconds") or 0
    success, failure = p.get("successThreshold") or 0, p.get("failureThreshold") or 0
    timeout = p.get("timeoutSeconds") or 0
    if period < 0:
        yield _p(f"{at}.periodSeconds", f"expected 0 <= {period} <= 2147483647", source)
    if delay < 0:
        yield _p(f"{at}.initialDelaySeconds", f"expected 0 <= {delay} <= 2147483647", source)
    if success < 1:
        yield _p(f"{at}.successThreshold", f"expected 1 <= {success} <= 2147483647", source)
    if period == 0:
        if failure:
            yield _p(f"{at}.failureThreshold", "failureThreshold is disallowed when periodSeconds is zero", source)
        if timeout:
            yield _p(f"{at}.timeoutSeconds", "timeoutSeconds is disallowed when periodSeconds is zero", source)
    else:
        if timeout < 1:
            yield _p(f"{at}.timeoutSeconds", f"expected 1 <= {timeout} <= 2147483647", source)
        if failure < 1:
            yield _p(f"{at}.failureThreshold", f"expected 1 <= {failure} <= 2147483647", source)


def _probe(p: dict, port: Optional[dict], user: bool, at: str) -> Iterator[Problem]:
    """k8s_validation.go validateProbe: exactly one handler; a named probe port on the serving
    container must be the container port's name; a sidecar's probe must give its port."""
    source = K8S_VALIDATION + " validateProbe"
    yield from _disallowed(p, _PROBE_ALLOWED, at, FIELDMASK + " ProbeMask", what="a probe")
    handlers = [h for h in _PROBE_HANDLERS if _is_set(p.get(h))]
    for h in ("httpGet", "tcpSocket"):
        if h not in handlers:
            continue
        action = _dict(p[h])
        allowed = {"host", "path", "scheme", "httpHeaders", "port"} if h == "httpGet" else {"host", "port"}
        yield from _disallowed(action, allowed, f"{at}.{h}", FIELDMASK + (" HTTPGetActionMask" if h == "httpGet"
                                                                          else " TCPSocketActionMask"), what=h)
        value = action.get("port")
        if user:
            if isinstance(value, str) and value and value != (port or {}).get("name"):
                yield _p(f"{at}.{h}.port", f"invalid value: {value}: Probe port must match container port -- use the "
                         f"port's name {(port or {}).get('name')!r}, a number, or leave it out", source)
        elif value in (None, "", 0):
            yield _p(f"{at}.{h}.port", f"invalid value: {value or 0}: Probe port must be specified -- a sidecar's "
                     "probe names its own port", source)
    if not handlers:
        yield _p(at, "expected exactly one, got neither: httpGet, tcpSocket, exec, grpc", source)
    elif len(handlers) > 1:
        yield _p(at, f"expected exactly one, got both: {', '.join(handlers)}", source)


def _container(c: dict, volumes: dict, config: ClusterConfig, at: str, *, role: str) -> Iterator[Problem]:
    """k8s_validation.go validate (every container: user, sidecar or init)."""
    source = K8S_VALIDATION + " validate"
    if not c:
        yield _p(at, "missing field(s)", source)
        return
    yield from _disallowed(c, _CONTAINER_ALLOWED, at, FIELDMASK + " ContainerMask", what="a container",
                           known=_CONTAINER_KNOWN, value_fields=_CONTAINER_VALUES)
    name = c.get("name") or ""
    if name in RESERVED_CONTAINER_NAMES:
        yield _p(f"{at}.name", f"{name!r} is a reserved container name: Knative adds its own container of that name",
                 source)
    yield from _env(_list(c.get("env")), config, f"{at}.env", role)
    yield from _env_from(_list(c.get("envFrom")), f"{at}.envFrom")
    image = c.get("image")
    if not image:
        yield _p(f"{at}.image", "missing field(s): image", source)
    elif _image_reference_error(image):
        yield _p(f"{at}.image", f"Failed to parse image reference {image!r}: {_image_reference_error(image)}",
                 source + "; " + GGCR_NAME + " ParseReference")
    ports = _list(c.get("ports"))
    if role == "init":
        for j, port in enumerate(ports):
            yield from _container_port_basic(_dict(port), f"{at}.ports[{j}]")
    elif ports:
        yield from _container_ports(ports, f"{at}.ports")
    yield from _disallowed(_dict(c.get("resources")), _RESOURCES_ALLOWED, f"{at}.resources",
                           FIELDMASK + " ResourceRequirementsMask", what="a container's resources")
    yield from _security_context(_dict(c.get("securityContext")), config, f"{at}.securityContext")
    policy = c.get("terminationMessagePolicy")
    if policy not in (None, "", "File", "FallbackToLogsOnError"):
        yield _p(f"{at}.terminationMessagePolicy", f"invalid value: {policy}", source)
    yield from _volume_mounts(_list(c.get("volumeMounts")), volumes, config, f"{at}.volumeMounts")


def _env(env: list, config: ClusterConfig, at: str, role: str) -> Iterator[Problem]:
    # k8s_validation.go validateEnvVar: a name; not reserved (PORT is reserved for the serving
    # container only: sidecars and init containers may set it); valueFrom within EnvVarSourceMask
    # (fieldRef / resourceFieldRef only with config-features kubernetes.podspec-fieldref).
    reserved = RESERVED_ENV_VARS if role == "user" else RESERVED_SIDECAR_ENV_VARS
    for j, e in enumerate(env):
        e = _dict(e)
        yield from _disallowed(e, _ENV_VAR_ALLOWED, f"{at}[{j}]", FIELDMASK + " EnvVarMask", what="an env var")
        name = e.get("name") or ""
        if not name:
            yield _p(f"{at}[{j}].name", "missing field(s): name", K8S_VALIDATION + " validateEnvVar")
        elif name in reserved:
            yield _p(f"{at}[{j}].name", f"{name!r} is a reserved environment variable: Knative sets it"
                     + (" (only sidecars may set PORT)" if name == "PORT" else ""), K8S_VALIDATION + " validateEnvVar")
        source = e.get("valueFrom")
        if isinstance(source, dict):
            allowed = {"configMapKeyRef", "secretKeyRef"}
            if config.podspec_fieldref:
                allowed |= {"fieldRef", "resourceFieldRef"}
            yield from _disallowed(source, allowed, f"{at}[{j}].valueFrom", FIELDMASK + " EnvVarSourceMask",
                                   what="an env var's valueFrom",
                                   hint=" (fieldRef and resourceFieldRef need config-features "
                                   "kubernetes.podspec-fieldref)")


def _env_from(env_from: list, at: str) -> Iterator[Problem]:
    # k8s_validation.go validateEnvFrom: exactly one of configMapRef, secretRef.
    for j, e in enumerate(env_from):
        e = _dict(e)
        yield from _disallowed(e, {"prefix", "configMapRef", "secretRef"}, f"{at}[{j}]",
                               FIELDMASK + " EnvFromSourceMask", what="envFrom")
        refs = [k for k in ("configMapRef", "secretRef") if _is_set(e.get(k))]
        if len(refs) != 1:
            yield _p(f"{at}[{j}]", "expected exactly one, got " + ("both" if refs else "neither") +
                     ": configMapRef, secretRef", K8S_VALIDATION + " validateEnvFrom")


def _container_ports(ports: list, at: str) -> Iterator[Problem]:
    # k8s_validation.go validateContainerPorts: only the first port is checked (the others are
    # refused by validateContainersPorts): basic checks, TCP, name "", "http1" or "h2c".
    port = _dict(ports[0])
    yield from _container_port_basic(port, f"{at}[0]")
    protocol = port.get("protocol")
    if protocol not in (None, "", "TCP"):
        yield _p(f"{at}[0].protocol", f"invalid value: {protocol} -- Knative serves TCP only",
                 K8S_VALIDATION + " validateContainerPorts")
    if (port.get("name") or "") not in VALID_PORT_NAMES:
        yield _p(f"{at}[0].name", f"Port name {port.get('name')} is not allowed: Name must be empty, or one of: "
                 "'h2c', 'http1'", K8S_VALIDATION + " validateContainerPorts")


def _container_port_basic(port: dict, at: str) -> Iterator[Problem]:
    # k8s_validation.go validateContainerPortBasic: ContainerPortMask (no hostIP, hostPort);
    # not a port Knative's queue-proxy uses; 0..65535.
    source = K8S_VALIDATION + " validateContainerPortBasic"
    yield from _disallowed(port, _PORT_ALLOWED, at, FIELDMASK + " ContainerPortMask", what="a container port",
                           value_fields={"hostIP", "hostPort", "name", "protocol"})
    number = port.get("containerPort")
    if number in RESERVED_PORTS:
        yield _p(f"{at}.containerPort", f"invalid value: {number} is a reserved port, please use a different value "
                 "(Knative's queue-proxy listens on 8012, 8013, 8022, 9090, 9091 and 8008)", source)
    if isinstance(number, int) and not 0 <= number <= 65535:
        yield _p(f"{at}.containerPort", f"expected 0 <= {number} <= 65535", source)


def _security_context(sc: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    # k8s_validation.go validateSecurityContext: SecurityContextMask (privileged only false;
    # no seLinuxOptions, procMount, windowsOptions, appArmorProfile); CapabilitiesMask (drop
    # always; add only with config-features kubernetes.containerspec-addcapabilities, or exactly
    # [NET_BIND_SERVICE] with secure-pod-defaults); runAsUser and runAsGroup 0..2^31-1.
    if not sc:
        return
    allowed = set(_SECURITY_CONTEXT_ALLOWED)
    if sc.get("privileged") is False:
        allowed.add("privileged")
    for problem in _disallowed(sc, allowed, at, FIELDMASK + " SecurityContextMask",
                               what="a container's securityContext", known=_SECURITY_CONTEXT_KNOWN):
        if problem.field.endswith(".privileged"):
            problem = _p(problem.field, problem.message + " (privileged may only be set to false)", problem.source)
        yield problem
    caps = sc.get("capabilities")
    if isinstance(caps, dict):
        allowed_caps = {"drop"}
        if config.containerspec_addcapabilities:
            allowed_caps.add("add")
        elif config.secure_pod_defaults in ("Enabled", "AllowRootBounded") and caps.get("add") == ["NET_BIND_SERVICE"]:
            allowed_caps.add("add")
        yield from _disallowed(caps, allowed_caps, f"{at}.capabilities", FIELDMASK + " CapabilitiesMask",
                               what="securityContext.capabilities",
                               hint=" (adding capabilities needs config-features "
                               "kubernetes.containerspec-addcapabilities)")
    yield from _id_bounds(sc, at, ("runAsUser", "runAsGroup"), K8S_VALIDATION + " validateSecurityContext")


def _volume_mounts(mounts: list, volumes: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    """k8s_validation.go validateVolumeMounts (after revision_defaults.go, which marks mounts of
    volumes other than emptyDir, persistentVolumeClaim and ephemeral readOnly -- so its
    "should be readOnly" check cannot fail on a new revision)."""
    source = K8S_VALIDATION + " validateVolumeMounts"
    seen: set = set()
    for i, m in enumerate(mounts):
        m = _dict(m)
        allowed = set(_VOLUME_MOUNT_ALLOWED)
        if _flag(config, "kubernetes.podspec-volumes-mount-propagation"):
            allowed.add("mountPropagation")
        yield from _disallowed(m, allowed, f"{at}[{i}]", FIELDMASK + " VolumeMountMask", what="a volume mount",
                               known=_VOLUME_MOUNT_KNOWN, value_fields={"name", "mountPath", "subPath", "subPathExpr",
                                                                        "readOnly"})
        name = m.get("name")
        if name not in volumes:
            yield _p(f"{at}[{i}].name", f"volumeMount has no matching volume: {name!r} is not in the pod's volumes",
                     source)
        path = m.get("mountPath") or ""
        clean = _go_path_clean(path)
        if not path:
            yield _p(f"{at}[{i}].mountPath", "missing field(s): mountPath", source)
        elif clean in RESERVED_PATHS:
            yield _p(f"{at}[{i}].mountPath", f"mountPath {clean!r} is a reserved path", source)
        elif not path.startswith("/"):
            yield _p(f"{at}[{i}].mountPath", f"invalid value: {path} -- mount paths are absolute", source)
        elif clean in seen:
            yield _p(f"{at}[{i}].mountPath", f"invalid value: {path!r} must be unique", source)
        elif config.var_log_collection and clean == "/var/log":
            yield _p(f"{at}[{i}].mountPath", "/var/log is where Knative mounts its log volume in every container "
                     "(config-observability logging.enable-var-log-collection): the pod would mount it twice",
                     DEPLOY + " makePodSpec")
        seen.add(clean)
        propagation = m.get("mountPropagation")
        if propagation is not None and propagation not in ("None", "HostToContainer"):
            yield _p(f"{at}[{i}].mountPropagation", "mount propagation should be set to None or HostToContainer",
                     source)
        claim = _dict(_dict(volumes.get(name)).get("persistentVolumeClaim"))
        if claim.get("readOnly") and not m.get("readOnly"):
            yield _p(f"{at}[{i}].readOnly", "volume is readOnly but volume mount is not", source)


# -- image references: google/go-containerregistry pkg/name (ParseReference, WeakValidation) --

_TAG_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-.ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_REPOSITORY_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-./")
# url.Parse("//" + name).Host == name: host characters Go accepts, and an optional numeric port.
_REGISTRY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=\[\]<>\"%]*(:[0-9]*)?")


def _image_reference_error(image: str) -> Optional[str]:
    """Why go-containerregistry's name.ParseReference(image, WeakValidation), which the Serving
    webhook calls, refuses `image`; None when it parses (as a tag, or else as a digest)."""
    if not isinstance(image, str):
        return "not a string"
    tag_error = _tag_error(image)
    if tag_error is None:
        return None
    parts = image.split("@")
    if len(parts) != 2:
        return tag_error
    base, digest = parts
    if not re.fullmatch(r"sha256:[a-f0-9]{64}", digest):
        return f"unsupported or invalid digest {digest!r}"
    if _tag_error(base) is None:
        base = _split_tag(base)[0]
    return _repository_error(base)


def _split_tag(name: str) -> tuple[str, str]:
    parts = name.split(":")
    if len(parts) > 1 and "/" not in parts[-1]:
        return ":".join(parts[:-1]), parts[-1]
    return name, ""


def _tag_error(name: str) -> Optional[str]:
    base, tag = _split_tag(name)
    if tag and not (1 <= len(tag) <= 128 and set(tag) <= _TAG_CHARS):
        return f"tag {tag!r} may hold only letters, digits, '_', '-', '.' (at most 128)"
    return _repository_error(base)


def _repository_error(name: str) -> Optional[str]:
    if not name:
        return "a repository name must be specified"
    parts = name.split("/", 1)
    registry, repo = "", name
    if len(parts) == 2 and ("." in parts[0] or ":" in parts[0]):
        registry, repo = parts
    if not (2 <= len(repo) <= 255 and set(repo) <= _REPOSITORY_CHARS):
        return f"repository {repo!r} may hold only lowercase letters, digits, '_', '-', '.', '/' (2 to 255)"
    if not _REGISTRY.fullmatch(registry):
        return f"registry {registry!r} is not a valid host[:port]"
    return None


# -- what Kubernetes checks in the Deployment Knative creates, and its pods ---------------

def _deployment_pod(spec: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    # Knative's webhook does not check these, but the Deployment Knative creates for the revision
    # is refused by Kubernetes (pkg/apis/core/validation ValidatePodSpec), and its pods by Pod
    # Security Admission: the revision then never becomes ready.
    where = " (Kubernetes refuses the Deployment Knative creates for the revision)"
    containers = [_dict(c) for c in _list(spec.get("containers"))]
    inits = [_dict(c) for c in _list(spec.get("initContainers"))]
    for kind, group in (("containers", containers), ("initContainers", inits)):
        for i, c in enumerate(group):
            cat = f"{at}.{kind}[{i}]"
            name = c.get("name")
            if name and not is_dns1123_label(name):  # an empty name is defaulted by Knative
                yield _p(f"{cat}.name", f"invalid value: {name!r} -- a container name is a DNS-1123 label (lowercase "
                         f"letters, digits, '-'){where}", K8S_CORE + " validateContainers")
            yield from _k8s_env(_list(c.get("env")), f"{cat}.env", where, fieldref=config.podspec_fieldref)
            yield from _k8s_resources(_dict(c.get("resources")), f"{cat}.resources", where)
    yield from pod_security_problems(_secure_pod_defaults(spec, config), config, at, "the revision's pods")


def _knative_volumes(spec: dict, tann: dict, config: ClusterConfig, at: str) -> Iterator[Problem]:
    # serving pkg/reconciler/revision/resources/deploy.go makePodSpec adds volumes of its own to
    # the revision's pod, each only under a setting: pod-info (config-features
    # queueproxy.mount-podinfo Enabled, or Allowed and the revision annotated
    # features.knative.dev/queueproxy-podinfo: enabled), knative-token-volume (an audience in
    # config-deployment queue-sidecar-token-audiences), server-certs (config-network
    # system-internal-tls) and knative-var-log (config-observability
    # logging.enable-var-log-collection). Only then does a user volume of that name make two, and
    # Kubernetes refuse the Deployment (ValidateVolumes: "Duplicate value"); without the setting
    # the name is free (the real cluster creates the Deployment).
    added = {}
    podinfo = str(config.queueproxy_mount_podinfo).lower()
    if podinfo == "enabled" or (podinfo == "allowed" and str(tann.get(PODINFO_ANNOTATION, "")).lower() == "enabled"):
        added["pod-info"] = "config-features queueproxy.mount-podinfo"
    if any(config.queue_sidecar_token_audiences):
        added["knative-token-volume"] = "config-deployment queue-sidecar-token-audiences"
    if config.system_internal_tls:
        added["server-certs"] = "config-network system-internal-tls"
    if config.var_log_collection:
        added["knative-var-log"] = "config-observability logging.enable-var-log-collection"
    for i, v in enumerate(_list(spec.get("volumes"))):
        name = _dict(v).get("name")
        if name in added:
            yield _p(f"{at}.volumes[{i}].name", f"{name!r} is the name of the volume Knative adds to the revision's "
                     f"pod under {added[name]}: the Deployment would have two volumes of that name (Kubernetes "
                     "refuses it: Duplicate value). Choose another name",
                     DEPLOY + " makePodSpec; " + K8S_CORE + " ValidateVolumes")


def _secure_pod_defaults(spec: dict, config: ClusterConfig) -> dict:
    """serving pkg/apis/serving/v1/revision_defaults.go defaultSecurityContext: with
    config-features secure-pod-defaults Enabled or AllowRootBounded, Knative fills in each
    container's allowPrivilegeEscalation (false), seccompProfile (RuntimeDefault, unless the pod
    sets one), capabilities (drop ALL, add NET_BIND_SERVICE for a port below 1024) and, when
    Enabled, runAsNonRoot (true, unless the pod sets it)."""
    if config.secure_pod_defaults not in ("Enabled", "AllowRootBounded"):
        return spec
    spec = dict(spec)
    psc = _dict(spec.get("securityContext"))
    for kind in ("containers", "initContainers"):
        filled = []
        for c in _list(spec.get(kind)):
            c = dict(_dict(c))
            sc = dict(_dict(c.get("securityContext")))
            if sc.get("allowPrivilegeEscalation") is None:
                sc["allowPrivilegeEscalation"] = False
            if not _dict(psc.get("seccompProfile")).get("type"):
                profile = dict(_dict(sc.get("seccompProfile")))
                profile["type"] = profile.get("type") or "RuntimeDefault"
                sc["seccompProfile"] = profile
            if sc.get("capabilities") is None:
                low = any(isinstance(_dict(p).get("containerPort"), int) and _dict(p)["containerPort"] < 1024
                          for p in _list(c.get("ports")))
                sc["capabilities"] = {"drop": ["ALL"], **({"add": ["NET_BIND_SERVICE"]} if low else {})}
            if config.secure_pod_defaults == "Enabled" and psc.get("runAsNonRoot") is None \
                    and sc.get("runAsNonRoot") is None:
                sc["runAsNonRoot"] = True
            c["securityContext"] = sc
            filled.append(c)
        if kind in spec:
            spec[kind] = filled
    return spec


# -- traffic: serving pkg/apis/serving/v1/route_validation.go (in a Service's spec) ------------

def _traffic(traffic: Any, service: str, config: ClusterConfig) -> Iterator[Problem]:
    """route_validation.go validateTrafficList / TrafficTarget.Validate, in the Service's spec
    (a default configuration name; route_defaults.go fills an empty list with latest 100%), plus
    the Kubernetes Service each tag gets (route/resources/service.go MakeK8sPlaceholderService,
    named by config-network tag-template)."""
    traffic = _list(traffic)
    if not traffic:
        return
    source = ROUTE_VALIDATION
    total, tags = 0, {}
    for i, t in enumerate(traffic):
        t = _dict(t)
        at = f"spec.traffic[{i}]"
        revision, latest = t.get("revisionName") or "", t.get("latestRevision")
        # validateLatestRevision
        if latest is not None and bool(revision) == bool(latest):
            yield _p(f"{at}.latestRevision", f"may not set revisionName {revision!r} when latestRevision is "
                     f"{str(bool(latest)).lower()}", source + " validateLatestRevision")
        # validateRevisionAndConfiguration (HasDefaultConfigurationName)
        if t.get("configurationName"):
            yield _p(f"{at}.configurationName", "must not set the field(s): configurationName -- in a Service the "
                     "configuration is the Service's own", source + " validateRevisionAndConfiguration")
        elif revision and not is_qualified_name(revision):
            yield _p(f"{at}.revisionName", f"invalid key name {revision!r}: not a qualified name",
                     source + " validateRevisionAndConfiguration")
        # validateTrafficPercentage
        percent = t.get("percent")
        if isinstance(percent, int) and not isinstance(percent, bool):
            total += percent
            if not 0 <= percent <= 100:
                yield _p(f"{at}.percent", f"expected 0 <= {percent} <= 100", source + " validateTrafficPercentage")
        # validateURL
        if t.get("url"):
            yield _p(f"{at}.url", "must not set the field(s): url -- Knative fills it in the status",
                     source + " validateURL")
        tag = t.get("tag") or ""
        if not tag:
            continue
        if not is_dns1035_label(tag):
            yield _p(f"{at}.tag", f"invalid value: {tag!r}: not a DNS 1035 label -- a tag starts with a letter and "
                     "holds only lowercase letters, digits and '-'", source + " validateTrafficList")
        elif service:
            host = config.tag_template.replace("{{.Tag}}", tag).replace("{{.Name}}", service)
            if not is_dns1035_label(host):
                yield _p(f"{at}.tag", f"tag {tag!r} makes the Kubernetes Service {host!r} ({_blen(host)} characters): "
                         "Kubernetes Service names are DNS-1035 labels of at most 63 characters, so the route would "
                         "never become ready; use a shorter tag", ROUTE_SERVICE + " MakeK8sPlaceholderService; "
                         "knative/networking pkg/config/config.go DefaultTagTemplate")
        if tag in tags:
            yield _p(f"{at}.tag", f"Multiple definitions for {tag!r} (also spec.traffic[{tags[tag]}].tag)",
                     source + " validateTrafficList")
        else:
            tags[tag] = i
    if total != 100:
        yield _p("spec.traffic", f"Traffic targets sum to {total}, want 100", source + " validateTrafficList")


# =========================================================================================
# Kubernetes pod and Job checks (what a dry-run create, or a controller's create, refuses)
# =========================================================================================

_FIELDREF_PATHS = {"metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName", "spec.serviceAccountName",
                   "status.hostIP", "status.hostIPs", "status.podIP", "status.podIPs"}
_FIELDREF_SUBSCRIPT = re.compile(r"metadata\.(labels|annotations)\['(.*)'\]")
_RESOURCE_FIELDREF_PATHS = {"limits.cpu", "limits.memory", "limits.ephemeral-storage", "requests.cpu",
                            "requests.memory", "requests.ephemeral-storage"}


def _k8s_env(env: list, at: str, where: str, fieldref: bool = True) -> Iterator[Problem]:
    # kubernetes pkg/apis/core/validation ValidateEnv: names are IsRelaxedEnvVarName (Kubernetes
    # >= 1.34); valueFrom has exactly one source, not together with value; a fieldRef names a
    # path the downward API offers (validEnvDownwardAPIFieldPathExpressions, or a label or
    # annotation subscript).
    for j, e in enumerate(env):
        e = _dict(e)
        name = e.get("name") or ""
        if name and not is_relaxed_env_var_name(name):
            yield _p(f"{at}[{j}].name", f"invalid value: {name!r} -- a valid environment variable name must consist "
                     f"only of printable ASCII characters other than '='{where}", K8S_CORE + " ValidateEnv; "
                     + K8S_NAMES + " IsRelaxedEnvVarName")
        source = e.get("valueFrom")
        if not isinstance(source, dict):
            continue
        kinds = [k for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef", "fileKeyRef")
                 if _is_set(source.get(k))]
        if len(kinds) != 1:
            yield _p(f"{at}[{j}].valueFrom", "may not have more than one field specified at a time" if kinds else
                     f"must specify one of: fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef{where}",
                     K8S_CORE + " validateEnvVarValueFrom")
        elif e.get("value"):
            yield _p(f"{at}[{j}].valueFrom", f"may not be specified when `value` is not empty{where}",
                     K8S_CORE + " validateEnvVarValueFrom")
        ref = source.get("fieldRef")
        if fieldref and isinstance(ref, dict):
            path = ref.get("fieldPath") or ""
            sub = _FIELDREF_SUBSCRIPT.fullmatch(path)
            key = None if sub is None else (sub.group(2) if sub.group(1) == "labels" else sub.group(2).lower())
            ok = path in _FIELDREF_PATHS or (key is not None and is_qualified_name(key))
            if not ok:
                yield _p(f"{at}[{j}].valueFrom.fieldRef.fieldPath", f"Unsupported value: {path!r} -- the downward API "
                         "offers metadata.name, metadata.namespace, metadata.uid, metadata.labels['<key>'], "
                         "metadata.annotations['<key>'], spec.nodeName, spec.serviceAccountName, status.podIP, "
                         f"...{where}",
                         K8S_CORE + " validateObjectFieldSelector")
        rref = source.get("resourceFieldRef")
        if fieldref and isinstance(rref, dict) and rref.get("resource") not in _RESOURCE_FIELDREF_PATHS:
            yield _p(f"{at}[{j}].valueFrom.resourceFieldRef.resource", f"Unsupported value: {rref.get('resource')!r}"
                     f"{where}", K8S_CORE + " validateContainerResourceFieldSelector")


def _k8s_resources(resources: dict, at: str, where: str) -> Iterator[Problem]:
    # kubernetes pkg/apis/core/validation ValidateResourceRequirements: quantities parse, are not
    # negative, and a request is at most its limit.
    parsed: dict = {}
    for kind in ("requests", "limits"):
        for name, value in _dict(resources.get(kind)).items():
            q = parse_quantity(value)
            if q is None:
                yield _p(f"{at}.{kind}.{name}", f"quantities must match the regular expression "
                         f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {value!r}{where}",
                         K8S_QUANTITY + " ParseQuantity")
            elif q < 0:
                yield _p(f"{at}.{kind}.{name}", f"must be greater than or equal to 0: {value!r}{where}",
                         K8S_CORE + " ValidateResourceRequirements")
            else:
                parsed[(kind, name)] = q
    for (kind, name), request in parsed.items():
        limit = parsed.get(("limits", name))
        if kind == "requests" and limit is not None and request > limit:
            yield _p(f"{at}.requests.{name}", f"must be less than or equal to {name} limit of "
                     f"{_dict(resources.get('limits')).get(name)}{where}", K8S_CORE + " ValidateResourceRequirements")


# -- Pod Security Admission: kubernetes staging/src/k8s.io/pod-security-admission/policy ----

_PSA_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                      "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_PSA_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
_PSA_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                     "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                     "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                     "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"}


def pod_security_problems(pod: dict, config: ClusterConfig, at: str, what: str) -> Iterator[Problem]:
    """Pod Security Admission at the namespace's level (ClusterConfig.pod_security_level), as
    kubernetes pod-security-admission policy/check_*.go checks a pod spec ("latest" version).
    Knative's own queue-proxy container is compliant (serving pkg/reconciler/revision/resources/
    queue.go queueSecurityContext), so only the containers written here are checked."""
    level = config.pod_security_level
    if level not in ("baseline", "restricted"):
        return
    where = f" -- Pod Security ({level}) in this namespace refuses {what}"
    psc = _dict(pod.get("securityContext"))
    containers = [(f"{at}.{kind}[{i}]", _dict(c)) for kind in ("initContainers", "containers", "ephemeralContainers")
                  for i, c in enumerate(_list(pod.get(kind)))]
    src = K8S_PSA
    # baseline: check_hostNamespaces.go, check_privileged.go, check_capabilities_baseline.go,
    # check_hostPathVolumes.go, check_hostPorts.go, check_procMount.go, check_seccompProfile_baseline.go,
    # check_sysctls.go, check_seLinuxOptions.go, check_appArmorProfile.go
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key) is True:
            yield _p(f"{at}.{key}", f"{key}=true is not allowed{where}", src + "check_hostNamespaces.go")
    for i, v in enumerate(_list(pod.get("volumes"))):
        v = _dict(v)
        if _is_set(v.get("hostPath")):
            yield _p(f"{at}.volumes[{i}].hostPath", f"hostPath volumes are not allowed{where}",
                     src + "check_hostPathVolumes.go")
        elif level == "restricted":
            kinds = [k for k in _VOLUME_SOURCES if _is_set(v.get(k))]
            if any(k not in _PSA_RESTRICTED_VOLUMES for k in kinds):
                yield _p(f"{at}.volumes[{i}]", f"volume type {kinds[0]} is not allowed (configMap, csi, downwardAPI, "
                         f"emptyDir, ephemeral, persistentVolumeClaim, projected, secret){where}",
                         src + "check_restrictedVolumes.go")
    for i, sysctl in enumerate(_list(psc.get("sysctls"))):
        if _dict(sysctl).get("name") not in _PSA_SAFE_SYSCTLS:
            yield _p(f"{at}.securityContext.sysctls[{i}]", f"unsafe sysctl {_dict(sysctl).get('name')!r}{where}",
                     src + "check_sysctls.go")
    for sc_at, sc in [(f"{at}.securityContext", psc)] + [(f"{cat}.securityContext", _dict(c.get("securityContext")))
                                                       for cat, c in containers]:
        if _dict(sc.get("seccompProfile")).get("type") == "Unconfined":
            yield _p(f"{sc_at}.seccompProfile.type", f"seccompProfile type Unconfined is not allowed{where}",
                     src + "check_seccompProfile_baseline.go")
        if _dict(sc.get("appArmorProfile")).get("type") == "Unconfined":
            yield _p(f"{sc_at}.appArmorProfile.type", f"appArmorProfile type Unconfined is not allowed{where}",
                     src + "check_appArmorProfile.go")
        se = _dict(sc.get("seLinuxOptions"))
        if se.get("user") or se.get("role") or se.get("type") not in (None, "", "container_t", "container_init_t",
                                                                       "container_kvm_t", "container_engine_t"):
            yield _p(f"{sc_at}.seLinuxOptions", f"seLinuxOptions user, role or type not allowed{where}",
                     src + "check_seLinuxOptions.go")
    for cat, c in containers:
        sc = _dict(c.get("securityContext"))
        if sc.get("privileged") is True:
            yield _p(f"{cat}.securityContext.privileged", f"privileged containers are not allowed{where}",
                     src + "check_privileged.go")
        if sc.get("procMount") not in (None, "", "Default"):
            yield _p(f"{cat}.securityContext.procMount", f"procMount must be Default{where}",
                     src + "check_procMount.go")
        for j, port in enumerate(_list(c.get("ports"))):
            if _dict(port).get("hostPort"):
                yield _p(f"{cat}.ports[{j}].hostPort", f"hostPort is not allowed{where}", src + "check_hostPorts.go")
        added = [a for a in _list(_dict(sc.get("capabilities")).get("add"))]
        if any(a not in _PSA_BASELINE_CAPS for a in added):
            yield _p(f"{cat}.securityContext.capabilities.add", f"adding {added} is not allowed{where}",
                     src + "check_capabilities_baseline.go")
    if level != "restricted":
        return
    # restricted: check_allowPrivilegeEscalation.go, check_runAsNonRoot.go, check_runAsUser.go,
    # check_seccompProfile_restricted.go, check_capabilities_restricted.go
    pod_non_root = psc.get("runAsNonRoot")
    pod_seccomp = _dict(psc.get("seccompProfile")).get("type")
    if pod_non_root is False:
        yield _p(f"{at}.securityContext.runAsNonRoot", f"runAsNonRoot must not be false{where}",
                 src + "check_runAsNonRoot.go")
    if psc.get("runAsUser") == 0:
        yield _p(f"{at}.securityContext.runAsUser", f"runAsUser=0 (root) is not allowed{where}",
                 src + "check_runAsUser.go")
    for cat, c in containers:
        sc = _dict(c.get("securityContext"))
        if sc.get("allowPrivilegeEscalation") is not False:
            yield _p(f"{cat}.securityContext.allowPrivilegeEscalation", f"allowPrivilegeEscalation must be set to "
                     f"false{where}", src + "check_allowPrivilegeEscalation.go")
        non_root = sc.get("runAsNonRoot")
        if non_root is False or (non_root is None and pod_non_root is not True):
            yield _p(f"{cat}.securityContext.runAsNonRoot", f"runAsNonRoot must be true (on the container or the "
                     f"pod){where}", src + "check_runAsNonRoot.go")
        if sc.get("runAsUser") == 0:
            yield _p(f"{cat}.securityContext.runAsUser", f"runAsUser=0 (root) is not allowed{where}",
                     src + "check_runAsUser.go")
        seccomp = _dict(sc.get("seccompProfile")).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost") and not (seccomp is None and pod_seccomp in
                                                                   ("RuntimeDefault", "Localhost")):
            if seccomp != "Unconfined":  # reported above
                yield _p(f"{cat}.securityContext.seccompProfile", f"seccompProfile.type must be RuntimeDefault or "
                         f"Localhost (on the container or the pod){where}", src + "check_seccompProfile_restricted.go")
        caps = _dict(sc.get("capabilities"))
        if "ALL" not in _list(caps.get("drop")):
            yield _p(f"{cat}.securityContext.capabilities.drop", f"capabilities.drop must include \"ALL\"{where}",
                     src + "check_capabilities_restricted.go")
        if any(a != "NET_BIND_SERVICE" for a in _list(caps.get("add"))):
            yield _p(f"{cat}.securityContext.capabilities.add", f"only NET_BIND_SERVICE may be added{where}",
                     src + "check_capabilities_restricted.go")


# =========================================================================================
# Eventing: JobSink
# =========================================================================================

EVENT_VOLUME = "jobsink-event"  # what the dispatcher adds (eventing cmd/jobsink/main.go ServeHTTP)
JOBSINK_NAME_LABEL = "sinks.knative.dev/job-sink-name"  # eventing pkg/apis/sinks/register.go
JOB_CONTROLLER_LABELS = ("job-name", "controller-uid", "batch.kubernetes.io/job-name",
                         "batch.kubernetes.io/controller-uid")

# k8s.io/api v0.35 fields, for the Eventing webhook's strict decoding (disallowUnknownFields:
# eventing cmd/webhook/main.go; knative/pkg webhook/json/decode.go). Go's JSON decoding matches
# field names case-insensitively.
_JOB_KNOWN = {"apiVersion", "kind", "metadata", "spec", "status"}
_OBJECT_META_KNOWN = {"name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
                      "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
                      "ownerReferences", "finalizers", "managedFields"}
_JOB_SPEC_KNOWN = {"parallelism", "completions", "activeDeadlineSeconds", "podFailurePolicy", "successPolicy",
                   "backoffLimit", "backoffLimitPerIndex", "maxFailedIndexes", "failedPodsLimit", "selector",
                   "manualSelector", "template", "ttlSecondsAfterFinished", "completionMode", "suspend",
                   "podReplacementPolicy", "managedBy"}
_POD_TEMPLATE_KNOWN = {"metadata", "spec"}
_VOLUME_KNOWN = {"name", *_VOLUME_SOURCES}
_ENV_VAR_SOURCE_KNOWN = {"fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef", "fileKeyRef"}
_RESOURCES_KNOWN = {"limits", "requests", "claims"}
_CAPABILITIES_KNOWN = {"add", "drop"}


def _unknown(obj: Any, known: set, at: str, what: str, kind: str = "JobSink") -> Iterator[Problem]:
    if not isinstance(obj, dict):
        return
    lowered = {k.lower() for k in known}
    for key in obj:
        if key not in known and key.lower() not in lowered:
            yield _p(f"{at}.{key}", f"json: unknown field {key!r} -- {what} has no such field (a typo?); Knative "
                     f"Eventing's webhook decodes the {kind} strictly and refuses it",
                     PKG_DECODE + " Decode (eventing cmd/webhook/main.go: disallow unknown fields)")


def _job_unknown_fields(job: dict, at: str) -> Iterator[Problem]:
    yield from _unknown(job, _JOB_KNOWN, at, "a Job")
    spec = _dict(job.get("spec"))
    yield from _unknown(job.get("metadata"), _OBJECT_META_KNOWN, f"{at}.metadata", "ObjectMeta")
    yield from _unknown(spec, _JOB_SPEC_KNOWN, f"{at}.spec", "a JobSpec")
    template = _dict(spec.get("template"))
    yield from _unknown(template, _POD_TEMPLATE_KNOWN, f"{at}.spec.template", "a pod template")
    yield from _unknown(template.get("metadata"), _OBJECT_META_KNOWN, f"{at}.spec.template.metadata", "ObjectMeta")
    pod = _dict(template.get("spec"))
    pat = f"{at}.spec.template.spec"
    yield from _unknown(pod, _PODSPEC_KNOWN, pat, "a PodSpec")
    yield from _unknown(pod.get("securityContext"), _POD_SECURITY_CONTEXT_KNOWN, f"{pat}.securityContext",
                        "a PodSecurityContext")
    for i, v in enumerate(_list(pod.get("volumes"))):
        yield from _unknown(v, _VOLUME_KNOWN, f"{pat}.volumes[{i}]", "a Volume")
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(_list(pod.get(kind))):
            cat = f"{pat}.{kind}[{i}]"
            yield from _unknown(c, _CONTAINER_KNOWN, cat, "a Container")
            c = _dict(c)
            yield from _unknown(c.get("resources"), _RESOURCES_KNOWN, f"{cat}.resources", "ResourceRequirements")
            sc = c.get("securityContext")
            yield from _unknown(sc, _SECURITY_CONTEXT_KNOWN, f"{cat}.securityContext", "a SecurityContext")
            yield from _unknown(_dict(sc).get("capabilities"), _CAPABILITIES_KNOWN, f"{cat}.securityContext."
                                "capabilities", "Capabilities")
            for j, m in enumerate(_list(c.get("volumeMounts"))):
                yield from _unknown(m, _VOLUME_MOUNT_KNOWN, f"{cat}.volumeMounts[{j}]", "a VolumeMount")
            for j, e in enumerate(_list(c.get("env"))):
                yield from _unknown(e, _ENV_VAR_ALLOWED, f"{cat}.env[{j}]", "an EnvVar")
                yield from _unknown(_dict(e).get("valueFrom"), _ENV_VAR_SOURCE_KNOWN, f"{cat}.env[{j}].valueFrom",
                                    "an EnvVarSource")


def jobsink_problems(sink: dict, config: ClusterConfig = ClusterConfig()) -> list[Problem]:
    """eventing pkg/apis/sinks/v1alpha1/job_sink_validation.go JobSink.Validate: `spec.job` is
    required, and is dry-run created as written (named generated_name(jobsink name)), so what the
    API server refuses for that Job is refused here too; plus what the dispatcher
    (cmd/jobsink/main.go) does with the template for each event."""
    meta = _dict(sink.get("metadata"))
    name, namespace = meta.get("name") or "", meta.get("namespace")
    job = _dict(sink.get("spec")).get("job")
    out: list[Problem] = []
    out += _metadata(meta, "metadata")
    out += _unknown(sink.get("spec"), {"job"}, "spec", "a JobSink's spec")
    out += _jobsink_name(name)
    if not job:
        out.append(_p("spec.job", "expected exactly one, got neither: job -- a JobSink needs spec.job, the Job to "
                      "run for each event", JOBSINK_VALIDATION + " JobSinkSpec.Validate"))
        return out
    job = _dict(job)
    at = "spec.job"
    out += _job_unknown_fields(job, at)
    jmeta, jspec = _dict(job.get("metadata")), _dict(job.get("spec"))
    out += _job_metadata(jmeta, namespace, at)
    out += _job_spec(jspec, at)
    template = _dict(jspec.get("template"))
    out += _job_selector_labels(jspec, _dict(template.get("metadata")), at)
    pod = _dict(template.get("spec"))
    pat = f"{at}.spec.template.spec"
    out += _job_pod(pod, pat)
    out += _event_volume(pod, pat)
    out += pod_security_problems(pod, config, pat, "the Job's pods (the Job is created, its pods never)")
    return out


def _jobsink_name(name: str) -> Iterator[Problem]:
    # The name of a custom resource is a DNS-1123 subdomain. (Eventing's dispatcher also labels
    # every Job sinks.knative.dev/job-sink-name=<JobSink name> -- cmd/jobsink/main.go ServeHTTP --
    # so past 63 characters the Jobs themselves are refused; but no admission stage refuses the
    # JobSink, so that is not a rule here.)
    if name and not is_dns1123_subdomain(name):
        yield _p("metadata.name", f"{name!r} is not a DNS-1123 subdomain (lowercase letters, digits, '-', '.')",
                 K8S_NAMES + " IsDNS1123Subdomain (names of custom resources)")


def _job_metadata(jmeta: dict, namespace: Optional[str], at: str) -> Iterator[Problem]:
    # The dry-run Create goes to the JobSink's namespace (job_sink_validation.go): a different
    # metadata.namespace in the template is refused ("the namespace of the provided object does
    # not match the namespace sent on the request"). The Job's labels and annotations are
    # validated as any object's.
    ns = jmeta.get("namespace")
    if ns and namespace and ns != namespace:
        yield _p(f"{at}.metadata.namespace", f"{ns!r}: the namespace of the provided object does not match the "
                 f"namespace sent on the request ({namespace!r}); leave it out", JOBSINK_VALIDATION +
                 " JobSinkSpec.Validate (dry-run create)")
    yield from _metadata(jmeta, f"{at}.metadata", " (the Job)")


def _job_spec(spec: dict, at: str) -> Iterator[Problem]:
    # kubernetes pkg/apis/batch/validation/validation.go validateJobSpec: counts and deadlines are
    # not negative; the pod template's restartPolicy is OnFailure or Never.
    source = K8S_BATCH + " validateJobSpec"
    for key in ("parallelism", "completions", "activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished"):
        value = spec.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            yield _p(f"{at}.spec.{key}", f"must be greater than or equal to 0: {value}", source)
    restart = _dict(_dict(spec.get("template")).get("spec")).get("restartPolicy")
    if restart not in ("OnFailure", "Never"):
        yield _p(f"{at}.spec.template.spec.restartPolicy", f"Unsupported value: {restart!r}: supported values: "
                 "\"OnFailure\", \"Never\" (a Job's pods must not restart Always, the default)", source)


def _job_selector_labels(spec: dict, tmeta: dict, at: str) -> Iterator[Problem]:
    # kubernetes pkg/registry/batch/job/strategy.go generateSelector + batch validation
    # ValidateGeneratedSelector: unless manualSelector, the API server sets the template labels
    # job-name / controller-uid (and their batch.kubernetes.io/ forms) to the Job's name and uid,
    # keeping any value already there -- which then fails validation; and it writes the selector
    # itself.
    if spec.get("manualSelector") is True:
        return
    labels = _dict(tmeta.get("labels"))
    for key in JOB_CONTROLLER_LABELS:
        if key in labels:
            yield _p(f"{at}.spec.template.metadata.labels.{key}", f"{key} is set by Kubernetes on every Job's pods "
                     "(the Job's name or uid): a value here makes the Job invalid; remove it",
                     K8S_JOB_STRATEGY + " generateSelector; " + K8S_BATCH + " ValidateGeneratedSelector")
    if _is_set(spec.get("selector")):
        yield _p(f"{at}.spec.selector", "`selector` will be auto-generated: leave it out (or set manualSelector)",
                 K8S_BATCH + " ValidateGeneratedSelector")


def _job_pod(pod: dict, at: str) -> Iterator[Problem]:
    """kubernetes pkg/apis/core/validation/validation.go ValidatePodSpec, as the dry-run create
    of the Job applies it."""
    where = ""
    containers = [_dict(c) for c in _list(pod.get("containers"))]
    inits = [_dict(c) for c in _list(pod.get("initContainers"))]
    if not containers:
        yield _p(f"{at}.containers", "Required value: a Job's pod needs a container", K8S_CORE + " validateContainers")
    volumes: dict = {}
    for i, v in enumerate(_list(pod.get("volumes"))):
        v = _dict(v)
        name = v.get("name") or ""
        if not is_dns1123_label(name):
            yield _p(f"{at}.volumes[{i}].name", f"invalid value: {name!r} -- a volume name is a DNS-1123 label",
                     K8S_CORE + " ValidateVolumes")
        elif name in volumes:
            yield _p(f"{at}.volumes[{i}].name", f"Duplicate value: {name!r}", K8S_CORE + " ValidateVolumes")
        kinds = [k for k in _VOLUME_SOURCES if _is_set(v.get(k))]
        if len(kinds) != 1:
            yield _p(f"{at}.volumes[{i}]", "must specify exactly one volume type" if not kinds else
                     f"may not specify more than 1 volume type: {', '.join(kinds)}", K8S_CORE + " validateVolumeSource")
        volumes[name] = v
    names: dict = {}
    for kind, group in (("initContainers", inits), ("containers", containers)):
        for i, c in enumerate(group):
            cat = f"{at}.{kind}[{i}]"
            name = c.get("name") or ""
            if not name:
                yield _p(f"{cat}.name", "Required value", K8S_CORE + " validateContainerCommon")
            elif not is_dns1123_label(name):
                yield _p(f"{cat}.name", f"invalid value: {name!r} -- a container name is a DNS-1123 label (lowercase "
                         "letters, digits, '-')", K8S_CORE + " validateContainerCommon")
            elif name in names:
                yield _p(f"{cat}.name", f"Duplicate value: {name!r} (also {names[name]}): container names are unique "
                         "across init and main containers", K8S_CORE + " validateContainers")
            else:
                names[name] = cat
            image = c.get("image")
            if not image:
                yield _p(f"{cat}.image", "Required value", K8S_CORE + " validateContainers")
            elif image != image.strip():
                yield _p(f"{cat}.image", "must not have leading or trailing whitespace",
                         K8S_CORE + " validateContainers")
            if kind == "initContainers":
                for key in ("livenessProbe", "readinessProbe", "startupProbe", "lifecycle"):
                    if _is_set(c.get(key)) and c.get("restartPolicy") != "Always":
                        yield _p(f"{cat}.{key}", "may not be set for init containers",
                                 K8S_CORE + " validateInitContainers")
            yield from _k8s_env(_list(c.get("env")), f"{cat}.env", where)
            yield from _k8s_resources(_dict(c.get("resources")), f"{cat}.resources", where)
            yield from _k8s_mounts(_list(c.get("volumeMounts")), volumes, f"{cat}.volumeMounts",
                                   init=kind == "initContainers")
            for j, port in enumerate(_list(c.get("ports"))):
                number = _dict(port).get("containerPort")
                if not isinstance(number, int) or not 1 <= number <= 65535:
                    yield _p(f"{cat}.ports[{j}].containerPort", f"must be between 1 and 65535, inclusive: {number!r}",
                             K8S_CORE + " validateContainerPorts")
    account = pod.get("serviceAccountName")
    if account and not is_dns1123_subdomain(account):
        yield _p(f"{at}.serviceAccountName", f"invalid value: {account!r} -- not a DNS-1123 subdomain",
                 K8S_CORE + " ValidatePodSpec")
    # (An imagePullSecrets entry without a name is only warned about: kubernetes
    # pkg/api/pod/warnings.go "invalid empty name"; not refused.)


def _k8s_mounts(mounts: list, volumes: dict, at: str, *, init: bool) -> Iterator[Problem]:
    # kubernetes pkg/apis/core/validation ValidateVolumeMounts: the name of a declared volume, a
    # mount path, unique within the container; subPath relative without '..'. (The dispatcher's
    # jobsink-event volume does not exist when the webhook dry-runs the template.)
    seen: set = set()
    for j, m in enumerate(mounts):
        m = _dict(m)
        name, path = m.get("name") or "", m.get("mountPath") or ""
        if name == EVENT_VOLUME and EVENT_VOLUME not in volumes:
            if not init:  # an init container's mount of it is reported by _event_volume
                yield _p(f"{at}[{j}].name", f"{EVENT_VOLUME!r} is not a volume of the template: Knative's dispatcher "
                         "adds it to each Job it creates, but the webhook dry-runs the template as written and refuses "
                         "the mount; leave the mount out (the dispatcher adds it with K_EVENT_PATH)",
                         K8S_CORE + " ValidateVolumeMounts; " + JOBSINK_VALIDATION + " JobSinkSpec.Validate")
        elif name not in volumes:
            yield _p(f"{at}[{j}].name", f"Not found: {name!r} -- every volumeMount names a volume of the pod",
                     K8S_CORE + " ValidateVolumeMounts")
        if not path:
            yield _p(f"{at}[{j}].mountPath", "Required value", K8S_CORE + " ValidateVolumeMounts")
        elif path in seen:
            yield _p(f"{at}[{j}].mountPath", f"must be unique: {path!r}", K8S_CORE + " ValidateVolumeMounts")
        seen.add(path)
        sub = m.get("subPath") or ""
        if sub and (sub.startswith("/") or ".." in sub.split("/")):
            yield _p(f"{at}[{j}].subPath", f"must be a relative path without '..': {sub!r}",
                     K8S_CORE + " ValidateVolumeMounts")


def _event_volume(pod: dict, at: str) -> Iterator[Problem]:
    # eventing cmd/jobsink/main.go ServeHTTP: for each event the dispatcher adds the volume
    # jobsink-event (a Secret named like the Job) unless one of that name exists, and mounts it,
    # with K_EVENT_PATH, in the *main* containers only. An init container's mount of it is
    # refused when the template does not declare the volume (the webhook's dry run: Not found).
    # (A template that declares jobsink-event itself is accepted -- the dispatcher then adds no
    # Secret, so the Job never sees its event -- but nothing refuses it: not a rule here.)
    if any(_dict(v).get("name") == EVENT_VOLUME for v in _list(pod.get("volumes"))):
        return
    for i, c in enumerate(_list(pod.get("initContainers"))):
        for j, m in enumerate(_list(_dict(c).get("volumeMounts"))):
            if _dict(m).get("name") == EVENT_VOLUME:
                yield _p(f"{at}.initContainers[{i}].volumeMounts[{j}]", f"an init container cannot read the event: "
                         f"Knative's dispatcher gives the {EVENT_VOLUME!r} volume and K_EVENT_PATH to main containers "
                         "only, and the webhook's dry run refuses a mount of a volume the template does not declare. "
                         "Read the event in a main container", JOBSINK_DISPATCHER + " ServeHTTP")


# =========================================================================================
# Eventing: Trigger
# =========================================================================================

_ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9]*")  # trigger_validation.go validAttributeName
_DIALECTS = ("exact", "prefix", "suffix", "all", "any", "not", "cesql")
BROKER_LABEL = "eventing.knative.dev/broker"  # trigger_defaults.go brokerLabel


def trigger_problems(trigger: dict) -> list[Problem]:
    """eventing pkg/apis/eventing/v1/trigger_validation.go Trigger.Validate (after
    trigger_defaults.go). What the Broker's filter later does with what the webhook lets through
    (pkg/eventfilter/subscriptionsapi: a filter without a dialect or with an empty exact /
    prefix / suffix value is skipped; broker/filter/filter_handler.go: spec.filter is ignored
    when spec.filters is set) is refused by no admission stage: not rules here."""
    meta = _dict(trigger.get("metadata"))
    spec = _dict(trigger.get("spec"))
    out: list[Problem] = []
    out += _metadata(meta, "metadata")
    out += _trigger_unknown_fields(spec)
    out += _trigger_broker(spec)
    filt = spec.get("filter")
    if isinstance(filt, dict):
        out += _attribute_names(_dict(filt.get("attributes")), "spec.filter.attributes")
    out += _filters(_list(spec.get("filters")), "spec.filters")
    out += _destination(spec.get("subscriber"), "spec.subscriber")
    return out


_TRIGGER_SPEC_KNOWN = {"broker", "brokerRef", "filter", "filters", "subscriber", "delivery"}  # trigger_types.go
_FILTER_KNOWN = {"all", "any", "not", "exact", "prefix", "suffix", "cesql"}  # SubscriptionsAPIFilter
_DESTINATION_KNOWN = {"ref", "uri", "CACerts", "audience"}  # knative/pkg apis/duck/v1/destination.go
_KREFERENCE_KNOWN = {"kind", "namespace", "name", "apiVersion", "group", "address"}  # knative_reference.go


def _trigger_unknown_fields(spec: dict) -> Iterator[Problem]:
    # Eventing's webhook decodes a Trigger strictly (disallowUnknownFields, eventing
    # cmd/webhook/main.go): a field its Go types do not have is refused.
    yield from _unknown(spec, _TRIGGER_SPEC_KNOWN, "spec", "a Trigger's spec", kind="Trigger")
    yield from _unknown(spec.get("filter"), {"attributes"}, "spec.filter", "a TriggerFilter", kind="Trigger")
    yield from _unknown(spec.get("brokerRef"), _KREFERENCE_KNOWN, "spec.brokerRef", "a KReference", kind="Trigger")
    subscriber = spec.get("subscriber")
    yield from _unknown(subscriber, _DESTINATION_KNOWN, "spec.subscriber", "a Destination", kind="Trigger")
    yield from _unknown(_dict(subscriber).get("ref"), _KREFERENCE_KNOWN, "spec.subscriber.ref", "a KReference",
                        kind="Trigger")

    def walk(filters: list, at: str) -> Iterator[Problem]:
        for i, f in enumerate(filters):
            yield from _unknown(f, _FILTER_KNOWN, f"{at}[{i}]", "a filter", kind="Trigger")
            f = _dict(f)
            for d in ("all", "any"):
                yield from walk(_list(f.get(d)), f"{at}[{i}].{d}")
            if isinstance(f.get("not"), dict):
                yield from walk([f["not"]], f"{at}[{i}].not")

    yield from walk(_list(spec.get("filters")), "spec.filters")


def _trigger_broker(spec: dict) -> Iterator[Problem]:
    # TriggerSpec.Validate: exactly one of broker, brokerRef (brokerRef.namespace only with the
    # cross-namespace feature). trigger_defaults.go setLabels then labels the Trigger
    # eventing.knative.dev/broker=<broker>, so the broker's name must be a label value.
    broker, ref = spec.get("broker"), spec.get("brokerRef")
    if not broker and not ref:
        yield _p("spec.broker", "missing field(s): broker -- the Broker whose events this Trigger filters",
                 TRIGGER_VALIDATION + " TriggerSpec.Validate")
    elif broker and ref:
        yield _p("spec.broker", "expected exactly one, got both: broker, brokerRef",
                 TRIGGER_VALIDATION + " TriggerSpec.Validate")
    if isinstance(ref, dict) and ref.get("namespace"):
        yield _p("spec.brokerRef.namespace", "must not set the field(s): namespace -- only name, apiVersion and kind "
                 "are supported fields when feature.CrossNamespaceEventLinks is disabled",
                 TRIGGER_VALIDATION + " TriggerSpec.Validate")
    if broker and not is_label_value(broker):
        yield _p("spec.broker", f"{broker!r} cannot be the value of the label {BROKER_LABEL} Knative puts on the "
                 "Trigger (at most 63 characters)", TRIGGER_DEFAULTS + " setLabels")


def _attribute_names(attrs: dict, at: str) -> Iterator[Problem]:
    # ValidateAttributesNames: lowercase alphanumeric, starting with a letter.
    for key in attrs:
        if not _full(_ATTRIBUTE_NAME, key):
            yield _p(f"{at}.{key}", f"invalid key name {key!r}: Attribute name must start with a letter and can only "
                     "contain lowercase alphanumeric", TRIGGER_VALIDATION + " ValidateAttributesNames")


def _filters(filters: list, at: str) -> Iterator[Problem]:
    """ValidateSubscriptionAPIFiltersList / ValidateSubscriptionAPIFilter: one dialect at most
    per filter, attribute names, through all / any / not."""
    for i, f in enumerate(filters):
        fat = f"{at}[{i}]"
        f = _dict(f)
        dialects = [d for d in _DIALECTS if (f.get(d) if d != "not" else f.get(d) is not None)]
        if len(dialects) > 1:
            yield _p(fat, f"multiple dialects found, filters can have only one dialect set (found "
                     f"{', '.join(dialects)})", TRIGGER_VALIDATION + " ValidateOneOf")
        for d in ("exact", "prefix", "suffix"):
            values = _dict(f.get(d))
            yield from _attribute_names(values, f"{fat}.{d}")
        for d in ("all", "any"):
            yield from _filters(_list(f.get(d)), f"{fat}.{d}")
        if isinstance(f.get("not"), dict):
            yield from _filters([f["not"]], f"{fat}.not")


def _destination(dest: Any, at: str) -> Iterator[Problem]:
    """knative/pkg apis/duck/v1/destination.go ValidateDestination and knative_reference.go
    KReference.Validate. (Its check of ref.namespace against the parent's namespace needs the
    parent in the context, apis.WithinParent, which eventing's Trigger.Validate never sets: a
    subscriber in another namespace is not refused.)"""
    dest = _dict(dest)
    ref, uri = dest.get("ref"), dest.get("uri")
    if not ref and not uri:
        yield _p(at, "expected at least one, got none: ref, uri -- the subscriber (here: the JobSink)",
                 PKG_DESTINATION + " ValidateDestination")
        return
    # apis.URL: absolute means it has a scheme (url.URL.IsAbs); alone, it also needs a host.
    absolute = isinstance(uri, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", uri) is not None
    has_host = isinstance(uri, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]", uri) is not None
    if ref and uri and absolute:
        yield _p(at, "Absolute URI is not allowed when Ref or [apiVersion, kind, name] is present",
                 PKG_DESTINATION + " ValidateDestination")
    elif not ref and uri and not (absolute and has_host):
        yield _p(f"{at}.uri", "invalid value: Relative URI is not allowed when Ref and [apiVersion, kind, name] is "
                 "absent", PKG_DESTINATION + " ValidateDestination")
    elif ref and not uri:
        ref = _dict(ref)
        for key in ("name", "apiVersion", "kind"):
            if not ref.get(key):
                yield _p(f"{at}.ref.{key}", f"missing field(s): {key}", PKG_KREFERENCE + " KReference.Validate")
        if ref.get("group"):
            yield _p(f"{at}.ref.group", "must not set the field(s): group", PKG_KREFERENCE + " KReference.Validate")


# =========================================================================================
# All of them
# =========================================================================================

def problems(obj: dict, config: ClusterConfig = ClusterConfig()) -> list[Problem]:
    """What the cluster would refuse in `obj`: a Knative Service, a JobSink or a Trigger (other
    kinds: no rules here, an empty list)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key == (SERVING_API, "Service"):
        return service_problems(obj, config)
    if key == (JOBSINK_API, "JobSink"):
        return jobsink_problems(obj, config)
    if key == (TRIGGER_API, "Trigger"):
        return trigger_problems(obj)
    return []
