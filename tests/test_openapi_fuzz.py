"""Every route of the control API fuzzed from its own OpenAPI document (schemathesis).

A real control service with the local runtime, a real adapter behind the realtime fixture
model and the real GCS emulator. For each operation a bounded number of generated requests,
half of them aimed at models that exist; every answer must be no server error, a status the
document lists, and a body matching its schema.
"""
from __future__ import annotations

import random

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from control_helpers import AUTH, copy_fixture, running, settings_for

MODELS = ("echo-rt", "sum-batch")
EXAMPLES = 15  # per operation: about 350 requests in all
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_plane(tmp_path_factory, gcs):
    tmp = tmp_path_factory.mktemp("fuzz")
    config = settings_for(tmp, max_model_upload=256 * 1024, start_timeout=30)
    for name in MODELS:
        copy_fixture(name, config.models_dir)
    with running(config) as server:
        yield server


_aim = random.Random(20261122)


def test_no_route_answers_a_server_error_or_off_its_schema(fuzz_plane):
    schema = schemathesis.openapi.from_url(f"{fuzz_plane.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    calls = {"n": 0}

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            params = case.path_parameters or {}
            if "name" in params and case.method.upper() != "DELETE" and _aim.random() < 0.5:
                params["name"] = _aim.choice(MODELS)
                if "model" in params:
                    params["model"] = params["name"]
            calls["n"] += 1
            case.call_and_validate(base_url=fuzz_plane.url, headers=AUTH, checks=CHECKS, timeout=60)

        try:
            run()
        except Exception as e:  # keep going: report every operation that fails
            failures.append(f"{operation.label}: {str(e)[:1500]}")
    print(f"{calls['n']} requests over {len(operations)} operations")
    assert not failures, "\n\n".join(failures)
