"""Schemathesis against the real daemon: every documented operation, from valid and from
invalid data, answers no 500 (nor any 5xx but the providers' 502, 503 and 504), only
documented statuses and content types, and bodies that match the document (/openapi.json,
daemon/api/openapi.py).

The daemon runs on loopback with a fake provider serving model `m` connected, an admin key and
a consumer key. Schemathesis is synchronous (requests), so it runs in a worker thread while the
daemon runs in the test's Trio loop. Some cases of each inference route ask for model `m`, so
they are dispatched and their answers (JSON or SSE) checked. The mutating admin routes run
too: some of their cases name a real target (a spare key and provider token, the fake
provider, model `m`) instead of a generated id, so PATCH, rotate, revoke, drain and cooldowns
change real state; the fuzzer's own key is never a target,
and each test has its own daemon and store. The budget is `EXAMPLES` cases per operation and
mode, the same ones every run; `DINFER_FUZZ_API_EXAMPLES=N` runs N fresh random ones.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Final

import hypothesis
import schemathesis
import trio
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.consumer_harness import ADMIN, Api, create_key

# A larger budget from the environment is also a fresh random draw.
EXAMPLES: Final = int(os.environ.get("DINFER_FUZZ_API_EXAMPLES", "8"))
FIXED: Final = "DINFER_FUZZ_API_EXAMPLES" not in os.environ
CHECKS: Final = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# 502, 503 and 504 are the daemon's documented answers about its providers (they failed, none
# can serve the request, none answered in time), as a gateway's are; a 500 is its own failure.
CONFIG: Final = SchemathesisConfig.from_dict(
    {"checks": {"not_a_server_error": {"expected-statuses": ["2xx", "4xx", "502", "503", "504"]}}}
)
MODES: Final = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
SERVED_MODEL: Final = "m"  # the fake provider's


@dataclass
class Run:
    """What one schemathesis run did: cases sent and the failures, as their messages."""

    cases: int = 0
    failures: list[str] = field(default_factory=list)


def _settings() -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=FIXED,  # the same cases every run in CI: reproducible, and bounded
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )


def _fuzz(base_url: str, consumer: dict[str, str], targets: dict[str, str]) -> Run:
    run = Run()
    schema = schemathesis.openapi.from_url(
        f"{base_url}/openapi.json", config=CONFIG, timeout=10, headers=consumer
    )
    for result in schema.get_all_operations():
        operation = result.ok()
        admin = operation.path.startswith("/v1/admin/")
        headers = ADMIN if admin else consumer
        real = {name: targets[name] for name in re.findall(r"\{(\w+)\}", operation.path)}
        for mode in MODES:
            strategies = [operation.as_strategy(generation_mode=mode)]
            if real and mode is GenerationMode.POSITIVE:
                strategies.append(operation.as_strategy(generation_mode=mode, path_parameters=real))
            if operation.body and mode is GenerationMode.POSITIVE:
                strategies.append(operation.as_strategy(generation_mode=mode).map(_served))
            try:
                _run_operation(run, st.one_of(strategies), base_url, headers)
            except hypothesis.errors.Unsatisfiable:
                # Nothing to make invalid: an operation without parameters or a body.
                assert mode is GenerationMode.NEGATIVE, operation.label
    return run


def _served(case: Any) -> Any:
    """The case asking for the fake's model: dispatched, answered, its success shape checked."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = SERVED_MODEL
    return case


def _run_operation(run: Run, cases: Any, base_url: str, headers: dict[str, str]) -> None:
    @_settings()
    @hypothesis.given(case=cases)
    def check(case: Any) -> None:
        run.cases += 1
        try:
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=10)
        except (AssertionError, FailureGroup) as failure:  # every failure, not only the first
            notes = "\n".join(getattr(failure, "__notes__", ()))
            run.failures.append(f"{case.operation.label}: {failure!r}\n{notes}")

    check()


async def test_schemathesis_finds_no_defect(api: Api) -> None:
    fake, *_ = await api.connect(api.fake())
    spare_id, _ = await create_key(api.client, "a target for the mutating routes")
    token = await api.client.post("/v1/admin/provider-tokens", json={"name": "t"}, headers=ADMIN)
    targets = {
        "key_id": spare_id,
        "token_id": token.json()["id"],
        "provider_id": fake.provider_id,
        "model": SERVED_MODEL,
    }
    with trio.fail_after(240 * max(1, EXAMPLES // 8)):
        run = await trio.to_thread.run_sync(
            _fuzz, api.daemon.base_url, api.auth, targets, abandon_on_cancel=True
        )
    served = len(fake.received)
    failed = len(run.failures)
    print(f"schemathesis: {run.cases} cases, {served} served by the fake, {failed} failures")
    assert run.cases >= EXAMPLES * 20
    assert served > 0  # success shapes were checked too, not only refusals
    assert not run.failures, "\n\n".join(run.failures)
    # The fuzzer's own key still works: the run never revoked or limited it.
    response = await api.client.get("/v1/models", headers=api.auth)
    assert response.status_code == 200, response.text
