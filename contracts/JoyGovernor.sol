// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IVotes} from "@openzeppelin/contracts/governance/utils/IVotes.sol";
import {Governor} from "@openzeppelin/contracts/governance/Governor.sol";
import {GovernorCountingSimple} from "@openzeppelin/contracts/governance/extensions/GovernorCountingSimple.sol";
import {GovernorPreventLateQuorum} from "@openzeppelin/contracts/governance/extensions/GovernorPreventLateQuorum.sol";
import {GovernorProposalGuardian} from "@openzeppelin/contracts/governance/extensions/GovernorProposalGuardian.sol";
import {GovernorSettings} from "@openzeppelin/contracts/governance/extensions/GovernorSettings.sol";
import {GovernorTimelockControl} from "@openzeppelin/contracts/governance/extensions/GovernorTimelockControl.sol";
import {GovernorVotes} from "@openzeppelin/contracts/governance/extensions/GovernorVotes.sol";
import {GovernorVotesQuorumFraction} from
    "@openzeppelin/contracts/governance/extensions/GovernorVotesQuorumFraction.sol";
import {TimelockController} from "@openzeppelin/contracts/governance/TimelockController.sol";
import {IERC5805} from "@openzeppelin/contracts/interfaces/IERC5805.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";

/// @title The JoyNet DAO: JOY holders and stakers propose and vote; the timelock executes.
/// @notice OpenZeppelin's Governor, counting For/Against/Abstain, with a quorum as a
/// fraction of JOY's supply, a late-quorum extension and a timelock. JoyNet's own
/// logic is small:
/// - votes are JOY votes plus stJOY votes (active stake in the NodeCoordinator), both
///   by timestamp, so stakers vote with what they staked;
/// - every setting has bounds (shorter periods only on the devnet's chain id);
/// - the guardian (a security council the DAO sets, or none) can cancel a proposal
///   only while it is queued in the timelock, and do nothing else.
contract JoyGovernor is
    Governor,
    GovernorVotes, // before GovernorSettings: the threshold's bound reads the token
    GovernorSettings,
    GovernorCountingSimple,
    GovernorVotesQuorumFraction,
    GovernorTimelockControl,
    GovernorPreventLateQuorum,
    GovernorProposalGuardian
{
    uint256 private constant DEVNET_CHAIN_ID = 31337;

    IVotes public immutable stakeVotes;

    error OutOfBounds(string parameter);

    struct Settings {
        uint48 votingDelay; // seconds
        uint32 votingPeriod; // seconds
        uint256 proposalThreshold; // votes
        uint256 quorumPercent;
        uint48 lateQuorumExtension; // seconds
        address guardian;
    }

    constructor(IERC5805 token, IVotes stakeVotes_, TimelockController timelock, Settings memory settings)
        Governor("JoyNet DAO")
        GovernorVotes(token)
        GovernorSettings(settings.votingDelay, settings.votingPeriod, settings.proposalThreshold)
        GovernorVotesQuorumFraction(settings.quorumPercent)
        GovernorTimelockControl(timelock)
        GovernorPreventLateQuorum(settings.lateQuorumExtension)
    {
        stakeVotes = stakeVotes_;
        _setProposalGuardian(settings.guardian);
    }

    // ---- votes: JOY plus staked JOY

    function _getVotes(address account, uint256 timepoint, bytes memory params)
        internal
        view
        override(Governor, GovernorVotes)
        returns (uint256)
    {
        return super._getVotes(account, timepoint, params) + stakeVotes.getPastVotes(account, timepoint);
    }

    // ---- the guardian cancels queued proposals only

    function _validateCancel(uint256 proposalId, address caller)
        internal
        view
        override(Governor, GovernorProposalGuardian)
        returns (bool)
    {
        if (caller == proposalGuardian()) return state(proposalId) == ProposalState.Queued;
        return Governor._validateCancel(proposalId, caller); // the proposer, while Pending
    }

    // ---- bounded settings

    function _setVotingDelay(uint48 value) internal override {
        _bounded(value, 1 hours, 14 days, "votingDelay");
        super._setVotingDelay(value);
    }

    function _setVotingPeriod(uint32 value) internal override {
        _bounded(value, 1 days, 30 days, "votingPeriod");
        super._setVotingPeriod(value);
    }

    function _setProposalThreshold(uint256 value) internal override {
        // At most 1 % of the supply (JOY's is fixed), so no few holders decide who may propose.
        if (value > IERC20(address(token())).totalSupply() / 100) revert OutOfBounds("proposalThreshold");
        super._setProposalThreshold(value);
    }

    function _updateQuorumNumerator(uint256 value) internal override {
        if (value < 1 || value > 50) revert OutOfBounds("quorumPercent");
        super._updateQuorumNumerator(value);
    }

    function _setLateQuorumVoteExtension(uint48 value) internal override {
        _bounded(value, 1 hours, 14 days, "lateQuorumExtension");
        super._setLateQuorumVoteExtension(value);
    }

    /// `value` within [shortest, longest]; on the devnet, shortest is one second.
    function _bounded(uint256 value, uint256 shortest, uint256 longest, string memory parameter) private view {
        if (block.chainid == DEVNET_CHAIN_ID) shortest = 1;
        if (value < shortest || value > longest) revert OutOfBounds(parameter);
    }

    // ---- the overrides Solidity asks for

    function proposalThreshold() public view override(Governor, GovernorSettings) returns (uint256) {
        return super.proposalThreshold();
    }

    function proposalDeadline(uint256 proposalId)
        public
        view
        override(Governor, GovernorPreventLateQuorum)
        returns (uint256)
    {
        return super.proposalDeadline(proposalId);
    }

    function _tallyUpdated(uint256 proposalId) internal override(Governor, GovernorPreventLateQuorum) {
        super._tallyUpdated(proposalId);
    }

    function state(uint256 proposalId)
        public
        view
        override(Governor, GovernorTimelockControl)
        returns (ProposalState)
    {
        return super.state(proposalId);
    }

    function proposalNeedsQueuing(uint256 proposalId)
        public
        view
        override(Governor, GovernorTimelockControl)
        returns (bool)
    {
        return super.proposalNeedsQueuing(proposalId);
    }

    function _queueOperations(
        uint256 proposalId,
        address[] memory targets,
        uint256[] memory values,
        bytes[] memory calldatas,
        bytes32 descriptionHash
    ) internal override(Governor, GovernorTimelockControl) returns (uint48) {
        return super._queueOperations(proposalId, targets, values, calldatas, descriptionHash);
    }

    function _executeOperations(
        uint256 proposalId,
        address[] memory targets,
        uint256[] memory values,
        bytes[] memory calldatas,
        bytes32 descriptionHash
    ) internal override(Governor, GovernorTimelockControl) {
        super._executeOperations(proposalId, targets, values, calldatas, descriptionHash);
    }

    function _cancel(
        address[] memory targets,
        uint256[] memory values,
        bytes[] memory calldatas,
        bytes32 descriptionHash
    ) internal override(Governor, GovernorTimelockControl) returns (uint256) {
        return super._cancel(targets, values, calldatas, descriptionHash);
    }

    function _executor() internal view override(Governor, GovernorTimelockControl) returns (address) {
        return super._executor();
    }
}
