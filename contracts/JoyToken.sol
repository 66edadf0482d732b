// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {ERC20Votes} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Votes.sol";
import {Nonces} from "@openzeppelin/contracts/utils/Nonces.sol";

/// @title JOY, the token JoyNet's inference is paid and staked in, and the DAO votes with.
/// @notice Fixed supply minted once at deploy, no owner and no roles, and not
/// upgradeable: holders can rely on it never changing. Permit (EIP-2612) for
/// gasless approvals; votes (ERC-5805) counted by timestamp (ERC-6372), as the
/// governor and the staked-JOY votes are, so every governance period is in seconds.
contract JoyToken is ERC20, ERC20Permit, ERC20Votes {
    constructor(address holder, uint256 supply) ERC20("JoyNet", "JOY") ERC20Permit("JoyNet") {
        _mint(holder, supply);
    }

    function clock() public view override returns (uint48) {
        return uint48(block.timestamp);
    }

    // solhint-disable-next-line func-name-mixedcase
    function CLOCK_MODE() public pure override returns (string memory) {
        return "mode=timestamp";
    }

    function _update(address from, address to, uint256 value) internal override(ERC20, ERC20Votes) {
        super._update(from, to, value);
    }

    function nonces(address owner) public view override(ERC20Permit, Nonces) returns (uint256) {
        return super.nonces(owner);
    }
}
