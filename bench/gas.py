"""Gas per contract call: every JoyNet contract call once, on a fresh anvil chain.

Starts anvil (the binary ``joynode.chain.anvil`` runs, 140 funded dev accounts),
deploys with ``deploy_all`` and drives the whole protocol: 128 nodes stake and
register, models are registered, requests made (with and without a permit),
certificates submitted, an equivocation reported, stake unbonded and withdrawn,
rewards claimed, a request refunded; then the DAO: a delegation, a fee change
proposed, voted, queued and executed, a certificate disputed and the dispute
upheld by a second proposal. Each figure is the ``gasUsed`` of the
call's receipt (21 000 intrinsic gas included), next to its ratio to the
in-process baseline, a JOY ``transfer`` between two accounts that both hold JOY.

Costs depend on storage state (a slot's first write costs 20 000 gas, later
ones 2 900), so calls are measured in steady state where that is what a node
sees: requests and certificates after a warm-up round on the same model (the
requester, the model's usage counters and most signers' reward slots already
written); first-time costs (a first stake, a first transfer to a new holder)
are labelled as such. ``requestInference`` is measured for committees of 3 and
5 drawn from 10, 50 and 128 (``MAX_NODES_PER_MODEL``) registered nodes, since
committee selection reads every node serving the model. Run from the
repository root::

    .venv/bin/python -m bench.gas
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from eth_account import Account
from eth_account.hdaccount import key_from_seed, seed_from_mnemonic
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD
from web3.types import TxReceipt

from joynode.chain.anvil import DEV_MNEMONIC, anvil_binary, anvil_command, listening_url
from joynode.chain.artifacts import CONTRACTS, load_artifacts
from joynode.chain.deploy import (
    DEVNET_CHAIN_ID,
    JOY,
    UPGRADEABLE,
    Deployment,
    DeployParams,
    deploy_all,
    implementation_of,
)
from joynode.chain.sender import RevertDecoder, TransactionSender
from joynode.keys import NodeKey
from joynode.prepaid.redemption import Redemption, pack_batch, results_by_member
from joynode.signatures import (
    Eip712Domain,
    Permit,
    PrepaidRequest,
    prepaid_request_id,
    results_chain,
    sign,
    sign_permit,
    sign_prepaid_request,
    voucher_digest,
)

NODES = 128  # NodeCoordinator.MAX_NODES_PER_MODEL
ACCOUNTS = NODES + 14
FIRST_NODE = 2  # dev accounts 0 (the deployer) and 1 (unused) come first
PRICE = 1000 * JOY
STAKE = 1000 * JOY
UNBONDING_S = 3600
ZERO_HASH = b"\0" * 32
OUTPUT = keccak(b"the output")
ZERO_ADDRESS = "0x" + "00" * 20
REGISTRY_SIZES = (10, 50, NODES)
COMMITTEES = (3, 5)


def dev_accounts(count: int) -> list[LocalAccount]:
    """anvil's funded dev accounts (one seed derivation, then a key per index)."""
    seed = seed_from_mnemonic(DEV_MNEMONIC, "")
    return [Account.from_key(key_from_seed(seed, f"m/44'/60'/0'/0/{i}")) for i in range(count)]


def model_cid(nodes: int, k: int) -> str:
    return f"bafy-bench-{nodes}-nodes-k{k}"


def model_id(cid: str) -> bytes:
    return keccak(text=cid)  # ModelMarketplace.modelIdOf


@contextmanager
def fresh_anvil(accounts: int) -> Iterator[str]:
    process = subprocess.Popen(
        anvil_command(accounts=accounts), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    try:
        seen = b""
        deadline = time.monotonic() + 20
        url = None
        while url is None and time.monotonic() < deadline:
            seen += process.stdout.read1(4096)  # type: ignore[attr-defined]  # BufferedReader
            url = listening_url(seen)
        if url is None:
            raise RuntimeError(f"anvil did not start: {seen.decode(errors='replace')}")
        # Nobody reads anvil's output from here on: stop it logging every call.
        Web3(Web3.HTTPProvider(url)).provider.make_request(
            "anvil_setLoggingEnabled",  # type: ignore[arg-type]  # web3 types the method as an enum
            [False],
        )
        yield url
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


class Bench:
    def __init__(self, url: str) -> None:
        self.w3 = Web3(Web3.HTTPProvider(url))
        self.decoder = RevertDecoder(load_artifacts().contracts.values())
        self.accounts = dev_accounts(ACCOUNTS)
        self.admin = self.accounts[0]
        self.senders: dict[str, TransactionSender] = {}
        self.rows: list[tuple[str, int]] = []
        self.signed_before: set[str] = set()
        self.signers: dict[bytes, list[str]] = {}
        self.deployment: Deployment | None = None

    # ---- plumbing

    def sender(self, account: LocalAccount) -> TransactionSender:
        if account.address not in self.senders:
            self.senders[account.address] = TransactionSender(self.w3, account, self.decoder)
        return self.senders[account.address]

    def tx(self, account: LocalAccount, call: Any, label: str | None = None) -> TxReceipt:
        receipt = self.sender(account).transact(call)
        if label is not None:
            self.record(label, int(receipt["gasUsed"]))
        return receipt

    def record(self, label: str, gas: int) -> None:
        self.rows.append((label, gas))

    def contract(self, name: str) -> Contract:
        assert self.deployment is not None
        return self.deployment.contract(self.w3, name)

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def advance(self, seconds: int) -> None:
        self.w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]  # as above
        self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]  # as above

    # ---- the run

    def run(self) -> None:
        self.deploy()
        token = self.contract("JoyToken")
        coordinator = self.contract("NodeCoordinator")
        market = self.contract("ModelMarketplace")
        poi = self.contract("ProofOfInference")
        admin = self.admin
        nodes = self.accounts[FIRST_NODE : FIRST_NODE + NODES]
        owner, requester, permit_user, reporter, late = self.accounts[NODES + 2 : NODES + 7]
        royalties = [self.accounts[NODES + 8].address, self.accounts[NODES + 9].address]
        holder = self.accounts[NODES + 10]

        # Baseline: JOY transfers (to an account without JOY, then one that holds some).
        self.tx(
            admin, token.functions.transfer(holder.address, JOY), "JoyToken.transfer (new holder)"
        )
        self.tx(
            admin, token.functions.transfer(holder.address, JOY), "JoyToken.transfer (baseline)"
        )
        for account in [*nodes, requester, permit_user, late]:
            self.tx(admin, token.functions.transfer(account.address, 100_000 * JOY))

        # Models, then nodes: the first 10 serve every model, the next 40 the
        # models of 50 and 128 nodes, the rest only those of 128.
        for index, (size, k) in enumerate((s, k) for s in REGISTRY_SIZES for k in COMMITTEES):
            call = market.functions.registerModel(
                model_cid(size, k), PRICE, k, 0, royalties, [1000, 500], ZERO_HASH, ZERO_ADDRESS
            )
            self.tx(
                owner, call, "ModelMarketplace.registerModel (2 royalties)" if index == 0 else None
            )
        for index, node in enumerate(nodes):
            served = [
                model_id(model_cid(size, k))
                for size in REGISTRY_SIZES
                for k in COMMITTEES
                if index < size
            ]
            first = index == 0
            self.tx(
                node,
                token.functions.approve(coordinator.address, 10 * STAKE),
                "JoyToken.approve" if first else None,
            )
            self.tx(
                node,
                coordinator.functions.stake(STAKE),
                "NodeCoordinator.stake (first)" if first else None,
            )
            label = (
                f"NodeCoordinator.register ({len(served)} models)"
                if index in (0, NODES - 1)
                else None
            )
            self.tx(
                node,
                coordinator.functions.register(
                    f"16Uiu2-{index}", ["/ip4/127.0.0.1/tcp/4001"], served, 8
                ),
                label,
            )
        self.tx(nodes[0], coordinator.functions.stake(STAKE), "NodeCoordinator.stake (top-up)")

        # Warm-up: a few settled requests per certificate model.
        self.tx(requester, token.functions.approve(market.address, 10**30))
        for _ in range(3):
            for k in COMMITTEES:
                rid, committee = self.request(requester, model_cid(10, k))
                self.certify(rid, committee, len(committee))
        for size in REGISTRY_SIZES:
            for k in COMMITTEES:
                label = f"({size} nodes, committee {k})"
                rid, committee = self.request(requester, model_cid(size, k), label)
                if size == 10:
                    self.certify(
                        rid,
                        committee,
                        k // 2 + 1,
                        f"ProofOfInference.submitCertificate ({k // 2 + 1}/{k})",
                    )
        rid, committee = self.request(requester, model_cid(10, 5))
        self.certify(rid, committee, 5, "ProofOfInference.submitCertificate (5/5)")

        self.request_with_permit(permit_user, model_cid(10, 3))
        self.prepaid(nodes[2:5], self.accounts[NODES + 12 : NODES + 14])

        # Equivocation: two different commits of one node for one request.
        cheat = nodes[NODES - 1]
        key = NodeKey(bytes(cheat.key))
        domain = Eip712Domain(self.w3.eth.chain_id, poi.address)
        a, b = keccak(b"commitment a"), keccak(b"commitment b")
        evidence = (
            a,
            sign(key, domain.commit_digest(rid, a)),
            b,
            sign(key, domain.commit_digest(rid, b)),
        )
        call = poi.functions.reportEquivocation(cheat.address, rid, *evidence)
        self.tx(reporter, call, "ProofOfInference.reportEquivocation (slash)")

        # Stake leaving: partly, then below the minimum (deregisters), withdrawn later.
        self.tx(
            nodes[100],
            coordinator.functions.unstake(100 * JOY),
            "NodeCoordinator.unstake (stays registered)",
        )
        self.tx(
            nodes[101],
            coordinator.functions.unstake(STAKE - JOY),
            "NodeCoordinator.unstake (deregisters, 2 models)",
        )
        self.tx(
            nodes[1],
            coordinator.functions.unstake(STAKE),
            "NodeCoordinator.unstake (deregisters, 6 models)",
        )
        self.advance(UNBONDING_S + 1)
        self.tx(nodes[100], coordinator.functions.withdraw(), "NodeCoordinator.withdraw")
        self.tx(nodes[0], coordinator.functions.claimRewards(), "NodeCoordinator.claimRewards")

        # Refund: a request nobody answered, after its deadline.
        rid, _ = self.request(requester, model_cid(10, 3), deadline_s=60)
        self.advance(61)
        self.tx(late, market.functions.refund(rid), "ModelMarketplace.refund")

        self.govern(requester, holder, self.accounts[NODES + 11])

    def govern(self, requester: LocalAccount, voter: LocalAccount, second: LocalAccount) -> None:
        """The DAO's calls: delegate, a fee change through the whole path, a dispute upheld."""
        token, governor = self.contract("JoyToken"), self.contract("JoyGovernor")
        market, disputes = self.contract("ModelMarketplace"), self.contract("DisputeResolver")
        settings = DeployParams.for_chain(DEVNET_CHAIN_ID).governance
        self.tx(self.admin, token.functions.transfer(voter.address, 50_000_000 * JOY))
        self.tx(self.admin, token.functions.transfer(second.address, 1000 * JOY))
        self.tx(voter, token.functions.delegate(voter.address), "JoyToken.delegate (to self)")
        self.tx(second, token.functions.delegate(second.address))
        rid, committee = self.request(requester, model_cid(10, 3))
        self.certify(rid, committee, 2)
        signers = self.signers[rid]
        self.tx(
            requester,
            disputes.functions.dispute(rid, signers, "the answer is made up"),
            "DisputeResolver.dispute (by the requester, no bond)",
        )
        proposals = (
            (
                market,
                market.encode_abi("setParameters", [500, 4000, 3000, self.treasury]),
                "setParameters",
            ),
            (
                disputes,
                disputes.encode_abi("resolve", [rid, True]),
                "resolve: upheld, 2 signers slashed",
            ),
        )
        for index, (target, action, what) in enumerate(proposals):
            first = index == 0  # the calls of the second proposal cost the same but execute

            def label(call: str, first: bool = first) -> str | None:
                return f"JoyGovernor.{call}" if first else None

            args = ([target.address], [0], [bytes.fromhex(action[2:])])
            description = f"bench: {what}"
            receipt = self.tx(
                voter, governor.functions.propose(*args, description), label("propose (1 action)")
            )
            (created,) = governor.events.ProposalCreated().process_receipt(receipt, errors=DISCARD)
            proposal_id = created["args"]["proposalId"]
            self.advance(settings.voting_delay_s + 1)
            self.tx(
                voter,
                governor.functions.castVote(proposal_id, 1),
                label("castVote (reaches the quorum)"),
            )
            self.tx(
                second,
                governor.functions.castVoteWithReason(proposal_id, 0, "too much"),
                label("castVoteWithReason"),
            )
            self.advance(settings.voting_period_s + settings.late_quorum_extension_s)
            described = (*args, keccak(text=description))
            self.tx(voter, governor.functions.queue(*described), label("queue"))
            self.advance(settings.timelock_delay_s)
            self.tx(voter, governor.functions.execute(*described), f"JoyGovernor.execute ({what})")

    def deploy(self) -> None:
        sender = self.sender(self.admin)
        params = DeployParams.for_chain(int(self.w3.eth.chain_id))
        assert params.unbonding_delay_s == UNBONDING_S
        self.deployment = deploy_all(sender, params)
        names = {address.lower(): name for name, address in self.deployment.addresses.items()}
        for name in UPGRADEABLE:
            implementation = implementation_of(self.w3, self.deployment.addresses[name])
            names[implementation.lower()] = f"{name} (implementation)"
            names[self.deployment.addresses[name].lower()] = f"{name} (proxy)"
        granted = False
        first, last = self.deployment.start_block + 1, int(self.w3.eth.block_number)
        for number in range(first, last + 1):
            for tx_hash in self.w3.eth.get_block(number)["transactions"]:
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]  # hashes, not full transactions
                created = receipt["contractAddress"]
                if created is not None:
                    self.record(f"deploy {names[str(created).lower()]}", int(receipt["gasUsed"]))
                elif not granted:
                    self.record("AccessControl.grantRole", int(receipt["gasUsed"]))
                    granted = True
        deployed = {label.split(" (")[0] for label, _ in self.rows}
        assert deployed >= {f"deploy {name}" for name in CONTRACTS}, deployed

    @property
    def treasury(self) -> str:
        assert self.deployment is not None
        return self.deployment.treasury

    def request(
        self, requester: LocalAccount, cid: str, label: str | None = None, deadline_s: int = 3600
    ) -> tuple[bytes, list[str]]:
        market = self.contract("ModelMarketplace")
        model = model_id(cid)
        call = market.functions.requestInference(model, ZERO_HASH, PRICE, self.now() + deadline_s)
        receipt = self.tx(requester, call, label and f"ModelMarketplace.requestInference {label}")
        return self.requested(requester, receipt, label)

    def requested(
        self, requester: LocalAccount, receipt: TxReceipt, label: str | None = None
    ) -> tuple[bytes, list[str]]:
        """The request's id and its committee, drawn in the next block by the requester."""
        market = self.contract("ModelMarketplace")
        (log,) = market.events.InferenceRequested().process_receipt(receipt, errors=DISCARD)
        rid = bytes(log["args"]["requestId"])
        draw = market.functions.drawCommittee(rid)
        receipt = self.tx(requester, draw, label and f"ModelMarketplace.drawCommittee {label}")
        (drawn,) = market.events.CommitteeDrawn().process_receipt(receipt, errors=DISCARD)
        return rid, list(drawn["args"]["committee"])

    def certify(
        self, request_id: bytes, committee: Sequence[str], count: int, label: str | None = None
    ) -> None:
        poi = self.contract("ProofOfInference")
        domain = Eip712Domain(self.w3.eth.chain_id, poi.address)
        output = keccak(b"output" + request_id)
        # Steady state: prefer signers whose reward slot is already written.
        signers = sorted(committee, key=lambda a: a not in self.signed_before)[:count]
        by_address: dict[str, LocalAccount] = {a.address: a for a in self.accounts}
        digest = domain.result_digest(request_id, output)
        signatures = [sign(NodeKey(bytes(by_address[s].key)), digest) for s in signers]
        if label is not None:
            fresh = sum(s not in self.signed_before for s in signers)
            if fresh:
                label += f", {fresh} first-time signer{'s' if fresh > 1 else ''}"
        call = poi.functions.submitCertificate(request_id, output, signers, signatures)
        self.tx(self.accounts[NODES + 7], call, label)
        self.signed_before.update(signers)
        self.signers[request_id] = signers

    def prepaid(self, committee: Sequence[LocalAccount], clients: Sequence[LocalAccount]) -> None:
        """Signed requests settled in batches of 1, 16 and 64 (2 of 3 sign each certificate),
        each certificate's signatures in the batch, then (16 and 64) the three members'
        vouchers instead: the batch's gas and its share per request, after a warm-up batch
        (the clients' nonce words, the payees' claimable slots already written)."""
        prepaid, token = self.contract("PrepaidInference"), self.contract("JoyToken")
        poi = self.contract("ProofOfInference")
        domain = Eip712Domain(self.w3.eth.chain_id, poi.address)
        for index, client in enumerate(clients):
            self.tx(self.admin, token.functions.transfer(client.address, 10_000 * PRICE))
            self.tx(client, token.functions.approve(prepaid.address, 10_000 * PRICE))
            label = "PrepaidInference.deposit (first)" if index == 0 else None
            self.tx(client, prepaid.functions.deposit(1000 * PRICE), label)
        nonces = iter(range(1, 1 << 20))
        model = model_id(model_cid(10, 3))
        members = [m.address for m in committee]

        def redemption(client: LocalAccount) -> Redemption:
            request = PrepaidRequest(
                self.w3.eth.chain_id,
                prepaid.address,
                client.address,
                model,
                ZERO_HASH,
                PRICE,
                next(nonces),
                self.now() + 3600,
                tuple(members),
            )
            digest = domain.result_digest(prepaid_request_id(request), OUTPUT)
            # Two of three sign, in turn (a member who never signed would lose its
            # reputation, and its eligibility, over the runs).
            signers = [m for i, m in enumerate(committee) if i != request.nonce % 3]
            signatures = [sign(NodeKey(bytes(m.key)), digest) for m in signers]
            signed_by = sum(1 << i for i, m in enumerate(committee) if m in signers)
            client_signature = sign_prepaid_request(client, request)
            return Redemption(request, client_signature, OUTPUT, signed_by, b"".join(signatures))

        def vouchers(batch: list[Redemption]) -> dict[str, bytes]:
            ids = [prepaid_request_id(r.request) for r in batch]
            covered = results_by_member(ids, batch)
            return {
                m.address.lower(): sign(
                    NodeKey(bytes(m.key)),
                    voucher_digest(
                        self.w3.eth.chain_id,
                        prepaid.address,
                        results_chain(covered[m.address.lower()]),
                    ),
                )
                for m in committee
            }

        for size, vouched in (
            (0, False),
            (1, False),
            (16, False),
            (64, False),
            (16, True),
            (64, True),
        ):
            batch = [redemption(clients[i % len(clients)]) for i in range(size or 8)]
            packed = pack_batch(batch, vouchers(batch) if vouched else None)
            receipt = self.tx(self.admin, prepaid.functions.settleBatch(packed))
            refused = prepaid.events.SettlementRefused().process_receipt(receipt, errors=DISCARD)
            assert not refused, (size, vouched, [e["args"]["reason"] for e in refused][:3])
            (settled,) = prepaid.events.Settled().process_receipt(receipt, errors=DISCARD)
            assert len(settled["args"]["requestIds"]) == len(batch)
            if size:
                gas = int(receipt["gasUsed"])
                how = "3 vouchers" if vouched else "2/3 signed"
                self.record(f"PrepaidInference.settleBatch ({size} requests, {how})", gas)
                self.record(
                    f"PrepaidInference.settleBatch ({size}, {how}), per request", gas // size
                )

    def request_with_permit(self, user: LocalAccount, cid: str) -> None:
        token, market = self.contract("JoyToken"), self.contract("ModelMarketplace")
        deadline = self.now() + 3600
        nonce = int(token.functions.nonces(user.address).call())
        v, r, s_ = sign_permit(
            user,
            Permit(
                self.w3.eth.chain_id,
                token.address,
                user.address,
                market.address,
                PRICE,
                nonce,
                deadline,
            ),
        )
        model = model_id(cid)
        call = market.functions.requestInferenceWithPermit(
            model,
            ZERO_HASH,
            PRICE,
            deadline,
            deadline,
            v,
            r,
            s_,
        )
        label = "ModelMarketplace.requestInferenceWithPermit (10 nodes, committee 3, first request)"
        self.tx(user, call, label)

    def table(self) -> str:
        baseline = dict(self.rows)["JoyToken.transfer (baseline)"]
        lines = [
            "| call | gas used | x transfer |",
            "|------|---------:|-----------:|",
        ]
        for label, gas in self.rows:
            lines.append(f"| {label} | {gas:,} | {gas / baseline:.2f} |")
        return "\n".join(lines)


def anvil_version() -> str:
    out = subprocess.run(
        [str(anvil_binary()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()[0].strip()


def main() -> None:
    started = time.monotonic()
    artifacts = load_artifacts()
    with fresh_anvil(ACCOUNTS) as url:
        bench = Bench(url)
        bench.run()
    print(
        f"{anvil_version()}; solc {artifacts.compiler.split('+')[0]}, viaIR, optimizer "
        f"{artifacts.optimizer_runs} runs, evm {artifacts.evm_version}; "
        f"{time.monotonic() - started:.1f} s\n"
    )
    print(bench.table())


if __name__ == "__main__":
    main()
