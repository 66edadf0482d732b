from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID

from joynode.keys import PASSWORD_ENV, NodeKey
from joynode.secret_files import ControlToken, SecretFileError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_hex_key_round_trip_with_mode_0600(tmp_path: Path) -> None:
    key = NodeKey.generate()
    path = tmp_path / "node.key"
    key.save(path)
    assert mode(path) == 0o600
    assert NodeKey.load(path) == key


def test_save_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    NodeKey.generate().save(path)
    with pytest.raises(SecretFileError, match="already exists"):
        NodeKey.generate().save(path)
    replacement = NodeKey.generate()
    replacement.save(path, force=True)
    assert NodeKey.load(path) == replacement


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    NodeKey.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretFileError, match="accessible by others"):
        NodeKey.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("zz", "neither hex nor an eth keystore"),
        ("ab" * 31, "must hold 32 bytes"),
        ("00" * 32, "not a valid secp256k1 private key"),
    ],
)
def test_malformed_key_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "node.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(SecretFileError, match=message):
        NodeKey.load(path)


def test_encrypted_keystore_with_password_file_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = NodeKey.generate()
    path = tmp_path / "keystore.json"
    key.save(path, password="correct horse")
    assert mode(path) == 0o600
    assert key.secret.hex() not in path.read_text()
    password_file = tmp_path / "password"
    password_file.write_text("correct horse\n")
    os.chmod(password_file, 0o600)
    assert NodeKey.load(path, password_file=password_file) == key
    with pytest.raises(SecretFileError, match="key_password_file"):
        NodeKey.load(path)
    monkeypatch.setenv(PASSWORD_ENV, "correct horse")
    assert NodeKey.load(path) == key
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises(SecretFileError, match="cannot decrypt"):
        NodeKey.load(path)


def test_one_key_is_both_eth_account_and_libp2p_peer() -> None:
    key = NodeKey(bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"))
    assert key.address == "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
    expected = ID.from_pubkey(create_new_key_pair(key.secret).public_key).to_base58()
    assert key.peer_id == expected
    assert key.peer_id.startswith("16Uiu2")


def test_secrets_never_appear_in_repr() -> None:
    key = NodeKey.generate()
    token = ControlToken.generate()
    assert key.secret.hex() not in repr(key)
    assert token.value not in repr(token)
    assert key.address in repr(key)


def test_token_comparison() -> None:
    token = ControlToken("a" * 64)
    assert token.matches("a" * 64)
    assert not token.matches("a" * 63)
    assert not token.matches("é" * 64)
    with pytest.raises(SecretFileError):
        ControlToken("short")
