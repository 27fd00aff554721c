"""The cluster runtime's watch cache (control/runtime/knative_cache.py) against a real
kube-apiserver and etcd with the official Knative CRDs: the paged list, the watch's events,
read-your-writes, a dropped connection resumed, 410 Gone answered by a new list, a prompt stop.

The informer reaches the API server through `Cuttable`, a TCP forwarder the tests can cut
(every connection closed, new ones refused) and restore: the cluster is real, only the network
between it and the informer is played. The 410 test runs its own API server with the watch
cache off, so a watch is served from etcd, and compacts etcd while the informer is cut off: the
resourceVersion it resumes from is then gone, as after a long partition in a real cluster.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

import kube
from control.runtime.knative_cache import Informer, api_request, by_label, keep, resource_path

BINARY = kube.apiserver_binary()
NS = "cache-test"
LABEL = "modelplane.dev/model"
MANAGED = "app.kubernetes.io/managed-by=modelplane"

pytestmark = pytest.mark.cluster


def start_cluster(tmp_path_factory, extra_args=None, *, crds=True):
    if BINARY is None or not BINARY.is_file():
        pytest.skip(f"no kube-apiserver binary{f' at {BINARY}' if BINARY else ''}: run scripts/kube-apiserver.sh "
                    "(builds and caches it) or set MODELPLANE_KUBE_APISERVER")
    c = kube.Cluster(tmp_path_factory.mktemp("kube"), BINARY, extra_args=extra_args).start()
    try:
        if crds:
            c.install_crds(kube.crds_dir())
        c.admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    except Exception:
        print(c.log_tail())
        c.stop()
        raise
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory)
    yield c
    c.stop()


class Cuttable:
    """A TCP forwarder to `port` on loopback that can be cut and restored."""

    def __init__(self, port: int):
        self.target = port
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.open = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.open = False
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self):
        self.open = True

    def close(self):
        self.cut()
        self.server.close()


def client_via(cluster, port):
    api = cluster.api_client(cluster.admin_token)
    api.configuration.host = f"https://127.0.0.1:{port}"
    return api


SERVICES = resource_path("serving.knative.dev", "v1", "services", NS)
CONFIGMAPS = resource_path("", "v1", "configmaps", NS)


def service(name, model=None, *, managed=True, note="v1"):
    labels = {LABEL: model or name}
    if managed:
        labels["app.kubernetes.io/managed-by"] = "modelplane"
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NS, "labels": labels, "annotations": {"note": note}},
            "spec": {"template": {"spec": {"containers": [{"image": "registry.test/m:1"}]}}}}


def create(cluster, obj, path=SERVICES):
    return cluster.admin.request("POST", path, obj)


def until(check, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not met after {timeout}s")


def informer(cluster, *, port=None, path=SERVICES, **kw):
    api = client_via(cluster, port) if port else cluster.api_client(cluster.admin_token)
    kw.setdefault("selector", MANAGED)
    kw.setdefault("kind", "services")
    inf = Informer(api_request(api, path), **kw)
    inf._api = api  # closed with it below
    return inf


def stopped(inf):
    inf.stop()
    inf._api.close()


# -- the tests ----------------------------------------------------------------------------------

def test_paged_list_sees_every_managed_object(cluster):
    create(cluster, service("unmanaged-one", managed=False))
    for i in range(120):
        create(cluster, service(f"paged-{i:03d}", model=f"group-{i % 3}"))
    inf = informer(cluster, page_size=50, index=by_label(LABEL)).start()
    try:
        assert inf.wait_synced(30), inf.last_error
        names = dict(inf.items())
        assert len([n for n in names if n.startswith("paged-")]) == 120
        assert "unmanaged-one" not in names
        assert inf.pages == 3 and inf.lists == 1  # 120 objects, 50 a page: 3 requests
        assert len(inf.by_index("group-1")) == 40
        value = inf.get("paged-007")
        # the default transform: metadata kept (managedFields dropped), no spec
        assert value["metadata"]["labels"][LABEL] == "group-1" and "managedFields" not in value["metadata"]
        assert "spec" not in value and value["metadata"]["resourceVersion"]
    finally:
        stopped(inf)


def test_watch_applies_added_modified_deleted(cluster):
    inf = informer(cluster, transform=keep(spec=True), index=by_label(LABEL)).start()
    try:
        assert inf.wait_synced(30), inf.last_error
        gen = inf.generation
        created = create(cluster, service("watched", model="watch-model"))
        until(lambda: inf.get("watched") is not None, what="ADDED")
        assert inf.generation > gen
        assert inf.get("watched")["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/m:1"
        assert [v["metadata"]["name"] for v in inf.by_index("watch-model")] == ["watched"]

        gen = inf.generation
        cluster.admin.merge_patch(f"{SERVICES}/watched", {"metadata": {"annotations": {"note": "v2"},
                                                                       "labels": {LABEL: "moved"}}})
        until(lambda: inf.get("watched")["metadata"]["annotations"]["note"] == "v2", what="MODIFIED")
        assert inf.generation > gen
        assert inf.by_index("watch-model") == [] and len(inf.by_index("moved")) == 1
        assert inf.get("watched")["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]

        # an object leaving the selector is, for the watch, deleted
        cluster.admin.merge_patch(f"{SERVICES}/watched", {"metadata": {"labels": {
            "app.kubernetes.io/managed-by": "someone-else"}}})
        until(lambda: inf.get("watched") is None, what="DELETED (label removed)")
        create(cluster, service("doomed"))
        until(lambda: inf.get("doomed") is not None, what="ADDED")
        cluster.admin.request("DELETE", f"{SERVICES}/doomed")
        until(lambda: inf.get("doomed") is None, what="DELETED")
        assert inf.lists == 1 and inf.last_error is None
    finally:
        stopped(inf)


def test_stop_is_prompt_during_a_long_watch(cluster):
    inf = informer(cluster, watch_seconds=600).start()
    assert inf.wait_synced(30), inf.last_error
    until(lambda: inf.watches == 1 and inf._resp is not None, what="watch open")
    time.sleep(0.3)  # the thread is blocked reading the watch
    t0 = time.monotonic()
    inf.stop()
    took = time.monotonic() - t0
    assert not inf._thread.is_alive()
    assert took < 1.0, f"stop() took {took:.2f}s"
    inf._api.close()


def test_a_dropped_connection_resumes_from_its_resource_version(cluster):
    net = Cuttable(cluster.port)
    inf = informer(cluster, port=net.port, min_backoff=0.05, max_backoff=0.3).start()
    try:
        assert inf.wait_synced(30), inf.last_error
        create(cluster, service("before-cut"))
        until(lambda: inf.get("before-cut") is not None, what="ADDED")
        net.cut()
        until(lambda: inf.last_error is not None, what="the informer notices the cut")
        create(cluster, service("during-cut"))
        cluster.admin.request("DELETE", f"{SERVICES}/before-cut")
        time.sleep(0.5)
        assert inf.get("during-cut") is None and inf.get("before-cut") is not None  # cut off: nothing new
        net.restore()
        until(lambda: inf.get("during-cut") is not None and inf.get("before-cut") is None, what="resumed")
        assert inf.lists == 1  # the watch resumed: no second list
    finally:
        stopped(inf)
        net.close()


def test_read_your_writes_through_note_and_forget(cluster):
    net = Cuttable(cluster.port)
    inf = informer(cluster, port=net.port, min_backoff=0.05, max_backoff=0.3, index=by_label(LABEL)).start()
    try:
        assert inf.wait_synced(30), inf.last_error
        net.cut()  # the watch cannot deliver anything: only note() can show these writes
        until(lambda: inf.last_error is not None, what="the informer notices the cut")

        gen = inf.generation
        created = create(cluster, service("mine", model="mine-model"))
        assert inf.get("mine") is None
        inf.note(created)
        assert inf.get("mine")["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
        assert inf.generation > gen and [v["metadata"]["name"] for v in inf.by_index("mine-model")] == ["mine"]
        patched = cluster.admin.merge_patch(f"{SERVICES}/mine", {"metadata": {"annotations": {"note": "v2"}}})
        inf.note(patched)
        assert inf.get("mine")["metadata"]["annotations"]["note"] == "v2"

        net.restore()
        until(lambda: inf._overlay == {}, what="the watch catches up with the noted write")
        assert inf.get("mine")["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]

        # a note older than what the watch delivered is ignored: the watch's is newer
        newer = cluster.admin.merge_patch(f"{SERVICES}/mine", {"metadata": {"annotations": {"note": "v3"}}})
        until(lambda: inf.get("mine")["metadata"]["annotations"]["note"] == "v3", what="MODIFIED")
        inf.note(patched)
        assert inf.get("mine")["metadata"]["resourceVersion"] == newer["metadata"]["resourceVersion"]

        # a delete hidden at once, before its DELETED event
        net.cut()
        until(lambda: inf.last_error is not None and inf._resp is None, what="the informer notices the cut")
        deleted = cluster.admin.request("DELETE", f"{SERVICES}/mine")
        assert inf.get("mine") is not None
        inf.forget(deleted)
        assert inf.get("mine") is None and "mine" not in dict(inf.items()) and inf.by_index("mine-model") == []
        net.restore()
        until(lambda: inf._overlay == {} and inf._entries.get("mine") is None, what="DELETED")
        assert inf.get("mine") is None
    finally:
        stopped(inf)
        net.close()


def test_touched_since_names_what_changed_and_says_when_it_cannot(cluster):
    """The change log a list reader rebuilds from: the names and index keys each change touched
    (watch events, notes, forgets), nothing when nothing changed, and None when it cannot tell
    (a generation older than the last list, or one it never had)."""
    inf = informer(cluster, index=by_label(LABEL)).start()
    try:
        assert inf.wait_synced(30), inf.last_error
        start, nothing = inf.touched_since(inf.generation)
        assert nothing == set()
        created = create(cluster, service("touched-a", model="model-a"))
        inf.note(created)
        create(cluster, service("touched-b", model="model-b"))
        until(lambda: inf.get("touched-b") is not None, what="ADDED")
        now, touched = inf.touched_since(start)
        assert now > start and {"touched-a", "model-a", "touched-b", "model-b"} <= touched
        cluster.admin.merge_patch(f"{SERVICES}/touched-b", {"metadata": {"labels": {LABEL: "model-c"}}})
        until(lambda: [v["metadata"]["name"] for v in inf.by_index("model-c")] == ["touched-b"], what="a move")
        _, moved = inf.touched_since(now)
        assert {"touched-b", "model-b", "model-c"} <= moved and "model-a" not in moved   # from and to
        assert inf.touched_since(-1)[1] is None and inf.touched_since(10**9)[1] is None
        for name in ("touched-a", "touched-b"):
            cluster.admin.request("DELETE", f"{SERVICES}/{name}")
    finally:
        stopped(inf)


def test_a_note_the_watch_never_confirms_expires(cluster):
    net = Cuttable(cluster.port)
    inf = informer(cluster, port=net.port, min_backoff=0.05, max_backoff=0.3, note_ttl=0.5).start()
    try:
        assert inf.wait_synced(30), inf.last_error
        net.cut()
        until(lambda: inf.last_error is not None, what="the informer notices the cut")
        made = service("phantom")
        made["metadata"].update(resourceVersion="999999999", uid="not-in-the-cluster")
        inf.note(made)  # as if written, but the cluster never had it
        assert inf.get("phantom") is not None
        gen = inf.generation
        time.sleep(0.6)
        assert inf.get("phantom") is None and inf.generation > gen
    finally:
        stopped(inf)
        net.close()


# -- 410 Gone -----------------------------------------------------------------------------------

def etcd_url(cluster) -> str:
    args = cluster.procs[0].args
    return args[args.index("--listen-client-urls") + 1]


def etcd_call(url, path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_gone_lists_again(tmp_path_factory):
    # Watches served from etcd (no watch cache), so etcd's compaction decides what is gone.
    c = start_cluster(tmp_path_factory, ["--authorization-mode", "RBAC", "--disable-admission-plugins",
                                         "ServiceAccount", "--watch-cache=false"], crds=False)
    net = Cuttable(c.port)
    cm = {"apiVersion": "v1", "kind": "ConfigMap"}
    inf = Informer(api_request(client_via(c, net.port), CONFIGMAPS), kind="configmaps", selector=MANAGED,
                   transform=lambda obj: dict(obj.get("data") or {}), min_backoff=0.05, max_backoff=0.3)
    try:
        for name in ("kept", "removed", "changed"):
            create(c, {**cm, "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "modelplane"}},
                       "data": {"v": "1"}}, CONFIGMAPS)
        inf.start()
        assert inf.wait_synced(30), inf.last_error
        assert sorted(n for n, _ in inf.items()) == ["changed", "kept", "removed"]
        old_rv = inf.resource_version
        net.cut()
        until(lambda: inf.last_error is not None, what="the informer notices the cut")

        c.admin.request("DELETE", f"{CONFIGMAPS}/removed")
        c.admin.merge_patch(f"{CONFIGMAPS}/changed", {"data": {"v": "2"}})
        create(c, {**cm, "metadata": {"name": "added", "labels": {"app.kubernetes.io/managed-by": "modelplane"}}},
               CONFIGMAPS)
        url = etcd_url(c)
        revision = int(etcd_call(url, "/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        etcd_call(url, "/v3/kv/compaction", {"revision": str(revision), "physical": True})
        assert revision > int(old_rv)

        net.restore()
        until(lambda: inf.lists == 2, timeout=20, what="a second list after 410")
        until(lambda: sorted(n for n, _ in inf.items()) == ["added", "changed", "kept"], what="the listed state")
        assert inf.get("changed") == {"v": "2"} and inf.get("removed") is None
        # and the watch goes on from the new list
        create(c, {**cm, "metadata": {"name": "after", "labels": {"app.kubernetes.io/managed-by": "modelplane"}}},
               CONFIGMAPS)
        until(lambda: inf.get("after") is not None, what="ADDED after the new list")
        assert inf.lists == 2
    except Exception:
        print(c.log_tail())
        raise
    finally:
        inf.stop()
        net.close()
        c.stop()
