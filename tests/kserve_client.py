"""The kserve Python client's v2 REST client (`kserve.InferenceRESTClient`) against a running
control service, given only its base URL: run by tests/test_oip_clients.py with the interpreter
of a virtualenv that holds kserve (kserve pins cloudevents below 2, which the project needs, so
it cannot share the project's virtualenv).

    python kserve_client.py BASE_URL MODEL < rows.json   (the bearer token in MODELPLANE_TOKEN)

`rows.json`: {"columns": {feature: [values...]}, "datatypes": {feature: "FP64"|"INT64"|"BYTES"|"BOOL"}}.
Prints one JSON document: what the client answered for each call.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

NUMPY = {"FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_, "BYTES": np.object_}


def _outputs(response) -> list[dict]:
    return [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape),
             "data": [x.decode() if isinstance(x, bytes) else x for x in o.as_numpy().reshape(-1).tolist()]}
            for o in response.outputs]


async def main(base_url: str, model: str) -> dict:
    spec = json.load(sys.stdin)
    columns, datatypes = spec["columns"], spec["datatypes"]
    headers = {"Authorization": f"Bearer {os.environ['MODELPLANE_TOKEN']}"}
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    out: dict = {}
    try:
        out["server_live"] = await client.is_server_live(base_url, headers=headers)
        out["server_ready"] = await client.is_server_ready(base_url, headers=headers)
        out["model_ready"] = await client.is_model_ready(base_url, model, headers=headers)

        # the inputs as JSON lists
        inputs = [InferInput(name, [len(values)], datatypes[name], data=values) for name, values in columns.items()]
        answer = await client.infer(base_url, InferRequest(model, inputs, request_id="kserve-json"),
                                    model_name=model, headers=headers)
        out["json"] = {"id": answer.id, "model_name": answer.model_name, "model_version": answer.model_version,
                       "outputs": _outputs(answer)}

        # the same inputs as binary tensors (the protocol's binary tensor data extension)
        inputs = []
        for name, values in columns.items():
            tensor = InferInput(name, [len(values)], datatypes[name])
            array = np.array([v.encode() for v in values] if datatypes[name] == "BYTES" else values,
                             dtype=NUMPY[datatypes[name]])
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        answer = await client.infer(base_url, InferRequest(model, inputs, request_id="kserve-binary"),
                                    model_name=model, headers=headers)
        out["binary"] = {"id": answer.id, "outputs": _outputs(answer)}

        # a model the service does not have: the client raises the service's error
        try:
            await client.infer(base_url, InferRequest("no-such-model", inputs), model_name="no-such-model",
                               headers=headers)
            out["unknown_model"] = "answered"
        except Exception as e:   # noqa: BLE001 — httpx.HTTPStatusError, reported as text
            out["unknown_model"] = f"{type(e).__name__}: {e}"
        # without the token: not ready, for this client (it reads any status but 2xx as "no")
        out["model_ready_without_token"] = await client.is_model_ready(base_url, model)
    finally:
        await client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
