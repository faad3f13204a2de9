"""Schemathesis against the live /openapi.json: no 500 and no response outside the schema.

Bounded: a fixed number of generated cases per operation and mode (valid and invalid inputs),
derandomised so a failure reproduces. The model name is an enum in the schema, so valid
/v1/extract cases really run the tiny GPT-2.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(300)

EXAMPLES = {"positive": 6, "negative": 4}


def test_openapi_schema_fuzz_finds_no_500_and_no_schema_violation(open_app):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_headers_conformance, response_schema_conformance,
                                                   status_code_conformance)

    schema = schemathesis.openapi.from_url(f"{open_app.url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 10  # every route of http.create_app
    calls = 0
    for operation in operations:
        for mode, count in EXAMPLES.items():
            generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
            mode_checks = checks + ([negative_data_rejection] if mode == "negative" else [])

            @settings(max_examples=count, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=generation))
            def run(case):
                nonlocal calls
                calls += 1
                case.call_and_validate(base_url=open_app.url, checks=mode_checks, timeout=60)

            try:
                run()
            except Unsatisfiable:  # no parameters and no body: nothing invalid to send
                assert mode == "negative"
            except Exception as error:  # name the operation: hypothesis' report alone does not
                raise AssertionError(f"{operation.method.upper()} {operation.path} ({mode}): {error}") from error
    assert calls >= len(operations)
