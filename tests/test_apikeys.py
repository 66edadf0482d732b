"""The gateway's API keys: stored hashed, checked by digest, limited, revoked; through the
store, the control methods and the ``joynode apikeys`` CLI against a running node."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator

import pytest

from joynode.gateway import apikeys
from joynode.state import MIGRATIONS
from tests.factories import NodeHome, node_process, run_cli


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
