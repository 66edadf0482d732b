"""Inference through a node: the control socket, heartbeats, and a real SmolLM2 process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from joynode.control import jsonrpc
from joynode.control.client import ControlClient
from joynode.control.jsonrpc import RpcError
from joynode.inference.engine import VllmEngine
from joynode.inference.models import model_id
from joynode.messages import output_hash
from tests.factories import NodeHome, make_home, node_process, run_cli, running_node
from tests.inference_fixtures import smollm2_model, tiny_engine, tiny_model

__all__ = ["smollm2_model", "tiny_engine", "tiny_model"]


def serve_model(home: NodeHome, name: str, path: Path) -> NodeHome:
    home.set("inference", "models", f'[{{name = "{name}", path = "{path}"}}]')
    return home


async def test_infer_local_streams_over_the_control_socket(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    home = serve_model(make_home(tmp_path / "node"), "tiny", tiny_model)
    home.set("inference", "max_model_len", "256")
    deltas: list[str] = []
    async with (
        running_node(home, {"tiny": tiny_engine}) as node,
        ControlClient.connect(
            node.control.url or "",
            home.token.value,
            on_notification=lambda n: deltas.append(n["params"]["text"]),
        ) as client,
    ):
        models = await client.call("models.list")
        assert [m["name"] for m in models] == ["tiny"]
        assert models[0]["id"] == model_id(tiny_model)
        result = await client.call(
            "infer.local",
            {
                "model": "tiny",
                "prompt": "Hello world",
                "max_tokens": 12,
                "ignore_eos": True,
                "stream": True,
            },
        )
        assert len(result["token_ids"]) == 12
        assert "".join(deltas) == result["text"]
        assert result["output_hash"] == "0x" + output_hash(result["token_ids"]).hex()
        quiet = await client.call(
            "infer.local",
            {"model": "tiny", "prompt": "Hello world", "max_tokens": 12, "ignore_eos": True},
        )
        assert quiet["token_ids"] == result["token_ids"]
        streamed_count = len(deltas)

        assert len(deltas) == streamed_count  # no notifications without stream: true
        with pytest.raises(RpcError) as unknown:
            await client.call("infer.local", {"model": "gpt-9", "prompt": "x"})
        assert unknown.value.code == jsonrpc.INVALID_PARAMS
        assert unknown.value.data == {"reason": "unknown_model"}
        with pytest.raises(RpcError, match="needs a seed") as unseeded:
            await client.call("infer.local", {"model": "tiny", "prompt": "x", "temperature": 1})
        assert unseeded.value.code == jsonrpc.INVALID_PARAMS
        # The heartbeat advertises what this node serves.
        assert node.inference.serving_status().models == (model_id(tiny_model),)


@pytest.mark.slow
def test_smollm2_answers_sensibly_through_joynode_ctl(tmp_path: Path, smollm2_model: Path) -> None:
    home = serve_model(make_home(tmp_path / "node"), "smollm2", smollm2_model)
    with node_process(home, ready_within_s=180):
        params = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8}
        result = run_cli(
            "ctl", "--config", str(home.config_path), "infer.local", json.dumps(params)
        )
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert "Paris" in answer["text"]
        chat = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "stream": True,
        }
        streamed = run_cli(
            "ctl", "--config", str(home.config_path), "infer.local", json.dumps(chat)
        )
        assert streamed.returncode == 0, streamed.stderr
        reply = json.loads(streamed.stdout)
        assert "Paris" in reply["text"]
        assert reply["text"] in streamed.stderr  # the streamed text was shown as it came
