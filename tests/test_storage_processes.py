"""Three ``joynode run`` processes share a model by CID, serve it, and certify a job.

A serves the tiny model from a folder and publishes it (``joynode models
publish``); B is configured with only the CID and fetches it from A at start;
C knows only B and fetches from whoever has it. All three then give the same
greedy tokens for the same prompt, and as a committee they certify a
verified job submitted to C.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from joynode.inference.models import model_id
from tests.factories import NodeHome, fast_p2p, make_home, node_process, run_cli
from tests.inference_fixtures import tiny_model

__all__ = ["tiny_model"]

PROMPT = {"model": "tiny", "prompt": "Hello world", "max_tokens": 8, "ignore_eos": True}


def small_engine(home: NodeHome) -> NodeHome:
    home.set("inference", "max_model_len", "256")
    home.set("inference", "kv_cache_gib", "0.25")
    home.set("inference", "max_num_seqs", "4")
    return home


def ctl(home: NodeHome, method: str, params: dict[str, object] | None = None) -> Any:
    args = ["ctl", "--config", str(home.config_path), method]
    if params is not None:
        args.append(json.dumps(params))
    result = run_cli(*args, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_until_all_serve(home: NodeHome, model: str, peers: int) -> None:
    """Until ``home``'s peer table has ``peers`` peers up whose heartbeats list ``model``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        table = ctl(home, "peers.list")
        if sum(1 for p in table if p["state"] == "up" and model in p["models"]) >= peers:
            return
        time.sleep(0.5)
    raise AssertionError(f"peers serving {model} not up: {table}")


def addrs(home: NodeHome) -> list[str]:
    endpoints = home.endpoints()
    assert endpoints is not None
    return endpoints.p2p_addrs


@pytest.mark.slow
def test_three_processes_share_a_model_by_cid_and_serve_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    a = small_engine(fast_p2p(make_home(tmp_path / "a")))
    a.set("inference", "models", f'[{{name = "tiny", path = "{tiny_model}"}}]')
    with node_process(a, ready_within_s=120):
        published = run_cli("models", "publish", str(tiny_model), "--config", str(a.config_path))
        assert published.returncode == 0, published.stderr
        cid = json.loads(published.stdout)["cid"]
        assert cid == model_id(tiny_model)  # the id A already serves the folder under

        b = small_engine(fast_p2p(make_home(tmp_path / "b"), bootstrap=addrs(a)))
        b.set("inference", "models", f'[{{name = "tiny", cid = "{cid}"}}]')
        with node_process(b, ready_within_s=120):
            c = small_engine(fast_p2p(make_home(tmp_path / "c"), bootstrap=addrs(b)))
            c.set("inference", "models", f'[{{name = "tiny", cid = "{cid}"}}]')
            with node_process(c, ready_within_s=120):
                outputs = [ctl(home, "infer.local", PROMPT) for home in (a, b, c)]
                assert len({tuple(o["token_ids"]) for o in outputs}) == 1
                for home in (b, c):
                    folder = home.config.node.data_dir / "models" / cid
                    assert model_id(folder) == cid
                    stat = ctl(home, "storage.stat", {"cid": cid})
                    assert stat["root"]["complete"] is True
                    assert [p["cid"] for p in stat["pins"]] == [cid]
                # Fetching again is a cache hit.
                again = ctl(c, "models.fetch", {"cid": cid})
                assert again["path"] == str(c.config.node.data_dir / "models" / cid)
                # A served blocks to B (and maybe to C); C got all it needed.
                a_sent = ctl(a, "storage.stat")["bitswap"]["blocks_sent"]
                assert a_sent >= 1
                # The three now make a committee: a verified job from C.
                wait_until_all_serve(c, cid, 2)
                job = ctl(c, "infer.submit", {**PROMPT, "model": cid, "committee_size": 3})
                assert len(job["committee"]) == 3
                done = ctl(c, "job.wait", {"request_id": job["request_id"], "timeout_s": 60})
                assert done["status"] == "certified", done["reason"]
                assert done["output"]["token_ids"] == outputs[0]["token_ids"]
                assert len(done["certificate"]["signers"]) >= 2
