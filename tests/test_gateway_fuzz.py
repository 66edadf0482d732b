"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): no 500, no crash.

One in-process node serves the tiny model with committees of one, so generated
requests that name it run for real. Schemathesis draws requests for every
operation in ``/openapi.json``, valid and invalid (hypothesis, derandomized:
the same cases each run), and sends them with a valid API key; every answer
must be a status the API means to give, with OpenAI's error shape under
``/v1``. Then the node must still be healthy and still answer.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import schemathesis
import trio
from hypothesis import HealthCheck
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from joynode.gateway import apikeys
from joynode.inference.engine import VllmEngine
from tests.factories import LIBP2P_TEARDOWN_LEAK, running_node
from tests.inference_fixtures import tiny_engine, tiny_model
from tests.test_consensus import consensus_home

__all__ = ["tiny_engine", "tiny_model"]

pytestmark = LIBP2P_TEARDOWN_LEAK

EXAMPLES = 30  # per operation and mode
# Requests that name the served model, so they reach consensus and the engine; more with
# JOYNODE_FUZZ_RUNS=N.
RUNS = int(os.environ.get("JOYNODE_FUZZ_RUNS", "20"))
OPENAI_ERROR = {"message", "type", "param", "code"}


def fuzz(base_url: str, key: str) -> tuple[list[str], dict[str, int]]:
    """Every operation, positive and negative cases: what went wrong, as lines, and how
    many requests each operation got."""
    schema = schemathesis.openapi.from_dict(httpx.get(base_url + "/openapi.json").json())
    headers = {"authorization": f"Bearer {key}"}
    problems: list[str] = []
    calls: dict[str, int] = {}

    def run(operation: Any, mode: GenerationMode, model: str | None = None) -> None:
        """``model``: put in every body, so the requests reach the engines."""
        strategy = operation.as_strategy(generation_mode=mode)
        if model is not None:
            strategy = strategy.map(partial(with_model, model))

        @hypothesis.settings(
            max_examples=EXAMPLES if model is None else RUNS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.generate],
        )
        @hypothesis.given(case=strategy)
        def check(case: Any) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=60)
            where = f"{case.method} {case.formatted_path} ({mode.value})"
            label = f"{case.method} {case.path}"
            calls[label] = calls.get(label, 0) + 1
            if response.status_code >= 500 and response.status_code != 503:
                problems.append(f"{where}: {response.status_code} {response.text[:300]}")
            elif case.path.startswith("/v1") and response.status_code >= 400:
                error = response.json().get("error")
                if not isinstance(error, dict) or set(error) != OPENAI_ERROR:
                    problems.append(f"{where}: not an OpenAI error: {response.text[:300]}")

        try:
            check()
        except hypothesis.errors.Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing in it to make invalid

    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the schema itself must be sound
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run(result.ok(), mode)
        if result.ok().method.upper() == "POST":
            run(result.ok(), GenerationMode.POSITIVE, "tiny")
    return problems, calls


def with_model(model: str, case: Any) -> Any:
    if isinstance(case.body, dict):
        case.body = {**case.body, "model": model}
    return case


async def test_the_http_api_fuzzed_from_its_schema_gives_no_500_and_keeps_serving(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    home = consensus_home(tmp_path / "n", tiny_model, None, commit_timeout_s=2)
    home.set("consensus", "committee_size", "1")
    async with running_node(home, {"tiny": tiny_engine}) as node:
        assert node.http.url is not None
        url = node.http.url
        key, _ = await node.state.write(lambda c: apikeys.create(c, "fuzz", 100_000, None))
        problems, calls = await trio.to_thread.run_sync(fuzz, url, key)
        assert problems == []
        # (an operation with nothing to vary is called once)
        fuzzed = ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models")
        assert all(calls[label] >= EXAMPLES for label in fuzzed[:2]), calls
        assert set(fuzzed) <= set(calls)
        health = await trio.to_thread.run_sync(httpx.get, url + "/healthz")
        assert health.json()["status"] == "ok"
        answer = await trio.to_thread.run_sync(
            lambda: httpx.post(
                url + "/v1/completions",
                json={"model": "tiny", "prompt": "Hello", "max_tokens": 4},
                headers={"authorization": f"Bearer {key}"},
                timeout=60,
            )
        )
        assert answer.status_code == 200, answer.text
