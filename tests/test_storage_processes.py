"""Three ``joynode run`` processes share a model by CID, serve it, and certify a job.

A serves the tiny model from a folder and publishes it (``joynode models
publish``); B is configured with only the CID and fetches it from A at start;
C knows only B and fetches from whoever has it. All three then give the same
greedy tokens for the same prompt, and as a committee they certify a
verified job submitted to C. A node's cached copy altered on disk is never
served: it is rewritten from verified blocks, fetched again, or refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from joynode.inference.models import model_id
from tests.factories import NodeHome, NodeProcess, fast_p2p, make_home, node_process, run_cli
from tests.inference_fixtures import small_engine, tiny_model

__all__ = ["tiny_model"]

PROMPT = {"model": "tiny", "prompt": "Hello world", "max_tokens": 8, "ignore_eos": True}


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


def flip_a_byte(path: Path, from_end: int = 100) -> None:
    """Damage a file on disk as bit rot or a tampering hand would: one byte, size unchanged."""
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def started(home: NodeHome) -> NodeProcess:
    process = NodeProcess(home)
    process.wait_ready(within_s=180)
    return process


@pytest.mark.slow
def test_a_model_cache_altered_on_disk_is_never_served(tmp_path: Path, tiny_model: Path) -> None:
    """Proof of Integrity at rest: the cached folder is checked against the CID at every start."""
    a = fast_p2p(make_home(tmp_path / "a"))  # a peer holding the model's blocks, no vLLM
    b = small_engine(fast_p2p(make_home(tmp_path / "b")))
    b.set("storage", "stall_timeout_s", "3.0")
    b.set("storage", "block_timeout_s", "1.0")
    peer = started(a)
    try:
        cid = ctl(a, "models.publish", {"path": str(tiny_model)})["cid"]
        b.set("inference", "models", f'[{{name = "tiny", cid = "{cid}"}}]')
        fast_p2p(b, bootstrap=addrs(a))
        cache = b.config.node.data_dir / "models" / cid
        weights = cache / "model.safetensors"

        with node_process(b, ready_within_s=180):  # first start: fetched from A
            genuine = ctl(b, "infer.local", PROMPT)["token_ids"]
        assert model_id(cache) == cid

        # 1. The cached weights altered: written again from the node's own verified blocks.
        flip_a_byte(weights)
        with node_process(b, ready_within_s=180) as node:
            assert model_id(cache) == cid
            assert "model.safetensors differs within bytes" in node.log()
            assert [m["state"] for m in ctl(b, "models.list")] == ["serving"]
            assert ctl(b, "storage.stat")["bitswap"]["blocks_received"] == 0
            assert ctl(b, "infer.local", PROMPT)["token_ids"] == genuine
    finally:
        peer.stop()

    # 2. The cache and the blocks damaged, and no peer has them: refused, the node runs on.
    flip_a_byte(weights)
    for block in (b.config.node.data_dir / "blocks").rglob("*.data"):
        flip_a_byte(block, from_end=1)
    with node_process(b) as node:
        (refused,) = ctl(b, "models.list")
        assert (refused["name"], refused["id"], refused["state"]) == ("tiny", cid, "refused")
        assert "no peer delivered block" in refused["reason"]
        assert f"model tiny is not served: {refused['reason']}" in node.log()
        unknown = run_cli("ctl", "--config", str(b.config_path), "infer.local", json.dumps(PROMPT))
        assert unknown.returncode == 1
        assert "unknown model 'tiny' (serving: none)" in unknown.stderr
        status = ctl(b, "node.status")
        assert {actor["state"] for actor in status["actors"].values()} == {"ready"}
    assert model_id(cache) != cid  # left as it was, and never given to vLLM

    # 3. A peer has the model again: the damaged blocks are fetched from it.
    peer = started(a)
    try:
        fast_p2p(b, bootstrap=addrs(a))
        with node_process(b, ready_within_s=180):
            assert model_id(cache) == cid
            assert ctl(b, "storage.stat")["bitswap"]["blocks_received"] >= 1
            assert ctl(b, "infer.local", PROMPT)["token_ids"] == genuine
    finally:
        peer.stop()


@pytest.mark.slow
def test_a_quota_too_small_for_a_configured_model_ends_in_one_line_and_exit_2(
    tmp_path: Path, tiny_model: Path
) -> None:
    a = fast_p2p(make_home(tmp_path / "a"))
    with node_process(a):
        cid = ctl(a, "models.publish", {"path": str(tiny_model)})["cid"]
        b = fast_p2p(make_home(tmp_path / "b"), bootstrap=addrs(a))
        b.set("inference", "models", f'[{{name = "tiny", cid = "{cid}"}}]')
        b.set("storage", "quota_gib", "0.0001")  # about 100 kB; the tiny model is 550 kB
        result = run_cli("run", "--config", str(b.config_path), "--log-level", "warning")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"joynode: storage.quota_gib: model {cid}: the block store is full")
    assert line.endswith("(inference.models[0], model tiny)")
