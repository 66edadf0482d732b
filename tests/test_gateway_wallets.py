"""Wallets on the gateway: Sign-In with Ethereum (EIP-4361), a spender approval, and answers
that the wallet's own prepaid balance pays for, without the operator's keys.

The message parser is checked against the EIP's own example. The flow runs on three
in-process nodes (the session's tiny vLLM engine) and a real anvil chain: a wallet that
is no node signs in with eth-account over HTTP, approves the gateway as its spender, and
the official ``openai`` client gets certified answers with its session token, which
settle in a batch from the wallet's balance, within the cap it approved.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from joynode.gateway import apikeys
from joynode.gateway.wallets import SignInError, SiweMessage, WalletSignIn
from joynode.inference.engine import VllmEngine
from joynode.node import Node
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account
from tests.factories import LIBP2P_TEARDOWN_LEAK, wait_for
from tests.inference_fixtures import tiny_engine, tiny_model
from tests.test_consensus_chain import PRICE
from tests.test_gateway import in_thread, url_of
from tests.test_prepaid_nodes import balance_of, deposit, prepaid_committee

__all__ = ["anvil_url", "chain", "deployed", "tiny_engine", "tiny_model"]

pytestmark = LIBP2P_TEARDOWN_LEAK

WALLET, STRANGER = dev_account(16), dev_account(17)

# EIP-4361's own example message, byte for byte.
EIP_EXAMPLE = """example.com wants you to sign in with your Ethereum account:
0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2

I accept the ExampleOrg Terms of Service: https://example.com/tos

URI: https://example.com/login
Version: 1
Chain ID: 1
Nonce: 32891756
Issued At: 2021-09-30T16:25:24Z
Resources:
- ipfs://bafybeiemxf5abjwjbikoz4mc3a3dla6ual3jsgpdr4cjr3oz3evfyavhwq/
- https://example.com/my-web2-claim.json"""


def test_eip_4361_messages_parse_and_render_back_exactly() -> None:
    message = SiweMessage.parse(EIP_EXAMPLE)
    assert message.domain == "example.com"
    assert message.address == "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2"
    assert message.statement is not None
    assert message.statement.startswith("I accept")
    assert (message.chain_id, message.nonce, message.version) == (1, "32891756", "1")
    assert len(message.resources) == 2
    assert message.text() == EIP_EXAMPLE
    bare = EIP_EXAMPLE.split("\n\nI accept")[0] + "\n\nURI: https://example.com/login\n"
    bare += "Version: 1\nChain ID: 1\nNonce: 32891756\nIssued At: 2021-09-30T16:25:24Z"
    assert SiweMessage.parse(bare).statement is None  # the statement is optional
    for broken, why in (
        (EIP_EXAMPLE.replace("wants you to", "would like to"), "first lines"),
        (EIP_EXAMPLE.replace("Chain ID: 1\n", ""), "no chain id"),
        (EIP_EXAMPLE.replace("Chain ID: 1", "Chain ID: one"), "not a number"),
        (
            EIP_EXAMPLE.replace("0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2", "0x" + "c0" * 20),
            "EIP-55",
        ),
        (EIP_EXAMPLE + "\nExtra: line", "unexpected line"),
        (EIP_EXAMPLE.replace("Chain ID: 1", "Chain ID: 01"), "render back"),
    ):
        with pytest.raises(SignInError, match=why):
            SiweMessage.parse(broken)


def test_sign_in_checks_every_field_and_tokens_expire_and_sign_out(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    wallets = WalletSignIn(tmp_path / "k", "0x" + "11" * 20, lambda: 31337, 600, lambda: now[0])

    def message(nonce: str, **changes: Any) -> str:
        fields = {
            "domain": "node.example:7761",
            "address": WALLET.address,
            "statement": "Sign in",
            "uri": "http://node.example:7761",
            "version": "1",
            "chain_id": 31337,
            "nonce": nonce,
            "issued_at": datetime.fromtimestamp(now[0], UTC).isoformat(),
            **changes,
        }
        return SiweMessage(**fields).text()

    def signed(text: str, by: LocalAccount = WALLET) -> str:
        return "0x" + bytes(by.sign_message(encode_defunct(text=text)).signature).hex()

    host = "node.example:7761"
    nonce = wallets.nonce()
    for text, signature, why in (
        (message(nonce, domain="evil.example"), None, "signs in to 'evil.example'"),
        (message(nonce, chain_id=1), None, "chain 1, not 31337"),
        (message(nonce, version="2"), None, "version '2'"),
        (message("notours1234"), None, "not issued by this gateway"),
        (message(nonce, expiration_time="2020-01-01T00:00:00Z"), None, "expired"),
        (message(nonce, not_before="2099-01-01T00:00:00Z"), None, "not valid yet"),
        (message(nonce), signed(message(nonce), STRANGER), "signed by"),
        (message(nonce), "0x" + "00" * 65, "does not recover"),
    ):
        with pytest.raises(SignInError, match=why):
            wallets.sign_in(text, signature or signed(text), host)
    token, session = wallets.sign_in(message(nonce), signed(message(nonce)), host)
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600  # the JWT key, made at first use
    assert session.address == WALLET.address
    assert wallets.session(token).address == WALLET.address
    with pytest.raises(SignInError, match="not issued by this gateway, or is used"):
        wallets.sign_in(message(nonce), signed(message(nonce)), host)  # a nonce works once
    with pytest.raises(SignInError, match="not one this gateway issued"):
        wallets.session(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))
    other = WalletSignIn(tmp_path / "other", "0x" + "11" * 20, lambda: 31337, 600)
    with pytest.raises(SignInError, match="not one this gateway issued"):
        other.session(token)  # another key
    now[0] += 601
    with pytest.raises(SignInError, match="expired"):
        wallets.session(token)
    fresh = wallets.nonce()
    token, session = wallets.sign_in(message(fresh), signed(message(fresh)), host)
    wallets.sign_out(session)
    with pytest.raises(SignInError, match="signed out"):
        wallets.session(token)
    # A key file others can read is not used: sign-in is off, said once in the log.
    unsafe = tmp_path / "unsafe"
    unsafe.write_text("x" * 44)
    unsafe.chmod(0o644)
    off = WalletSignIn(unsafe, "0x" + "11" * 20, lambda: 31337, 600, lambda: now[0])
    with pytest.raises(SignInError, match="cannot keep wallet sessions"):
        off.session(token)
    expiring = wallets.nonce()
    soon = datetime.fromtimestamp(now[0] + 30, UTC).isoformat()
    text = message(expiring, expiration_time=soon)
    _, session = wallets.sign_in(text, signed(text), host)
    assert session.expires_at == pytest.approx(now[0] + 30)  # the message's own limit holds


async def sign_in(client: httpx.AsyncClient, wallet: LocalAccount) -> str:
    """What a wallet's app does: fetch a nonce, sign the EIP-4361 message, get a token."""
    fields = (await client.get("/v1/joynet/auth/nonce")).json()
    text = SiweMessage(
        domain=fields["domain"],
        address=wallet.address,
        statement=fields["statement"],
        uri=fields["uri"],
        version=fields["version"],
        chain_id=fields["chain_id"],
        nonce=fields["nonce"],
        issued_at=datetime.now(UTC).isoformat(timespec="seconds"),
    ).text()
    signature = bytes(wallet.sign_message(encode_defunct(text=text)).signature)
    reply = await client.post(
        "/v1/joynet/auth/sign-in", json={"message": text, "signature": "0x" + signature.hex()}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["address"] == wallet.address
    return str(body["access_token"])


async def approve(client: httpx.AsyncClient, token: str, wallet: LocalAccount, cap: int) -> Any:
    """The wallet approves the gateway as its spender: typed data in, signature out."""
    auth = {"authorization": f"Bearer {token}"}
    terms = {"cap": cap, "expiry": int(time.time()) + 3600}
    typed = (await client.post("/v1/joynet/spender/typed-data", json=terms, headers=auth)).json()
    assert (
        typed["message"]["spender"] == (await client.get("/v1/joynet/auth/nonce")).json()["spender"]
    )
    signature = bytes(wallet.sign_typed_data(full_message=typed).signature)
    body = {**terms, "nonce": typed["message"]["nonce"], "signature": "0x" + signature.hex()}
    return await client.post("/v1/joynet/spender", json=body, headers=auth)


def ask(node: Node, token: str, **extra: Any) -> Any:
    """One chat completion through the official client, with the wallet's token as its key."""
    client = openai.OpenAI(base_url=url_of(node) + "/v1", api_key=token, max_retries=0, timeout=60)
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello"}],
        **{"max_tokens": 8, "temperature": 0, **extra},
    )


async def test_a_signed_in_wallet_pays_from_its_own_balance_within_the_cap_it_approved(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine, chain: Chain
) -> None:
    await trio.to_thread.run_sync(deposit, chain, WALLET, 10 * PRICE)
    settings = [("batch_size", "2"), ("max_age_s", "2.0")]
    async with prepaid_committee(tmp_path, tiny_model, tiny_engine, chain, settings) as nodes:
        gateway = nodes[0]
        async with httpx.AsyncClient(base_url=url_of(gateway), timeout=60) as client:
            token = await sign_in(client, WALLET)

            # Not approved yet: 402, before any inference.
            with pytest.raises(openai.APIStatusError) as refused:
                await in_thread(ask, gateway, token)
            assert refused.value.status_code == 402
            assert refused.value.code == "spender_not_approved"
            # A wallet pays for committee answers only.
            with pytest.raises(openai.BadRequestError, match="committee answers only"):
                await in_thread(
                    ask, gateway, token, extra_body={"joynet": {"verification": "local"}}
                )

            reply = await approve(client, token, WALLET, 2 * PRICE)
            assert reply.status_code == 200, reply.text
            assert reply.json()["cap"] == str(2 * PRICE)
            assert reply.json()["spender"] == gateway.consensus.address

            answer = await in_thread(ask, gateway, token)
            joynet = answer.model_extra["joynet"]
            assert joynet["settlement"] == "prepaid"
            assert len(joynet["certificate"]["signers"]) >= 2
            assert answer.choices[0].message.content
            second = await in_thread(ask, gateway, token, seed=7, temperature=1)
            # The cap is reached (two requests owed): the third is refused before it runs.
            with pytest.raises(openai.RateLimitError) as over:
                await in_thread(ask, gateway, token)
            assert over.value.code == "insufficient_quota"
            assert "over_spender_cap" in over.value.message

            # Both settle from the wallet's balance, as the gateway signed them for it.
            await wait_for(
                lambda: balance_of(chain, WALLET) == 8 * PRICE, 60, "both settled from the wallet"
            )
            prepaid = chain.contract("PrepaidInference")
            spending = prepaid.functions.spenderOf(WALLET.address, gateway.consensus.address)
            assert spending.call()[1] == 2 * PRICE
            ids = {
                answer.model_extra["joynet"]["request_id"],
                second.model_extra["joynet"]["request_id"],
            }
            assert len(ids) == 2

            # Wrong tokens and wrong callers get clear errors; the node keeps serving.
            auth = {"authorization": f"Bearer {token}"}
            assert (await client.get("/v1/joynet/spender", headers=auth)).json()["spent"] == str(
                2 * PRICE
            )
            key, _ = await gateway.state.write(lambda c: apikeys.create(c, "k", 60, None))
            as_key = await client.get(
                "/v1/joynet/spender", headers={"authorization": f"Bearer {key}"}
            )
            assert as_key.status_code == 403
            bad = {"authorization": f"Bearer {token[:-2]}xx"}
            assert (await client.get("/v1/models", headers=bad)).status_code == 401
            zero = {"cap": 0, "expiry": int(time.time()) + 60}
            refused_terms = await client.post(
                "/v1/joynet/spender/typed-data", json=zero, headers=auth
            )
            assert refused_terms.status_code == 400
            assert "cap" in refused_terms.json()["error"]["message"]
            forged = await client.post(  # signed by nobody: the contract refuses it, clearly
                "/v1/joynet/spender",
                json={**zero, "cap": PRICE, "nonce": 9, "signature": "0x" + "11" * 65},
                headers=auth,
            )
            assert forged.status_code == 400
            assert forged.json()["error"]["code"] == "approval_refused"
            assert (await client.post("/v1/joynet/auth/sign-out", headers=auth)).status_code == 200
            gone = await client.get("/v1/models", headers=auth)
            assert gone.status_code == 401
            assert "signed out" in gone.json()["error"]["message"]

            # Another wallet cannot spend the first one's approval.
            other = await sign_in(client, STRANGER)
            with pytest.raises(openai.APIStatusError) as theirs:
                await in_thread(ask, gateway, other)
            assert theirs.value.status_code == 402
