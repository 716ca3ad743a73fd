"""Schema fuzzing: schemathesis sends generated requests from /openapi.json; none may get a 5xx, and every
JSON 200 must match its documented response model (`conch.serving.protocol`)."""

import pytest

schemathesis = pytest.importorskip("schemathesis")  # listed in requirements.txt: this skip never hides in CI

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import response_schema_conformance  # noqa: E402

from .server import running_server  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_url(tiny_r1):
    with running_server(tiny_r1, "--max_tokens_limit", "8", "--default_max_tokens", "4") as url:
        yield url


def test_no_5xx_from_generated_requests(fuzz_url):
    schema = schemathesis.openapi.from_url(fuzz_url + "/openapi.json")
    failures, calls = [], []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case):
            response = case.call(base_url=fuzz_url, timeout=30)
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}")
            elif response.status_code == 200 and "application/json" in str(response.headers.get("content-type")):
                # a body off its documented model fails here, with schemathesis' report and the falsifying example
                case.validate_response(response, checks=[response_schema_conformance])

        check()
    assert not failures, "\n".join(failures[:5])
    assert len(calls) >= 50 and any(code == 200 for code in calls) and any(400 <= c < 500 for c in calls)
