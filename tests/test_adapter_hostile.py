"""The realtime adapter attacked: what a bounded fuzzer found answering 5xx, the Open Inference
Protocol's own errors, tritonclient's binary tensors, oversized bodies, and a model that dies."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from test_adapter_realtime import FIXTURE, MODEL, ROOT, child_env, free_port, stop, wait_http


class Adapter:
    """The fixture model behind a real adapter process; `limits` replaces the manifest's limits."""

    def __init__(self, tmp: Path, limits: str | None = None):
        folder = Path(shutil.copytree(FIXTURE, tmp / f"model-{free_port()}"))
        if limits:
            text = (folder / "model.yaml").read_text().splitlines()
            (folder / "model.yaml").write_text("\n".join(x for x in text if not x.startswith("limits:"))
                                               + f"\nlimits: {limits}\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.err = tmp / f"adapter-{self.port}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "adapters", "serve", str(folder), "--port", str(self.port)],
                                         cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
        wait_http(self.url + "/v2/health/ready", proc=self.proc)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    a = Adapter(tmp_path_factory.mktemp("hostile"), limits="{timeout: 5s, max_rows: 50, max_body: 1Mi}")
    yield a
    stop(a.proc)


def post(adapter, path: str, body: bytes | str, content_type: str = "application/json", **headers) -> requests.Response:
    return requests.post(adapter.url + path, data=body, headers={"Content-Type": content_type, **headers}, timeout=15)


def json_error(r: requests.Response, status: int | tuple) -> str:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body["error"], str) and "Traceback" not in r.text and "/work" not in r.text
    return body["error"]


INFER = f"/v2/models/{MODEL}/infer"


# -- the fuzzer's classes --------------------------------------------------------------------------

def test_deep_nesting_is_a_400_not_a_recursion_error(adapter):
    deep = "[" * 100_000 + "]" * 100_000
    assert "nests" in json_error(post(adapter, "/predict", '{"rows": ' + deep + "}"), 400)
    assert "nests" in json_error(post(adapter, INFER, '{"inputs": ' + deep + "}"), 400)


def test_an_integer_past_floats_range_is_a_422_not_a_500(adapter):
    huge = "9" * 400
    r = post(adapter, "/predict", '{"rows": [{"x": ' + huge + ', "region": "west"}]}')
    assert "finite" in json_error(r, 422) or "finite" in r.json()["problems"][0]["error"]
    assert r.json()["problems"][0]["field"] == "x"
    rows = ", ".join(['{"x": 1, "region": "west"}'] * 20 + ['{"x": ' + huge + ', "region": "east"}'])
    r = post(adapter, "/predict", '{"rows": [' + rows + ']}')  # many rows: the column-at-a-time path first
    json_error(r, 422)
    assert r.json()["problems"] == [{"row": 21, "field": "x", "error": r.json()["problems"][0]["error"]}]
    r = post(adapter, INFER, '{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [' + huge + ']},'
                             ' {"name": "region", "shape": [1], "datatype": "BYTES", "data": ["west"]}]}')
    assert "'x'" in json_error(r, 400)


def test_a_lone_surrogate_is_a_400_not_a_500(adapter):
    r = post(adapter, "/predict", '{"rows": [{"x": 1, "region": "west", "\\ud800": 1}]}')
    assert "surrogate" in json_error(r, 400)
    r = post(adapter, INFER, '{"id": "\\ud800", "inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}]}')
    assert "surrogate" in json_error(r, 400)
    r = post(adapter, INFER, '{"inputs": [{"name": "\\udfff", "shape": [1], "datatype": "FP64", "data": [1]}]}')
    json_error(r, 400)
    assert "Traceback" not in adapter.stderr()


def test_hostile_csv_bodies_are_400s_naming_the_line(adapter):
    huge = "x,region\n1,west\n" + '"' + "9" * 140_000 + '",east\n'
    assert "line" in json_error(post(adapter, "/predict", huge, "text/csv"), 400)
    bare_cr = 'x,region\n1,west\n"2\r5,east\n'
    json_error(post(adapter, "/predict", bare_cr, "text/csv"), (400, 422))
    assert json_error(post(adapter, "/predict", b"x,region\n1,w\xffst\n", "text/csv"), 400).startswith("CSV body is not UTF-8")


def test_a_chunked_body_past_max_body_is_refused_while_streaming(adapter):
    def chunks():
        yield b'{"rows": ['
        for _ in range(40):
            yield b'{"x": 1, "region": "west"},' * 1000
        yield b"]}"

    r = requests.post(adapter.url + "/predict", data=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413


# -- Content-Encoding ------------------------------------------------------------------------------

ROWS = b'{"rows": [{"x": 1, "region": "west"}, {"x": 2.5, "region": "east"}]}'


def _vm_hwm_kib(pid: int) -> int:
    """The process's peak resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("coding, encode", [
    ("gzip", lambda b: __import__("gzip").compress(b)),
    ("x-gzip", lambda b: __import__("gzip").compress(b)),
    ("deflate", lambda b: __import__("zlib").compress(b)),
    ("identity", lambda b: b),
    ("GZip, identity", lambda b: __import__("gzip").compress(b)),
], ids=["gzip", "x-gzip", "deflate", "identity", "gzip-then-identity"])
def test_a_compressed_body_is_inflated_before_it_is_read(adapter, coding, encode):
    r = post(adapter, "/predict", encode(ROWS), **{"Content-Encoding": coding})
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == [2.0, 5.0]


def test_a_compressed_v2_request_is_inflated_too(adapter):
    import gzip

    doc = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [3]},
                      {"name": "region", "shape": [1], "datatype": "BYTES", "data": ["west"]}]}
    r = post(adapter, INFER, gzip.compress(json.dumps(doc).encode()), **{"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [6.0]


def test_a_broken_compressed_body_is_a_400_naming_the_encoding(adapter):
    import gzip
    import zlib

    cut = gzip.compress(ROWS)[:-6]    # its CRC and length trailer gone
    assert "gzip" in json_error(post(adapter, "/predict", cut, **{"Content-Encoding": "gzip"}), 400)
    assert "deflate" in json_error(post(adapter, "/predict", zlib.compress(ROWS)[:-3],
                                        **{"Content-Encoding": "deflate"}), 400)
    for coding in ("gzip", "deflate"):
        error = json_error(post(adapter, "/predict", ROWS, **{"Content-Encoding": coding}), 400)
        assert coding in error, error
    trailing = gzip.compress(ROWS) + b"garbage"
    assert "gzip" in json_error(post(adapter, "/predict", trailing, **{"Content-Encoding": "gzip"}), 400)
    raw_deflate = zlib.compressobj(wbits=-15)
    raw = raw_deflate.compress(ROWS) + raw_deflate.flush()
    assert "deflate" in json_error(post(adapter, "/predict", raw, **{"Content-Encoding": "deflate"}), 400)
    assert "gzip" in json_error(post(adapter, INFER, cut, **{"Content-Encoding": "gzip"}), 400)


def test_a_gzip_bomb_is_a_413_without_inflating_past_the_cap(adapter):
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(256)) + packer.flush()   # 256 MiB of zeros
    assert len(bomb) < 1 << 20           # under max_body as sent
    before = _vm_hwm_kib(adapter.proc.pid)
    error = json_error(post(adapter, "/predict", bomb, **{"Content-Encoding": "gzip"}), 413)
    assert "gzip" in error and "max_body" in error, error
    grew_mib = (_vm_hwm_kib(adapter.proc.pid) - before) / 1024
    assert grew_mib < 32, f"the adapter's peak memory grew by {grew_mib:.0f} MiB"
    r = post(adapter, "/predict", ROWS)     # and it still serves
    assert r.status_code == 200


def test_an_unsupported_content_encoding_is_a_415_naming_what_is_accepted(adapter):
    for coding in ("br", "compress", "zstd", "gzip, gzip", "chunked"):
        error = json_error(post(adapter, "/predict", ROWS, **{"Content-Encoding": coding}), 415)
        assert "gzip" in error and "deflate" in error, error
    assert "br" in json_error(post(adapter, INFER, b"{}", **{"Content-Encoding": "br"}), 415)


# -- the protocol's own answers --------------------------------------------------------------------

def test_unknown_routes_and_methods_answer_json_404_and_405(adapter):
    assert "no route" in json_error(requests.get(adapter.url + "/nope", timeout=5), 404)
    r = requests.delete(adapter.url + "/predict", timeout=5)
    assert "not allowed" in json_error(r, 405) and "POST" in r.headers["Allow"]
    json_error(requests.get(adapter.url + INFER, timeout=5), 405)
    json_error(requests.get(adapter.url + f"/v2/models/{MODEL}/config", timeout=5), 404)
    meta = requests.get(adapter.url + "/v2", timeout=5).json()
    assert meta["extensions"] == ["binary_tensor_data"] and meta["version"] == "2"


def test_tritonclient_with_its_default_binary_tensors(adapter):
    np = pytest.importorskip("numpy")
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{adapter.port}")
    try:
        assert client.is_server_live() and client.is_model_ready(MODEL)
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        assert [i["name"] for i in client.get_model_metadata(MODEL)["inputs"]] == ["x", "n", "region", "member"]
        x = httpclient.InferInput("x", [3], "FP64")
        x.set_data_from_numpy(np.array([1.0, 2.5, -3.0]))  # binary_data=True: tritonclient's default
        region = httpclient.InferInput("region", [3], "BYTES")
        region.set_data_from_numpy(np.array([b"west", b"east", b"west"], dtype=np.object_))
        out = httpclient.InferRequestedOutput("score")  # binary_data=True by default
        result = client.infer(MODEL, [x, region], outputs=[out], request_id="r-1")
        assert result.as_numpy("score").ravel().tolist() == [2.0, 5.0, -6.0]
        assert result.get_response()["id"] == "r-1"
        # without asking for outputs: answered as JSON data
        result = client.infer(MODEL, [x, region])
        assert result.as_numpy("score").ravel().tolist() == [2.0, 5.0, -6.0]
        bad = httpclient.InferInput("region", [3], "BYTES")
        bad.set_data_from_numpy(np.array([b"west", b"mars", b"west"], dtype=np.object_))
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [x, bad])
        assert "input 'region' row 2" in str(info.value)
        with pytest.raises(InferenceServerException) as info:
            client.get_model_config(MODEL)
        assert "no route" in str(info.value)
    finally:
        client.close()


def test_binary_requests_that_break_the_extension_are_400s(adapter):
    head = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP64",
                                   "parameters": {"binary_data_size": 16}},
                                  {"name": "region", "shape": [2], "datatype": "BYTES", "data": ["west", "east"]}]})
    for header, tail, needle in [
        (str(len(head)), b"\0" * 8, "runs past the end"),
        (str(len(head)), b"\0" * 24, "belong to no input"),
        (str(len(head) + 100), b"\0" * 16, "the body holds"),
        ("twelve", b"\0" * 16, "byte count"),
    ]:
        r = post(adapter, INFER, head.encode() + tail, "application/octet-stream", **{"Inference-Header-Content-Length": header})
        assert needle in json_error(r, 400)


# -- a bounded fuzzer ---------------------------------------------------------------------------------

def _mutate(rng: random.Random, value):
    choices = [None, True, -1, 1e308, float("nan"), "", "x" * rng.randint(0, 300), [], {}, [[[]]], "\u00e9",
               {"rows": None}, 2**70]
    if isinstance(value, dict) and value and rng.random() < 0.6:
        key = rng.choice(list(value))
        copy = dict(value)
        copy[key] = _mutate(rng, value[key]) if rng.random() < 0.7 else rng.choice(choices)
        if rng.random() < 0.2:
            copy[rng.choice(["extra", "\u0000", "x" * 50])] = rng.choice(choices)
        return copy
    if isinstance(value, list) and value and rng.random() < 0.6:
        copy = list(value)
        i = rng.randrange(len(copy))
        copy[i] = _mutate(rng, copy[i])
        return copy
    return rng.choice(choices)


def test_a_bounded_fuzzer_finds_no_server_error(adapter):
    rng = random.Random(20261122)
    predict = {"rows": [{"x": 1.5, "region": "west", "n": 2, "member": True}]}
    infer = {"id": "a", "inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]},
                                   {"name": "region", "shape": [1], "datatype": "BYTES", "data": ["east"]}],
             "outputs": [{"name": "score", "parameters": {"binary_data": False}}]}
    seen = {}
    for i in range(400):
        path, base = (("/predict", predict) if i % 2 else (INFER, infer))
        body = json.dumps(_mutate(rng, base), allow_nan=True)
        if rng.random() < 0.1:
            body = body[: rng.randrange(len(body) + 1)]  # truncated
        r = post(adapter, path, body)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, body[:300], r.text[:300])
        if r.status_code != 200:
            json_error(r, r.status_code)
    assert seen.get(200) and sum(v for k, v in seen.items() if k >= 400) > 100, seen


# -- a model that dies ---------------------------------------------------------------------------------

def _model_pid(adapter_pid: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == adapter_pid:
                return int(entry)
    raise AssertionError("the adapter has no model process")


def test_a_killed_model_takes_the_adapter_down_at_once_saying_why(tmp_path):
    a = Adapter(tmp_path)
    try:
        model = _model_pid(a.proc.pid)
        os.kill(model, signal.SIGKILL)
        started = time.monotonic()
        code = a.proc.wait(timeout=30)
        took = time.monotonic() - started
        assert code != 0
        assert "was killed by SIGKILL" in a.stderr() or "SIGKILL" in a.stderr(), a.stderr()[-2000:]
        print(f"adapter exited {took * 1000:.0f} ms after its model was killed")  # a figure, not an assertion
    finally:
        stop(a.proc)


def test_a_model_killed_under_load_takes_the_adapter_down_every_time(tmp_path):
    """Five times over: clients keep sending while the model is killed; the adapter exits within
    seconds, whatever its health poll and its requests were doing at that instant."""
    import threading

    for trial in range(5):
        a = Adapter(tmp_path)
        stop_clients = threading.Event()

        def client():
            session = requests.Session()
            while not stop_clients.is_set():
                try:
                    session.post(a.url + "/predict", json={"rows": [{"x": 1, "region": "west"}]}, timeout=5)
                except requests.RequestException:
                    time.sleep(0.002)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            os.kill(_model_pid(a.proc.pid), signal.SIGKILL)
            code = a.proc.wait(timeout=10)
            assert code == 1 and "SIGKILL" in a.stderr(), a.stderr()[-2000:]
        finally:
            stop_clients.set()
            for t in threads:
                t.join()
            stop(a.proc)


def test_a_bug_answers_a_request_id_and_logs_the_traceback_under_it(caplog):
    """A bug inside a route, served for real on loopback: the client gets a request id and no detail,
    the log gets the traceback under that id."""
    import asyncio

    from adapters.manifest import load_manifest
    from adapters.realtime import RealtimeAdapter

    class Broken:
        def split(self, rows, header=None):
            raise ZeroDivisionError("secret detail /srv/model/weights.bin")

    async def run():
        adapter = RealtimeAdapter(load_manifest(FIXTURE, check_files=False), "http://127.0.0.1:9")
        adapter.validator = Broken()
        server = adapter.server()
        port = free_port()
        await server.start("127.0.0.1", port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b'{"rows": [{"x": 1, "region": "west"}]}'
            writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Request-Id: trace-7\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        finally:
            await server.stop(1.0)
        head, _, text = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), json.loads(text), headers.get("x-request-id")

    status, body, header = asyncio.run(run())
    assert status == 500 and body["request_id"] == "trace-7" == header
    assert "secret" not in body["error"] and "/srv" not in body["error"] and "trace-7" in body["error"]
    logged = [r for r in caplog.records if "trace-7" in r.getMessage()]
    assert logged and logged[0].exc_info[0] is ZeroDivisionError
