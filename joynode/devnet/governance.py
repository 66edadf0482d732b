"""The devnet's DAO: voting power for the dev accounts, and where governance stands.

Staked nodes vote with their stake without doing anything (stJOY delegates to
its holder at the first stake); JOY votes only once delegated, so each dev
account holding JOY delegates to itself (once). ``governance_lines`` is what
``joynode devnet`` prints and keeps for ``joynode devnet status``.
"""

from __future__ import annotations

from eth_account.signers.local import LocalAccount
from web3 import Web3

from joynode.chain.anvil import dev_account
from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import ZERO_ADDRESS, Deployment
from joynode.chain.sender import RevertDecoder, TransactionSender
from joynode.governance.display import joy, settings_line

DEV_ACCOUNTS = 10  # anvil's funded accounts that the devnet uses


def give_votes(w3: Web3, deployment: Deployment) -> list[LocalAccount]:
    """Every dev account holding JOY delegates it to itself, if it has not; those that did."""
    token = deployment.contract(w3, "JoyToken")
    decoder = RevertDecoder(load_artifacts().contracts.values())
    delegated = []
    for index in range(DEV_ACCOUNTS):
        account = dev_account(index)
        if token.functions.balanceOf(account.address).call() == 0:
            continue
        if token.functions.delegates(account.address).call() != ZERO_ADDRESS:
            continue
        TransactionSender(w3, account, decoder).transact(token.functions.delegate(account.address))
        delegated.append(account)
    return delegated


def governance_lines(w3: Web3, deployment: Deployment, voters: list[tuple[str, str]]) -> list[str]:
    """The governor and timelock, their settings, and the votes of each ``(label, address)``."""
    governor = deployment.contract(w3, "JoyGovernor").functions
    timelock = deployment.contract(w3, "JoyTimelock").functions
    token = deployment.contract(w3, "JoyToken").functions
    staked = deployment.contract(w3, "StakedJoy").functions
    settings = {
        "voting_delay_s": governor.votingDelay().call(),
        "voting_period_s": governor.votingPeriod().call(),
        "quorum_percent": governor.quorumNumerator().call(),
        "proposal_threshold": governor.proposalThreshold().call(),
        "late_quorum_extension_s": governor.lateQuorumVoteExtension().call(),
        "timelock_delay_s": timelock.getMinDelay().call(),
    }
    votes = []
    for label, address in voters:
        from_joy, from_stake = token.getVotes(address).call(), staked.getVotes(address).call()
        votes.append(f"{label} {joy(from_joy + from_stake)}" + (" (stake)" if not from_joy else ""))
    return [
        f"governance: JoyGovernor {deployment.addresses['JoyGovernor']}, JoyTimelock "
        f"{deployment.addresses['JoyTimelock']} (admin of every contract, and the treasury)",
        f"  {settings_line(settings)}",
        f"  votes: {'; '.join(votes)}",
    ]
