// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {TimelockController} from "@openzeppelin/contracts/governance/TimelockController.sol";

/// @title The DAO's timelock: the only holder of every power in JoyNet, and its treasury.
/// @notice OpenZeppelin's TimelockController: the governor proposes, cancels and
/// executes (its `execute` is open to anyone once the delay has passed). The delay has bounds, so no vote can
/// take away the time holders have to react (or exit) before a change lands.
contract JoyTimelock is TimelockController {
    uint256 public constant MIN_DELAY = 1 days; // 10 seconds on the devnet
    uint256 public constant MAX_DELAY = 30 days;
    uint256 private constant DEVNET_CHAIN_ID = 31337;

    error OutOfBounds(string parameter);

    constructor(uint256 minDelay, address[] memory proposers, address[] memory executors, address admin)
        TimelockController(minDelay, proposers, executors, admin)
    {
        _checkDelay(minDelay);
    }

    function updateDelay(uint256 newDelay) public override {
        _checkDelay(newDelay);
        super.updateDelay(newDelay);
    }

    function _checkDelay(uint256 delay) private view {
        uint256 shortest = block.chainid == DEVNET_CHAIN_ID ? 10 seconds : MIN_DELAY;
        if (delay < shortest || delay > MAX_DELAY) revert OutOfBounds("timelockDelay");
    }
}
