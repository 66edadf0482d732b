// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Votes} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Votes.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";

/// @title stJOY: a receipt for JOY staked in the NodeCoordinator, carrying its votes.
/// @notice Staked JOY sits in the coordinator, whose own JOY never votes; the
/// coordinator mints stJOY 1:1 to the staker on stake and burns it on unstake or
/// slash, so the governor counts a staker's active stake as votes (JOY votes plus
/// stJOY votes). It cannot be transferred. A staker's votes go to themself until
/// they delegate elsewhere (`delegate`, or `delegateBySig` without gas).
contract StakedJoy is ERC20, ERC20Votes, AccessControl {
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    error NotTransferable();

    constructor(address admin) ERC20("Staked JoyNet", "stJOY") EIP712("Staked JoyNet", "1") {
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    function mint(address to, uint256 amount) external onlyRole(MINTER_ROLE) {
        _mint(to, amount);
    }

    function burn(address from, uint256 amount) external onlyRole(MINTER_ROLE) {
        _burn(from, amount);
    }

    function clock() public view override returns (uint48) {
        return uint48(block.timestamp);
    }

    // solhint-disable-next-line func-name-mixedcase
    function CLOCK_MODE() public pure override returns (string memory) {
        return "mode=timestamp";
    }

    function _update(address from, address to, uint256 value) internal override(ERC20, ERC20Votes) {
        if (from != address(0) && to != address(0)) revert NotTransferable();
        super._update(from, to, value);
        // A first stake votes for the staker without a second transaction.
        if (to != address(0) && delegates(to) == address(0)) _delegate(to, to);
    }
}
