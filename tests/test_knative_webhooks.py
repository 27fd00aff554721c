"""Knative's real admission judges every case of tests/test_knative_rules.py.

tests/test_knative_rules.py checks the rules ported to Python (control/runtime/knative_rules.py)
against minimal objects. Here the same objects -- built by the same builders (`service()`,
`jobsink()`, `trigger()`) and mutation ops (`_apply`), imported from that module -- go to the
real one-node cluster of the `knative` fixture (Kubernetes 1.34, Knative Serving 1.23 and
Eventing 1.22, their own webhooks), and the ported answer (refused / accepted) must be the real
one. Where they differ the real system is right: the test collects every difference and fails
listing each case with the real answer and message. Nothing is started: objects are created
with `dryRun=All`, except the few Services of the revision stage below, whose Deployments get
0 replicas.

What stands for what
--------------------
- A case is created with POST to its collection, `?dryRun=All&fieldValidation=Strict`: Strict
  is what `kubectl apply` sends, and what modelplane's runtime sends on its creates, patches
  and replaces (control/runtime/knative.py). Without it the API server applies its default,
  Warn: unknown fields are dropped with a warning header, and Serving's webhook does not look
  for them either (serving cmd/webhook/main.go: "disallow unknown fields ... false, our CRDs
  have schemas"). For each case Strict refuses as an unknown field, the answer without
  `fieldValidation` is recorded too (informative, not asserted).
- `rules-privileged` (label pod-security.kubernetes.io/enforce=privileged) is the namespace
  every Service, JobSink and Trigger is judged in. On dry-run requests only, Serving's
  validating webhook also dry-runs a Pod built from the template in the Service's namespace
  (serving pkg/webhook/validate_unstructured.go `validateRevisionTemplate`,
  pkg/webhook/podspec_dryrun.go `validatePodSpec`), so Kubernetes' pod validation answers there
  (a real create skips it); in this namespace Pod Security does not, as it does not on a real
  create of a Service.
- `rules-<level>` stands for `ClusterConfig.pod_security_level`, the namespace's Pod Security
  Admission level (label pod-security.kubernetes.io/enforce=<level>).
- A ClusterConfig other than the default is set in knative-serving's ConfigMaps
  (`CONFIG_KEYS`: config-defaults, config-autoscaler, config-features, config-observability,
  config-network, config-deployment) by merge patches, cases grouped by config. Serving's
  webhooks read config-defaults, config-features and config-autoscaler (serving
  pkg/apis/config/store.go); after each patch a case whose ported answer the change flips is
  retried until the webhook gives the new answer (up to 20 s) -- not for the config-features
  keys only the revision reconciler acts on (`RECONCILER_ONLY`). A max-scale-limit also sets
  config-autoscaler max-scale (Knative refuses the limit without it). The `serving_config`
  fixture restores the original data of these ConfigMaps (config-deployment also for the
  revision stage below).

Stages other than the create (each a real admission, used only where the rule says so)
------------------------------------------------------------------------------------------
- Pod Security (rules with source "kubernetes pod-security-admission ..."): PSA enforces on Pods
  only; a Service, a Deployment or a Job is at most warned about. The revision's pod spec (the
  template's spec as the dry run returned it, i.e. after Serving's defaulting webhook --
  serving pkg/apis/serving/v1/revision_defaults.go `defaultSecurityContext` for
  secure-pod-defaults -- without the revision-only fields and the probes, which Knative hands to
  queue-proxy) or the JobSink's Job pod template is dry-run as a Pod in `rules-<level>`; the
  case is refused there when the API server answers "violates PodSecurity". Valid cases must
  pass this stage too.
- The route's Kubernetes Services (rules citing serving pkg/reconciler/route/resources/
  service.go `MakeK8sPlaceholderService`): for the Service name and each traffic tag, Knative's
  route reconciler creates a Kubernetes Service named by config-network's tag-template
  (serving pkg/reconciler/route/domains/domains.go `HostnameFromTemplate`); one is dry-run per
  name.
- The revision and its Deployment (other Service cases the create accepts, and those refused
  only by the webhook's own dry-run Pod): the Service is created for real in a namespace of
  its own, with config-autoscaler initial-scale 0 (and allow-zero-initial-scale) so the
  Deployment gets no replicas, and the test registries in config-deployment
  registries-skipping-tag-resolving so the controller does not need them. Knative's revision reconciler then creates the
  Deployment (serving pkg/reconciler/revision/reconcile_resources.go `reconcileDeployment`,
  from pkg/reconciler/revision/resources/deploy.go `makePodSpec`); a refusal shows as the
  Revision's event "failed to create deployment ...". Before that, Knative's configuration
  reconciler creates the Revision, which carries the template's metadata: the API server's
  refusal of it shows as the Configuration's condition RevisionFailed (serving
  pkg/reconciler/configuration/configuration.go, pkg/apis/serving/v1/configuration_lifecycle.go
  MarkRevisionCreationFailed) -- a refusal at that stage.
- The Job's pods (JobSink cases the create accepts): Eventing's webhook dry-runs the Job itself
  on every create (eventing pkg/apis/sinks/v1alpha1/job_sink_validation.go
  `JobSinkSpec.Validate`), but Kubernetes checks a few things only on Pods, not on pod
  templates (kubernetes pkg/apis/core/validation/validation.go validateContainersOnlyForPod):
  the Job's pod template is dry-run as a Pod in `rules-privileged`.

Triggers have no later admission stage: eventing pkg/apis/eventing/v1/trigger_validation.go,
trigger_defaults.go.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from typing import Optional

import pytest

import kube
import test_knative_rules as tr
from control.runtime import knative_rules as rules

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.knative]

SERVING_NS = "knative-serving"
DEFAULT = rules.ClusterConfig()
JUDGE_LEVEL = "privileged"
PSA_LABEL = "pod-security.kubernetes.io/enforce"
CONFIG_WAIT = 20.0       # seconds the webhook gets to honour a ConfigMap change
REVISION_WAIT = 90.0     # seconds the revision stage waits for a Deployment (or its refusal)
JOB_SERVICE_ACCOUNT = "modelplane-job"  # jobsink()'s serviceAccountName: a Pod needs it to exist


def level_ns(level: str) -> str:
    return f"rules-{level}"


JUDGE_NS = level_ns(JUDGE_LEVEL)


# -- ClusterConfig -> knative-serving ConfigMaps --------------------------------------------

def _flag(on: bool) -> str:
    return "Enabled" if on else "Disabled"


def _bool(on: bool) -> str:
    return "true" if on else "false"


def _joined(values: frozenset) -> str:
    return ",".join(sorted(values))


# field -> (ConfigMap, key, how the value is written); the keys as serving parses them:
# pkg/apis/config/defaults.go, pkg/apis/config/features.go, pkg/autoscaler/config/config.go,
# pkg/observability/config.go, knative/networking pkg/config/config.go.
CONFIG_KEYS = {
    "max_revision_timeout_seconds": ("config-defaults", "max-revision-timeout-seconds", str),
    "container_concurrency_max_limit": ("config-defaults", "container-concurrency-max-limit", str),
    "allow_container_concurrency_zero": ("config-defaults", "allow-container-concurrency-zero", _bool),
    "max_scale_limit": ("config-autoscaler", "max-scale-limit", str),
    "allow_zero_initial_scale": ("config-autoscaler", "allow-zero-initial-scale", _bool),
    "pod_autoscaler_class": ("config-autoscaler", "pod-autoscaler-class", str),
    "multi_container": ("config-features", "multi-container", _flag),
    "multi_container_probing": ("config-features", "multi-container-probing", _flag),
    "podspec_volumes_emptydir": ("config-features", "kubernetes.podspec-volumes-emptydir", _flag),
    "podspec_persistent_volume_claim": ("config-features", "kubernetes.podspec-persistent-volume-claim", _flag),
    "podspec_persistent_volume_write": ("config-features", "kubernetes.podspec-persistent-volume-write", _flag),
    "podspec_fieldref": ("config-features", "kubernetes.podspec-fieldref", _flag),
    "podspec_init_containers": ("config-features", "kubernetes.podspec-init-containers", _flag),
    "podspec_securitycontext": ("config-features", "kubernetes.podspec-securitycontext", _flag),
    "secure_pod_defaults": ("config-features", "secure-pod-defaults", str),
    "containerspec_addcapabilities": ("config-features", "kubernetes.containerspec-addcapabilities", _flag),
    "var_log_collection": ("config-observability", "logging.enable-var-log-collection", _bool),
    "queueproxy_mount_podinfo": ("config-features", "queueproxy.mount-podinfo", str),
    "queue_sidecar_token_audiences": ("config-deployment", "queue-sidecar-token-audiences", _joined),
    "system_internal_tls": ("config-network", "system-internal-tls", _flag),
    "tag_template": ("config-network", "tag-template", str),
}
NOT_CONFIGMAPS = {"podspec_features", "pod_security_level"}  # config-features keys named in the set; a label
# What Serving's webhooks read (serving pkg/apis/config/store.go NewStore: defaults, features, autoscaler),
# but for the config-features keys only the revision reconciler acts on (deploy.go makePodSpec).
WEBHOOK_CONFIGMAPS = {"config-defaults", "config-features", "config-autoscaler"}
RECONCILER_ONLY = {"queueproxy_mount_podinfo"}
WEBHOOK_FIELDS = [f for f, (cm, _, _) in CONFIG_KEYS.items()
                  if cm in WEBHOOK_CONFIGMAPS and f not in RECONCILER_ONLY] + ["podspec_features"]
SERVING_CONFIGMAPS = ("config-defaults", "config-autoscaler", "config-features", "config-observability",
                      "config-network", "config-deployment")


def config_data(cfg: rules.ClusterConfig) -> dict[tuple[str, str], str]:
    """(ConfigMap, key) -> value for every field of `cfg` that is not Knative's default."""
    out: dict[tuple[str, str], str] = {}
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(DEFAULT, f.name)
        if value == default or f.name == "pod_security_level":
            continue
        if f.name == "podspec_features":
            out.update({("config-features", key): "Enabled" for key in value - default})
            out.update({("config-features", key): "Disabled" for key in default - value})
            continue
        cm, key, write = CONFIG_KEYS[f.name]
        out[(cm, key)] = write(value)
    if cfg.max_scale_limit > 0:
        # Knative refuses a max-scale-limit without a default max-scale in [1, max-scale-limit]
        # (serving pkg/autoscaler/config/config.go validate: "max-scale = 0, must be in [1,
        # max-scale-limit(10)] range"): the limit as the default, which the cases' own
        # max-scale annotations override.
        out[("config-autoscaler", "max-scale")] = str(cfg.max_scale_limit)
    return out


def group_key(cfg: rules.ClusterConfig) -> rules.ClusterConfig:
    """The ConfigMap side of a config: the Pod Security level is a namespace label instead."""
    return dataclasses.replace(cfg, pod_security_level=DEFAULT.pod_security_level)


class ServingConfig:
    """knative-serving's ConfigMaps: their data as found, and merge patches from there."""

    def __init__(self, admin: kube.Kube):
        self.admin = admin
        self.original = {name: dict(admin.get(self.path(name)).get("data") or {}) for name in SERVING_CONFIGMAPS}
        self.touched: set[tuple[str, str]] = set()

    @staticmethod
    def path(name: str) -> str:
        return f"/api/v1/namespaces/{SERVING_NS}/configmaps/{name}"

    def set(self, data: dict[tuple[str, str], str]) -> None:
        """`data` over the original values; every key set before and not in `data` goes back
        (null in a merge patch removes a key that was not there)."""
        patches: dict[str, dict] = {}
        for cm, key in sorted(self.touched | set(data)):
            patches.setdefault(cm, {})[key] = data.get((cm, key), self.original[cm].get(key))
        for cm, patch in patches.items():
            self.admin.merge_patch(self.path(cm), {"data": patch})
        self.touched |= set(data)

    def restore(self) -> None:
        self.set({})


# -- the cases of tests/test_knative_rules.py ------------------------------------------------

@dataclass
class Case:
    key: str                   # "<list>/<case id>"
    obj: dict                  # built as the rules test builds it, in JUDGE_NS
    config: rules.ClusterConfig
    expect: Optional[tuple]    # (field, part of the message) the rules test expects; None: a valid case
    ported: list               # rules.problems(obj, config)

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def refused(self) -> bool:
        return self.expect is not None

    @property
    def source(self) -> str:
        """The source of the Problem the case is about ('' for a valid case)."""
        if self.expect is None:
            return ""
        field, message = self.expect
        return next((p.source for p in self.ported if p.field == field and message in p.message), "")

    def ported_text(self) -> str:
        if not self.ported:
            return "accepts"
        return "refuses: " + "; ".join(f"{p.field}: {p.message} [{p.source}]" for p in self.ported)


def _build(builder, ops) -> dict:
    obj = builder()
    for path, value in ops:
        tr._apply(obj, path, value)
    obj["metadata"]["namespace"] = JUDGE_NS
    return obj


def _case(key: str, obj: dict, config, expect) -> Case:
    config = config or rules.ClusterConfig()
    return Case(key, obj, config, expect, rules.problems(obj, config))


def all_cases() -> list[Case]:
    cases = [_case("service-valid/minimal", _build(tr.service, []), None, None),
             _case("jobsink-valid/minimal", _build(tr.jobsink, []), None, None),
             _case("jobsink-valid/pod-level-security-and-main-container-event-mounts",
                   _build(tr.jobsink_with_pod_level_security, []), None, None),
             _case("trigger-valid/minimal", _build(tr.trigger, []), None, None)]
    cases += [_case(f"service/{cid}", _build(tr.service, ops), config, (field, message))
              for cid, ops, field, message, config, _count in tr.SERVICE_CASES]
    cases += [_case(f"service-valid/{cid}", _build(tr.service, ops), config, None)
              for cid, ops, config in tr.VALID_SERVICE_CASES]
    cases += [_case(f"jobsink/{cid}", _build(tr.jobsink, ops), None, (field, message))
              for cid, ops, field, message, _count in tr.JOBSINK_CASES]
    cases += [_case(f"jobsink-valid/{cid}", _build(tr.jobsink, ops), None, None)
              for cid, ops in tr.VALID_JOBSINK_CASES]
    cases += [_case(f"trigger/{cid}", _build(tr.trigger, ops), None, (field, message))
              for cid, ops, field, message, _count in tr.TRIGGER_CASES]
    cases += [_case(f"trigger-valid/{cid}", _build(tr.trigger, ops), None, None)
              for cid, ops in tr.VALID_TRIGGER_CASES]
    return cases


# -- asking the cluster ------------------------------------------------------------------------

@dataclass
class Answer:
    refused: bool
    stage: str                # where the answer came from
    message: str = ""
    conclusive: bool = True   # False: the stage itself could not judge (the test reports it)


STAGE_CREATE = "create (API server + webhooks)"
STAGE_WEBHOOK_POD = ("create: Serving's webhook dry-runs the template as a Pod on dry-run requests only "
                     "(serving pkg/webhook/podspec_dryrun.go)")
STAGE_DEPLOYMENT = ("the revision's Deployment, created by Knative's revision reconciler "
                    "(serving pkg/reconciler/revision/reconcile_resources.go)")
STAGE_REVISION = ("the Revision, created by Knative's configuration reconciler "
                  "(serving pkg/reconciler/configuration/configuration.go; Configuration condition RevisionFailed)")
STAGE_PLACEHOLDER = ("the route's Kubernetes Service (serving pkg/reconciler/route/resources/service.go "
                     "MakeK8sPlaceholderService)")


def _message(e: kube.ApiError) -> str:
    try:
        return f"HTTP {e.status}: " + (json.loads(e.body).get("message") or e.body)
    except (ValueError, AttributeError):
        return f"HTTP {e.status}: {e.body}"


def create(cluster, obj: dict, *, dry_run: bool = True, strict: bool = True):
    """POST `obj` to its collection: (the object as stored, None) or (None, the ApiError).
    5xx and 429 (a webhook not answering, throttling) are retried a few times first."""
    path = cluster.applier.path(obj).rsplit("/", 1)[0]
    query = "&".join(q for q, on in (("dryRun=All", dry_run), ("fieldValidation=Strict", strict)) if on)
    last: Optional[kube.ApiError] = None
    for _ in range(5):
        try:
            return cluster.admin.request("POST", path, obj, query=query), None
        except kube.ApiError as e:
            if 400 <= e.status < 500 and e.status != 429:
                return None, e
            last = e
            time.sleep(1)
    return None, last


def _broken(err: kube.ApiError) -> bool:
    """An answer that is no verdict: the server or a webhook failed (5xx), or throttled."""
    return err.status >= 500 or err.status == 429


def judge_create(cluster, case: Case, *, strict: bool = True) -> tuple[Answer, Optional[dict]]:
    stored, err = create(cluster, case.obj, strict=strict)
    if err is None:
        return Answer(False, STAGE_CREATE), stored
    message = _message(err)
    stage = STAGE_WEBHOOK_POD if "dry run failed with" in message else STAGE_CREATE
    return Answer(True, stage, message, conclusive=not _broken(err)), None


def _dns_name(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower())[:63].strip("-")


REVISION_ONLY = ("containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds")
PROBES = ("readinessProbe", "livenessProbe", "startupProbe")


def pod_of(case: Case, stored: dict, level: str) -> dict:
    """The pod the case's object leads to: the revision's (the template's spec as Serving's
    defaulting webhook left it, without RevisionSpec's own fields and without probes, which
    deploy.go gives to queue-proxy) or the JobSink's Job's (its pod template)."""
    if case.kind == "Service":
        spec = copy.deepcopy(stored["spec"]["template"]["spec"])
        for key in REVISION_ONLY:
            spec.pop(key, None)
        for c in spec.get("containers") or []:
            for key in PROBES:
                c.pop(key, None)
        labels = {}
    else:
        template = stored["spec"]["job"]["spec"]["template"]
        spec = copy.deepcopy(template["spec"])
        labels = dict((template.get("metadata") or {}).get("labels") or {})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": _dns_name("pod-" + case.key.split("/", 1)[1]), "namespace": level_ns(level),
                         "labels": labels},
            "spec": spec}


def judge_pod(cluster, case: Case, stored: dict) -> Answer:
    """Pod Security at the case's level: only a PodSecurity refusal is an answer."""
    level = case.config.pod_security_level
    stage = f"Pod Security ({level}) on the pod, dry-run Pod in {level_ns(level)}"
    _, err = create(cluster, pod_of(case, stored, level))
    if err is None:
        return Answer(False, stage)
    message = _message(err)
    if "violates PodSecurity" in message and not _broken(err):
        return Answer(True, stage, message)
    return Answer(True, stage, "the Pod is refused for another reason: " + message, conclusive=False)


def judge_job_pod(cluster, case: Case, stored: dict) -> Answer:
    """The pod the Job controller creates for each event (kubernetes pkg/controller/job), judged
    by Kubernetes' pod validation, which checks more than a Job's pod template does
    (pkg/apis/core/validation/validation.go validateContainersOnlyForPod), in JUDGE_NS (no
    Pod Security)."""
    _, err = create(cluster, pod_of(case, stored, JUDGE_LEVEL))
    stage = f"the Job's pod (Kubernetes pod validation), dry-run Pod in {JUDGE_NS}"
    if err is None:
        return Answer(False, stage)
    return Answer(True, stage, _message(err), conclusive=not _broken(err))


def judge_placeholder_services(cluster, case: Case) -> Answer:
    """Dry-run the Kubernetes Services the route reconciler creates: one named like the Service,
    one per tag named by config-network tag-template (domains.go HostnameFromTemplate)."""
    name = case.obj["metadata"]["name"]
    hosts = [name] + [case.config.tag_template.replace("{{.Tag}}", t["tag"]).replace("{{.Name}}", name)
                      for t in case.obj["spec"].get("traffic") or [] if t.get("tag")]
    for host in hosts:
        svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": host, "namespace": JUDGE_NS},
               "spec": {"type": "ExternalName", "externalName": f"{name}.{JUDGE_NS}.svc.cluster.local",
                        "sessionAffinity": "None",
                        "ports": [{"name": "http2", "appProtocol": "kubernetes.io/h2c", "port": 80, "targetPort": 80}]}}
        _, err = create(cluster, svc)
        if err is not None:
            return Answer(True, STAGE_PLACEHOLDER, _message(err), conclusive=not _broken(err))
    return Answer(False, STAGE_PLACEHOLDER, f"Kubernetes Services {hosts} accepted")


def _registries(cases: list[Case]) -> list[str]:
    hosts = set()
    for c in cases:
        for ctr in c.obj["spec"]["template"]["spec"].get("containers") or []:
            image = ctr.get("image") or ""
            if "/" in image:
                hosts.add(image.split("/", 1)[0])
    return sorted(hosts)


def _failed_conditions(admin: kube.Kube, ns: str) -> str:
    out = []
    for plural in ("services", "configurations", "revisions", "routes"):
        for o in admin.get(f"/apis/serving.knative.dev/v1/namespaces/{ns}/{plural}").get("items", []):
            for c in (o.get("status") or {}).get("conditions") or []:
                if c.get("status") == "False":
                    out.append(f"{o['kind']} {o['metadata']['name']} {c['type']}=False {c.get('reason')}: "
                               f"{c.get('message')}")
    return "; ".join(out) or "no condition False"


def judge_revisions(cluster, cases: list[Case]) -> dict[str, Answer]:
    """Create each Service for real, in a namespace of its own, and wait for Knative's revision
    reconciler to create the revision's Deployment or to report that the API server refused it."""
    admin = cluster.admin
    namespaces = {c.key: _dns_name("rev-" + c.key.split("/", 1)[1]) for c in cases}
    answers: dict[str, Answer] = {}
    try:
        for c in cases:
            ns = namespaces[c.key]
            try:
                cluster.applier.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            except kube.ApiError as e:
                answers[c.key] = Answer(False, "creating a namespace for the revision stage", _message(e),
                                        conclusive=False)
                continue
            obj = copy.deepcopy(c.obj)
            obj["metadata"]["namespace"] = ns
            deadline = time.monotonic() + CONFIG_WAIT
            while True:
                _, err = create(cluster, obj, dry_run=False)
                if err is None or time.monotonic() > deadline:
                    break
                time.sleep(1)
            if err is not None:
                answers[c.key] = Answer(True, "real create (no dry run)", _message(err), conclusive=False)
        deadline = time.monotonic() + REVISION_WAIT
        pending = [c for c in cases if c.key not in answers]
        while pending:
            for c in list(pending):
                ns = namespaces[c.key]
                try:
                    deployments = admin.get(f"/apis/apps/v1/namespaces/{ns}/deployments").get("items", [])
                    events = admin.get(f"/api/v1/namespaces/{ns}/events").get("items", [])
                    configurations = admin.get(f"/apis/serving.knative.dev/v1/namespaces/{ns}/configurations")
                except kube.ApiError:
                    continue  # asked again in a second
                revision_failed = [cond.get("message") or "" for o in configurations.get("items", [])
                                   for cond in (o.get("status") or {}).get("conditions") or []
                                   if cond.get("status") == "False" and cond.get("reason") == "RevisionFailed"]
                if revision_failed:  # the API server refused the Revision itself: no Deployment follows
                    answers[c.key] = Answer(True, STAGE_REVISION, revision_failed[0])
                    pending.remove(c)
                    continue
                if deployments:
                    d = deployments[0]
                    answers[c.key] = Answer(False, STAGE_DEPLOYMENT, f"Deployment {d['metadata']['name']} created "
                                            f"(replicas {d['spec'].get('replicas')})")
                    pending.remove(c)
                    continue
                refused = [e["message"] for e in events if "failed to create deployment" in (e.get("message") or "")]
                if refused:
                    answers[c.key] = Answer(True, STAGE_DEPLOYMENT, refused[0])
                    pending.remove(c)
            if not pending:
                break
            if time.monotonic() > deadline:
                for c in pending:
                    try:
                        status = _failed_conditions(admin, namespaces[c.key])
                    except kube.ApiError as e:
                        status = _message(e)
                    answers[c.key] = Answer(False, STAGE_DEPLOYMENT, f"neither a Deployment nor its refusal after "
                                            f"{REVISION_WAIT:.0f}s: {status}", conclusive=False)
                break
            time.sleep(1)
    finally:
        for ns in namespaces.values():
            try:
                admin.request("DELETE", f"/api/v1/namespaces/{ns}")
            except kube.ApiError:
                pass
    return answers


# -- the config groups --------------------------------------------------------------------------

def _webhook_verdict(case: Case, cfg: rules.ClusterConfig) -> bool:
    """The ported answer without Pod Security (the webhook judges in a privileged namespace)."""
    return bool(rules.problems(case.obj, dataclasses.replace(cfg, pod_security_level="privileged")))


def wait_honoured(cluster, before: rules.ClusterConfig, after: rules.ClusterConfig, cases: list[Case],
                  notes: list[str]) -> None:
    """After the ConfigMaps went from `before` to `after`: retry the Service cases whose ported
    answer the change of a ConfigMap the webhook reads flips, until the webhook gives the new
    answer, up to CONFIG_WAIT."""
    mixed = dataclasses.replace(after, **{f: getattr(before, f) for f in WEBHOOK_FIELDS})
    if mixed == after:
        return
    witnesses = [(c, _webhook_verdict(c, after)) for c in cases
                 if c.kind == "Service" and _webhook_verdict(c, after) != _webhook_verdict(c, mixed)]
    what = json.dumps({f"{cm} {k}": v for (cm, k), v in (config_data(after) or config_data(before)).items()})
    what = ("back from " if after == DEFAULT else "") + what
    if not witnesses:
        time.sleep(3)
        notes.append(f"config {what}: no case shows the change to the webhook; waited 3 s")
        return
    deadline = time.monotonic() + CONFIG_WAIT
    while True:
        differ = [c.key for c, want in witnesses if judge_create(cluster, c)[0].refused != want]
        if not differ:
            return
        if time.monotonic() > deadline:
            notes.append(f"config {what}: after {CONFIG_WAIT:.0f}s the webhook still differs from the ported "
                         f"answer on {differ} (not honoured yet, or those rules differ)")
            return
        time.sleep(1)


def _has_pod(stored: dict) -> bool:
    spec = stored.get("spec") or {}
    if stored.get("kind") == "JobSink":
        spec = (spec.get("job") or {}).get("spec") or {}
    return isinstance((spec.get("template") or {}).get("spec"), dict)


def judge_case(cluster, case: Case) -> tuple[Answer, bool]:
    """The answer through the stages the case needs; True if the revision stage must decide."""
    answer, stored = judge_create(cluster, case)
    if not answer.conclusive:
        return answer, False
    if answer.refused:
        # A refusal by the webhook's own dry-run Pod happens on dry-run requests only: the
        # revision stage says what a real create leads to.
        return answer, case.kind == "Service" and answer.stage == STAGE_WEBHOOK_POD
    if case.kind in ("Service", "JobSink") and (not case.refused or rules.K8S_PSA in case.source) \
            and _has_pod(stored):
        pod = judge_pod(cluster, case, stored)
        if pod.refused or case.refused:
            return pod, False
    if not case.refused:
        return answer, False
    if case.kind == "Service":
        if "MakeK8sPlaceholderService" in case.source:
            return judge_placeholder_services(cluster, case), False
        return answer, True
    if case.kind == "JobSink" and _has_pod(stored):
        return judge_job_pod(cluster, case, stored), False
    return answer, False


def judge_all(cluster, serving: ServingConfig, cases: list[Case]) -> tuple[dict, list[str]]:
    groups: dict[rules.ClusterConfig, list[Case]] = {}
    for c in cases:
        groups.setdefault(group_key(c.config), []).append(c)
    order = [g for g in groups if g == DEFAULT] + sorted((g for g in groups if g != DEFAULT),
                                                          key=lambda g: json.dumps(sorted(config_data(g).items())))
    answers: dict[str, Answer] = {}
    warn: dict[str, Answer] = {}
    revision_work: dict[rules.ClusterConfig, list[Case]] = {}
    notes: list[str] = []
    for g in order:
        # Each group from Knative's defaults and back, so that the cases of one group show
        # every change to the webhook.
        if g != DEFAULT:
            try:
                serving.set(config_data(g))
            except kube.ApiError as e:  # Knative's config webhook refuses the settings
                for c in groups[g]:
                    answers[c.key] = Answer(True, "setting the config in knative-serving", _message(e),
                                            conclusive=False)
                serving.set({})
                continue
            wait_honoured(cluster, DEFAULT, g, groups[g], notes)
        for c in groups[g]:
            answer, needs_revision = judge_case(cluster, c)
            answers[c.key] = answer
            if needs_revision:
                revision_work.setdefault(g, []).append(c)
            if answer.refused and "strict decoding error" in answer.message:
                warn[c.key] = judge_create(cluster, c, strict=False)[0]
        if g != DEFAULT:
            serving.set({})
            wait_honoured(cluster, g, DEFAULT, groups[g], notes)
    for g, work in revision_work.items():
        skip = serving.original["config-deployment"].get("registries-skipping-tag-resolving", "")
        extras = {("config-autoscaler", "allow-zero-initial-scale"): "true",
                  ("config-autoscaler", "initial-scale"): "0",
                  ("config-deployment", "registries-skipping-tag-resolving"):
                      ",".join([r for r in skip.split(",") if r] + _registries(work))}
        try:
            serving.set({**config_data(g), **extras})
        except kube.ApiError as e:
            for c in work:
                answers[c.key] = Answer(answers[c.key].refused, answers[c.key].stage + "; then setting the config "
                                        "for the revision stage", _message(e), conclusive=False)
            continue
        time.sleep(5)  # the controllers' informers see the ConfigMaps
        for key, real in judge_revisions(cluster, work).items():
            first = answers[key]
            if first.refused:  # refused by the webhook's dry-run Pod: keep both answers
                answers[key] = Answer(real.refused, f"{first.stage}; then, created for real: {real.stage}",
                                      f"{first.message} || {real.message}", real.conclusive)
            else:
                answers[key] = real
    return {"answers": answers, "warn": warn}, notes


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serving_config(knative):
    """knative-serving's ConfigMaps, restored to the data they had when the module started."""
    serving = ServingConfig(knative.admin)
    yield serving
    serving.restore()


@pytest.fixture(scope="module")
def rules_namespaces(knative):
    """rules-privileged (where every object is judged) and rules-<level> for each Pod Security
    level the cases name, each with its default ServiceAccount and jobsink()'s."""
    levels = sorted({c.config.pod_security_level for c in all_cases()} | {JUDGE_LEVEL})
    names = [level_ns(level) for level in levels]
    for level, ns in zip(levels, names):
        knative.applier.apply({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": ns, "labels": {PSA_LABEL: level}}})
        knative.applier.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                               "metadata": {"name": JOB_SERVICE_ACCOUNT, "namespace": ns}})
        knative.wait(lambda ns=ns: knative.admin.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default"), 60,
                     f"the default ServiceAccount of {ns}")
    yield names
    for ns in names:
        try:
            knative.admin.request("DELETE", f"/api/v1/namespaces/{ns}")
        except kube.ApiError:
            pass


@pytest.fixture(scope="module")
def judged(knative, serving_config, rules_namespaces, tmp_path_factory):
    cases = all_cases()
    t0 = time.monotonic()
    result, notes = judge_all(knative, serving_config, cases)
    out = tmp_path_factory.getbasetemp() / "knative-webhook-answers.json"
    out.write_text(json.dumps({
        "seconds": round(time.monotonic() - t0, 1), "notes": notes,
        "cases": {c.key: {"ported": c.ported_text(), "config": {f"{cm} {k}": v for (cm, k), v in
                                                                 config_data(c.config).items()},
                          "pod_security_level": c.config.pod_security_level,
                          "real": dataclasses.asdict(result["answers"][c.key]),
                          **({"without_fieldValidation": dataclasses.asdict(result["warn"][c.key])}
                             if c.key in result["warn"] else {})}
                  for c in cases}}, indent=1))
    print(f"answers: {out}")
    return cases, result["answers"], notes, out


# -- tests ----------------------------------------------------------------------------------------

def test_every_cluster_setting_of_the_rules_maps_to_a_configmap_key():
    fields = {f.name for f in dataclasses.fields(rules.ClusterConfig)}
    assert fields == set(CONFIG_KEYS) | NOT_CONFIGMAPS, fields ^ (set(CONFIG_KEYS) | NOT_CONFIGMAPS)
    for c in all_cases():
        config_data(c.config)  # every config the cases use can be written


def test_the_cases_keep_their_ported_answer_in_the_test_namespace():
    """The namespace is the only change to the rules test's objects: the ported answer stays."""
    for c in all_cases():
        assert bool(c.ported) == c.refused, (c.key, c.ported_text())
        assert not c.refused or c.source, (c.key, c.ported_text())


def test_the_real_cluster_gives_every_ported_answer(judged):
    cases, answers, notes, out = judged
    differences = []
    for c in cases:
        real = answers[c.key]
        if real.refused != c.refused or not real.conclusive:
            verdict = ("INCONCLUSIVE" if not real.conclusive else "refused" if real.refused else "accepted")
            differences.append(f"{c.key}: ported {c.ported_text()}\n    real: {verdict} at {real.stage}"
                               + (f": {real.message}" if real.message else ""))
    summary = (f"{len(cases)} cases, {len(cases) - len(differences)} agree, {len(differences)} differ "
               f"(every answer: {out})")
    assert not differences, summary + "\n" + "\n".join(differences) + (
        "\nnotes:\n" + "\n".join(notes) if notes else "")
