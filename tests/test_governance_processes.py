"""Three ``joynode run`` processes on anvil pass a proposal with their stake's votes.

Each node is a dev account that stakes 20M JOY (the deployer gives it), so its
votes are stJOY's alone: nobody delegates any JOY, and three stakes of 20M
clear the quorum of 40M (4 % of the supply). Node A proposes a fee change with
``joynode gov propose FILE``; each node votes through ``joynode ctl gov.vote``;
then ``joynode gov`` queues and executes it, and the marketplace charges the
new fee.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from joynode.chain.deploy import JOY
from joynode.keys import NodeKey
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account
from tests.factories import NodeProcess, run_cli
from tests.test_chain import rpc_home

__all__ = ["anvil_url", "chain", "deployed"]

STAKE = 20_000_000 * JOY
PROPOSAL = """\
description = "Raise the marketplace fee to 5 %"

[[actions]]
contract = "ModelMarketplace"
function = "setParameters(uint16,uint16,uint16,address)"
args = [500, 4000, 3000, "JoyTimelock"]
"""


def gov(config: Path, *args: str) -> str:
    done = run_cli("gov", *args, "--config", str(config))
    assert done.returncode == 0, done.stderr
    return done.stdout


def shown_state(config: Path, proposal: str, state: str, within_s: float = 20) -> dict[str, object]:
    """``joynode gov show --json`` once the node's mirror says ``state``."""
    deadline = time.monotonic() + within_s
    while True:
        shown: dict[str, object] = json.loads(gov(config, "show", proposal, "--json"))
        if shown["state"] == state or time.monotonic() > deadline:
            assert shown["state"] == state, shown
            return shown
        time.sleep(0.3)


@pytest.mark.slow
def test_three_staked_node_processes_pass_a_proposal_with_their_stake_votes(
    tmp_path: Path, chain: Chain
) -> None:
    token, coordinator = chain.contract("JoyToken"), chain.contract("NodeCoordinator")
    accounts = [dev_account(10 + i) for i in range(3)]
    for account in accounts:
        chain.sender(chain.admin).transact(token.functions.transfer(account.address, STAKE))
        sender = chain.sender(account)
        sender.transact(token.functions.approve(coordinator.address, STAKE))
        sender.transact(coordinator.functions.stake(STAKE))
    homes = []
    for name, account in zip("abc", accounts, strict=True):
        home = rpc_home(tmp_path / name, chain)
        home.set("chain", "block_range", "1000")
        NodeKey(bytes(account.key)).save(home.config.node.key_file, force=True)
        homes.append(home)
    processes = [NodeProcess(home) for home in homes]
    try:
        for process in processes:
            process.wait_ready(60)
        configs = [home.config_path for home in homes]
        status = json.loads(gov(configs[0], "status", "--json"))
        assert status["votes"] == {"joy": "0", "staked": str(STAKE), "total": str(STAKE)}
        assert status["delegates"]["staked"] == accounts[0].address  # by the first stake

        proposal_file = tmp_path / "fee.toml"
        proposal_file.write_text(PROPOSAL)
        proposed = json.loads(gov(configs[0], "propose", str(proposal_file), "--json"))
        proposal = proposed["proposal_id"]
        chain.advance_to(proposed["voting_starts"])
        shown_state(configs[2], proposal, "Active")
        for config in configs:
            done = run_cli(
                "ctl",
                "--config",
                str(config),
                "gov.vote",
                json.dumps({"proposal": proposal, "support": "for", "reason": "stakers agree"}),
            )
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["weight"] == str(STAKE)

        chain.advance_to(proposed["voting_ends"] + 1)
        shown = shown_state(configs[1], proposal, "Succeeded")
        assert shown["votes"] == {"for": str(3 * STAKE), "against": "0", "abstain": "0"}
        assert shown["quorum"] == str(40_000_000 * JOY)
        assert shown["quorum_reached"] is True
        text = gov(configs[1], "show", proposal[:10])
        assert "for 60,000,000 JOY, against 0 JOY, abstain 0 JOY; quorum 40,000,000 JOY" in text
        assert "1. ModelMarketplace.setParameters(feeBps=500, signersBps=4000" in text

        queued = json.loads(gov(configs[1], "queue", proposal, "--json"))
        chain.advance_to(queued["eta"])
        assert "executed" in gov(configs[2], "execute", proposal)
        assert chain.contract("ModelMarketplace").functions.feeBps().call() == 500
        shown_state(configs[0], proposal, "Executed")
        assert "Executed" in gov(configs[0], "list")
    finally:
        for process in processes:
            process.kill()
