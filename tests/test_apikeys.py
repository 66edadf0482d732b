"""The gateway's API keys: stored hashed, checked by digest, limited, revoked; through the
store, the control methods and the ``joynode apikeys`` CLI against a running node."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trio

from joynode.gateway import apikeys
from joynode.gateway.access import KEY_MEMORY_S, ClientCheck
from joynode.gateway.errors import OpenAIError
from joynode.state import MIGRATIONS, StateStore
from tests.factories import NodeHome, node_process, run_cli, running_node


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(":memory:", isolation_level=None)
    for migration in MIGRATIONS:
        db.executescript(migration)
    yield db
    db.close()


def test_a_key_is_shown_once_stored_hashed_and_checked_by_digest(conn: sqlite3.Connection) -> None:
    key, record = apikeys.create(conn, "alice's app", 60, None)
    prefix, key_id, secret = key.split("-", 2)
    assert (prefix, key_id) == ("jn", record.id)
    assert len(secret) == 43
    # The database holds the digest, not the secret.
    dump = "\n".join(conn.iterdump())
    assert secret not in dump
    assert key not in dump
    assert apikeys.authenticate(conn, key) == record
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    for bad in (wrong, "", "jn-", f"jn-{key_id}", key + "x", "Bearer " + key, key.upper()):
        assert apikeys.authenticate(conn, bad) is None, bad
    other, _ = apikeys.create(conn, "bob", 60, None)
    assert apikeys.authenticate(conn, other) is not None
    assert len({r.id for r in apikeys.listed(conn)}) == 2


def test_use_is_counted_against_the_quota_and_a_revoked_key_stops_working(
    conn: sqlite3.Connection,
) -> None:
    key, record = apikeys.create(conn, "metered", 10, 100)
    assert not record.over_quota
    apikeys.record_use(conn, record.id, 60)
    apikeys.record_use(conn, record.id, 50)
    used = apikeys.authenticate(conn, key)
    assert used is not None
    assert (used.used_tokens, used.used_requests, used.over_quota) == (110, 2, True)
    assert used.last_used_at is not None
    revoked = apikeys.revoke(conn, record.id)
    assert revoked is not None
    assert revoked.revoked_at is not None
    assert apikeys.authenticate(conn, key) is None
    assert apikeys.revoke(conn, record.id) == revoked  # again: no change
    assert apikeys.revoke(conn, "0" * 12) is None
    assert apikeys.listed(conn) == []
    assert [k.id for k in apikeys.listed(conn, revoked=True)] == [record.id]
    with pytest.raises(ValueError, match="printable"):
        apikeys.create(conn, "line\nbreak", 10, None)


def test_the_cli_creates_lists_and_revokes_keys_on_a_running_node(home: NodeHome) -> None:
    config = str(home.config_path)
    with node_process(home, "--log-level", "debug") as node:
        made = run_cli("apikeys", "create", "ci", "--config", config, "--quota-tokens", "500")
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        assert key.startswith("jn-")
        assert "shown this once" in made.stderr
        key_id = key.split("-")[1]

        listed = run_cli("apikeys", "list", "--config", config)
        assert listed.returncode == 0, listed.stderr
        assert key_id in listed.stdout
        assert "tokens 0/500" in listed.stdout
        assert key.split("-")[2] not in listed.stdout  # never the secret

        as_json = run_cli("apikeys", "list", "--config", config, "--json")
        (entry,) = json.loads(as_json.stdout)["keys"]
        assert (entry["id"], entry["quota_tokens"], entry["rate_per_minute"]) == (key_id, 500, 60)
        assert "key" not in entry

        revoked = run_cli("apikeys", "revoke", key_id, "--config", config)
        assert revoked.returncode == 0, revoked.stderr
        assert "revoked" in revoked.stdout
        assert run_cli("apikeys", "list", "--config", config).stdout.strip() == "no API keys"

        unknown = run_cli("apikeys", "revoke", "0" * 12, "--config", config)
        assert unknown.returncode == 1
        assert "no API key 000000000000" in unknown.stderr
        bad = run_cli("apikeys", "create", "x" * 65, "--config", config)
        assert bad.returncode == 1
        assert "name" in bad.stderr
        assert "Traceback" not in bad.stderr + unknown.stderr
        # Not even at debug level does the node log the key.
        assert key.split("-")[2] not in node.log()


async def test_the_official_openai_client_lists_models_with_a_key_and_gets_openai_errors(
    home: NodeHome,
) -> None:
    async with running_node(home) as node:
        assert node.http.url is not None
        base_url = node.http.url + "/v1"
        key, _ = await node.state.write(lambda c: apikeys.create(c, "sdk", 2, None))

        def client(api_key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

        def list_models(api_key: str) -> list[str]:
            with client(api_key) as sdk:
                return [m.id for m in sdk.models.list()]

        served = sorted(node.inference.models)
        assert await trio.to_thread.run_sync(list_models, key) == served
        with pytest.raises(openai.AuthenticationError) as wrong:
            await trio.to_thread.run_sync(list_models, key[:-2] + "xx")
        assert wrong.value.code == "invalid_api_key"
        # 2 a minute: the second passes, the third is over the rate.
        await trio.to_thread.run_sync(list_models, key)
        with pytest.raises(openai.RateLimitError) as limited:
            await trio.to_thread.run_sync(list_models, key)
        assert limited.value.code == "rate_limit_exceeded"
        # An unknown route under /v1 is OpenAI's 404; a request without a key, 401.
        missing = await trio.to_thread.run_sync(
            lambda: httpx.get(base_url + "/nope", headers={"authorization": f"Bearer {key}"})
        )
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "unknown_url"
        bare = await trio.to_thread.run_sync(lambda: httpx.get(base_url + "/models"))
        assert bare.status_code == 401
        assert set(bare.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_key_over_its_quota_gets_429_insufficient_quota(home: NodeHome) -> None:
    async with running_node(home) as node:
        assert node.http.url is not None
        key, record = await node.state.write(lambda c: apikeys.create(c, "metered", 60, 10))
        await node.state.write(lambda c: apikeys.record_use(c, record.id, 10))
        sdk = openai.OpenAI(base_url=node.http.url + "/v1", api_key=key, max_retries=0)
        with sdk, pytest.raises(openai.RateLimitError) as over:
            await trio.to_thread.run_sync(sdk.models.list)
        assert over.value.code == "insufficient_quota"


async def test_a_good_key_is_remembered_briefly_so_a_revocation_takes_two_seconds(
    tmp_path: Path,
) -> None:
    now = [0.0]
    async with trio.open_nursery() as nursery:
        state = StateStore(tmp_path / "state.db", "test")
        await nursery.start(state.run)
        check = ClientCheck(state, None, 60, lambda: now[0])
        key, record = await state.write(lambda c: apikeys.create(c, "k", 600, None))
        assert (await check.admit(f"Bearer {key}")) == record
        reads = state.statistics().calls
        await check.admit(f"Bearer {key}")
        assert state.statistics().calls == reads  # remembered: no database read
        await state.write(lambda c: apikeys.revoke(c, record.id))
        await check.admit(f"Bearer {key}")  # still remembered
        now[0] += KEY_MEMORY_S
        with pytest.raises(OpenAIError) as gone:
            await check.admit(f"Bearer {key}")
        assert gone.value.status == 401
        with pytest.raises(OpenAIError):  # a wrong key is never remembered
            await check.admit(f"Bearer {key[:-2]}xx")
        nursery.cancel_scope.cancel()
