// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {AccessControlUpgradeable} from "@openzeppelin/contracts-upgradeable/access/AccessControlUpgradeable.sol";
import {Initializable} from "@openzeppelin/contracts-upgradeable/proxy/utils/Initializable.sol";
import {UUPSUpgradeable} from "@openzeppelin/contracts-upgradeable/proxy/utils/UUPSUpgradeable.sol";

/// @title What every JoyNet contract that holds state shares: one governance
/// (the DAO's timelock) that sets parameters, grants roles and approves upgrades.
/// @notice Each contract lives behind an ERC-1967 proxy (UUPS): its address and
/// state stay while governance points it at a new implementation. Governance is
/// DEFAULT_ADMIN_ROLE; `updateGovernance` hands it to a new timelock (a new governor).
/// Parameter bounds are hard-coded in each setter, so no vote can set a ruinous value;
/// a few bounds are relaxed on the devnet chain id, where a day is too long to wait.
abstract contract JoyGoverned is Initializable, AccessControlUpgradeable, UUPSUpgradeable {
    uint256 internal constant DEVNET_CHAIN_ID = 31337;

    event GovernanceUpdated(address indexed previous, address indexed next);

    error OutOfBounds(string parameter);

    /// @custom:oz-upgrades-unsafe-allow constructor
    constructor() {
        _disableInitializers();
    }

    modifier onlyGovernance() {
        _checkRole(DEFAULT_ADMIN_ROLE);
        _;
    }

    function __JoyGoverned_init(address governance) internal onlyInitializing {
        if (governance == address(0)) revert OutOfBounds("governance");
        _grantRole(DEFAULT_ADMIN_ROLE, governance);
    }

    /// Hand governance of this contract to `next` (the timelock of a new governor).
    function updateGovernance(address next) external onlyGovernance {
        if (next == address(0) || next == msg.sender) revert OutOfBounds("governance");
        _grantRole(DEFAULT_ADMIN_ROLE, next);
        _revokeRole(DEFAULT_ADMIN_ROLE, msg.sender);
        emit GovernanceUpdated(msg.sender, next);
    }

    function _authorizeUpgrade(address) internal view override onlyGovernance {}

    /// The shortest a delay may be: `production` on real chains, `devnet` on the devnet's chain id.
    function _atLeast(uint256 value, uint256 production, uint256 devnet, string memory parameter) internal view {
        if (value < (block.chainid == DEVNET_CHAIN_ID ? devnet : production)) revert OutOfBounds(parameter);
    }
}
