"""Schema-level fuzzing of the OpenAPI spec (schemathesis): no input the spec allows, and no input
it forbids, gets a 5xx. Bounded: a few endpoints, few examples each (CPU CI)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

PATHS = r"^/v1/(completions|chat/completions|models)$|^/v1/models/\{model_id\}$|^/(health|ready|metrics)$"
EXAMPLES = {"/v1/completions": 15, "/v1/chat/completions": 15}


def test_no_server_errors(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json").include(path_regex=PATHS)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    seen = []
    for op in ops:
        for mode in ("positive", "negative"):
            strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

            @given(case=strategy)
            @settings(max_examples=EXAMPLES.get(op.path, 5), deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                    case.body["max_tokens"] = min(case.body["max_tokens"], 16)  # keep CPU generation short
                response = case.call(base_url=server.url, timeout=60)
                seen.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
                if response.status_code >= 400 and case.path.startswith("/v1/"):
                    assert {"message", "type", "param", "code"} <= set(response.json()["error"])

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
                assert mode == "negative"
    assert any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)
