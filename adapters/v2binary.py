"""The Open Inference Protocol's binary tensor data extension (what tritonclient sends by default).

A request whose `Inference-Header-Content-Length` header is N carries the JSON inference
request in its first N bytes and, after it, the raw tensors of the inputs whose
`parameters.binary_data_size` is set, in input order: little-endian fixed-size elements, or
for BYTES a 4-byte little-endian length before each element. Outputs are answered the same
way when the request asks (`parameters.binary_data` on a requested output, or
`parameters.binary_data_output` on the request).

Spec: Triton's `docs/protocol/extension_binary_data.md` (the extension KServe's v2 REST
protocol leaves to servers); tritonclient's `http/_utils.py` is the client side.
"""
from __future__ import annotations

import math
import struct
from typing import Any

HEADER = "Inference-Header-Content-Length"
EXTENSION = "binary_tensor_data"
_FIXED = {"BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b", "INT16": "h",
          "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d"}
MAX_ELEMENTS = 10_000_000


class BinaryError(ValueError):
    """A binary request that does not follow the extension: the message names the input."""


def _count(shape: Any, name: str) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BinaryError(f"input {name!r}: expected a shape of non-negative integers; got {shape!r}"[:300])
    n = math.prod(shape) if shape else 1
    if n > MAX_ELEMENTS:
        raise BinaryError(f"input {name!r}: {n} elements is more than {MAX_ELEMENTS:,}")
    return n


def split(body: bytes, header_length: str) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body."""
    try:
        n = int(header_length)
    except ValueError:
        raise BinaryError(f"{HEADER}: expected a byte count; got {header_length[:40]!r}") from None
    if n < 0 or n > len(body):
        raise BinaryError(f"{HEADER} is {n} but the body holds {len(body)} bytes")
    return body[:n], body[n:]


def decode_inputs(doc: dict, binary: bytes) -> None:
    """Fill `data` of every input that has `parameters.binary_data_size` from `binary`, in place."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        return
    offset = 0
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            continue
        params = inp.get("parameters")
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        name = inp.get("name") if isinstance(inp.get("name"), str) else f"inputs[{i}]"
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BinaryError(f"input {name!r}: parameters.binary_data_size must be a byte count")
        if "data" in inp:
            raise BinaryError(f"input {name!r} has both data and parameters.binary_data_size")
        chunk = binary[offset:offset + size]
        if len(chunk) != size:
            raise BinaryError(f"input {name!r}: binary_data_size {size} runs past the end of the body")
        offset += size
        datatype = inp.get("datatype")
        n = _count(inp.get("shape"), name)
        if datatype == "BYTES":
            inp["data"] = _bytes_elements(chunk, n, name)
        elif datatype in _FIXED:
            code = _FIXED[datatype]
            itemsize = struct.calcsize("<" + code)
            if size != n * itemsize:
                raise BinaryError(f"input {name!r}: shape {inp.get('shape')} of {datatype} needs {n * itemsize} bytes; "
                                  f"binary_data_size is {size}")
            inp["data"] = list(struct.unpack(f"<{n}{code}", chunk))
        else:
            raise BinaryError(f"input {name!r}: datatype {str(datatype)[:20]!r} is not one the protocol defines")
        del params["binary_data_size"]
    if offset != len(binary):
        raise BinaryError(f"{len(binary) - offset} byte(s) after the last binary input belong to no input")


def _bytes_elements(chunk: bytes, n: int, name: str) -> list[str]:
    out, pos = [], 0
    for k in range(n):
        if pos + 4 > len(chunk):
            raise BinaryError(f"input {name!r}: BYTES element {k} has no length prefix")
        (length,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        raw = chunk[pos:pos + length]
        if len(raw) != length:
            raise BinaryError(f"input {name!r}: BYTES element {k} runs past binary_data_size")
        pos += length
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BinaryError(f"input {name!r}: BYTES element {k} is not UTF-8 text") from None
    if pos != len(chunk):
        raise BinaryError(f"input {name!r}: binary_data_size holds more than {n} BYTES element(s)")
    return out


def wants_binary(doc: dict, output: str) -> bool:
    """Whether the request asks for `output` as binary data."""
    params = doc.get("parameters")
    default = bool(params.get("binary_data_output")) if isinstance(params, dict) else False
    outputs = doc.get("outputs")
    if isinstance(outputs, list):
        for o in outputs:
            if isinstance(o, dict) and o.get("name") == output:
                p = o.get("parameters")
                if isinstance(p, dict) and "binary_data" in p:
                    return bool(p["binary_data"])
    return default


def encode_fp64(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def encode(values: list, datatype: str) -> bytes | None:
    """`values` as the raw tensor of `datatype` (FP64, INT64, BOOL or BYTES); None when a value
    is missing (None), which only the JSON form can say."""
    if any(v is None for v in values):
        return None
    if datatype == "BYTES":
        out = bytearray()
        for v in values:
            raw = v.encode("utf-8")
            out += struct.pack("<I", len(raw)) + raw
        return bytes(out)
    code = _FIXED[datatype]
    return struct.pack(f"<{len(values)}{code}", *values)
