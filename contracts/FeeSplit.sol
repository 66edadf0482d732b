// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title How a request's price is shared out, the same for escrowed and prepaid requests.
/// @notice The platform fee (`feeBps` of the price) goes `signersBps` of it to the
/// certificate's signers (equal parts; the rounding remainder to the treasury),
/// `stakersBps` to the stakers, the rest to the treasury; the owner's portion (the price
/// less the fee) pays each royalty recipient its bps of it, and the owner the rest.
library FeeSplit {
    struct Shares {
        uint256 fee;
        uint256 toSigners;
        uint256 toStakers;
        uint256 toTreasury;
        uint256 ownerPortion;
    }

    function shares(uint256 price, uint16 feeBps, uint16 signersBps, uint16 stakersBps)
        internal
        pure
        returns (Shares memory s)
    {
        s.fee = (price * feeBps) / 10_000;
        s.toSigners = (s.fee * signersBps) / 10_000;
        s.toStakers = (s.fee * stakersBps) / 10_000;
        s.toTreasury = s.fee - s.toSigners - s.toStakers;
        s.ownerPortion = price - s.fee;
    }

    function royalty(uint256 ownerPortion, uint16 bps) internal pure returns (uint256) {
        return (ownerPortion * bps) / 10_000;
    }
}
