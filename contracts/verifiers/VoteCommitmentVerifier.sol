// SPDX-License-Identifier: MIT
// This file is MIT Licensed.
//
// Copyright 2017 Christian Reitwiessner
// Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated documentation files (the "Software"), to deal in the Software without restriction, including without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the following conditions:
// The above copyright notice and this permission notice shall be included in all copies or substantial portions of the Software.
// THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
pragma solidity ^0.8.0;
library VoteCommitmentVerifierPairing {
    struct G1Point {
        uint X;
        uint Y;
    }
    // Encoding of field elements is: X[0] * z + X[1]
    struct G2Point {
        uint[2] X;
        uint[2] Y;
    }
    /// @return the generator of G1
    function P1() pure internal returns (G1Point memory) {
        return G1Point(1, 2);
    }
    /// @return the generator of G2
    function P2() pure internal returns (G2Point memory) {
        return G2Point(
            [10857046999023057135944570762232829481370756359578518086990519993285655852781,
             11559732032986387107991004021392285783925812861821192530917403151452391805634],
            [8495653923123431417604973247489272438418190587263600148770280649306958101930,
             4082367875863433681332203403145435568316851327593401208105741076214120093531]
        );
    }
    /// @return the negation of p, i.e. p.addition(p.negate()) should be zero.
    function negate(G1Point memory p) pure internal returns (G1Point memory) {
        // The prime q in the base field F_q for G1
        uint q = 21888242871839275222246405745257275088696311157297823662689037894645226208583;
        if (p.X == 0 && p.Y == 0)
            return G1Point(0, 0);
        return G1Point(p.X, q - (p.Y % q));
    }
    /// @return r the sum of two points of G1
    function addition(G1Point memory p1, G1Point memory p2) internal view returns (G1Point memory r) {
        uint[4] memory input;
        input[0] = p1.X;
        input[1] = p1.Y;
        input[2] = p2.X;
        input[3] = p2.Y;
        bool success;
        assembly {
            success := staticcall(sub(gas(), 2000), 6, input, 0xc0, r, 0x60)
            // Use "invalid" to make gas estimation work
            switch success case 0 { invalid() }
        }
        require(success);
    }


    /// @return r the product of a point on G1 and a scalar, i.e.
    /// p == p.scalar_mul(1) and p.addition(p) == p.scalar_mul(2) for all points p.
    function scalar_mul(G1Point memory p, uint s) internal view returns (G1Point memory r) {
        uint[3] memory input;
        input[0] = p.X;
        input[1] = p.Y;
        input[2] = s;
        bool success;
        assembly {
            success := staticcall(sub(gas(), 2000), 7, input, 0x80, r, 0x60)
            // Use "invalid" to make gas estimation work
            switch success case 0 { invalid() }
        }
        require (success);
    }
    /// @return the result of computing the pairing check
    /// e(p1[0], p2[0]) *  .... * e(p1[n], p2[n]) == 1
    /// For example pairing([P1(), P1().negate()], [P2(), P2()]) should
    /// return true.
    function pairing(G1Point[] memory p1, G2Point[] memory p2) internal view returns (bool) {
        require(p1.length == p2.length);
        uint elements = p1.length;
        uint inputSize = elements * 6;
        uint[] memory input = new uint[](inputSize);
        for (uint i = 0; i < elements; i++)
        {
            input[i * 6 + 0] = p1[i].X;
            input[i * 6 + 1] = p1[i].Y;
            input[i * 6 + 2] = p2[i].X[1];
            input[i * 6 + 3] = p2[i].X[0];
            input[i * 6 + 4] = p2[i].Y[1];
            input[i * 6 + 5] = p2[i].Y[0];
        }
        uint[1] memory out;
        bool success;
        assembly {
            success := staticcall(sub(gas(), 2000), 8, add(input, 0x20), mul(inputSize, 0x20), out, 0x20)
            // Use "invalid" to make gas estimation work
            switch success case 0 { invalid() }
        }
        require(success);
        return out[0] != 0;
    }
    /// Convenience method for a pairing check for two pairs.
    function pairingProd2(G1Point memory a1, G2Point memory a2, G1Point memory b1, G2Point memory b2) internal view returns (bool) {
        G1Point[] memory p1 = new G1Point[](2);
        G2Point[] memory p2 = new G2Point[](2);
        p1[0] = a1;
        p1[1] = b1;
        p2[0] = a2;
        p2[1] = b2;
        return pairing(p1, p2);
    }
    /// Convenience method for a pairing check for three pairs.
    function pairingProd3(
            G1Point memory a1, G2Point memory a2,
            G1Point memory b1, G2Point memory b2,
            G1Point memory c1, G2Point memory c2
    ) internal view returns (bool) {
        G1Point[] memory p1 = new G1Point[](3);
        G2Point[] memory p2 = new G2Point[](3);
        p1[0] = a1;
        p1[1] = b1;
        p1[2] = c1;
        p2[0] = a2;
        p2[1] = b2;
        p2[2] = c2;
        return pairing(p1, p2);
    }
    /// Convenience method for a pairing check for four pairs.
    function pairingProd4(
            G1Point memory a1, G2Point memory a2,
            G1Point memory b1, G2Point memory b2,
            G1Point memory c1, G2Point memory c2,
            G1Point memory d1, G2Point memory d2
    ) internal view returns (bool) {
        G1Point[] memory p1 = new G1Point[](4);
        G2Point[] memory p2 = new G2Point[](4);
        p1[0] = a1;
        p1[1] = b1;
        p1[2] = c1;
        p1[3] = d1;
        p2[0] = a2;
        p2[1] = b2;
        p2[2] = c2;
        p2[3] = d2;
        return pairing(p1, p2);
    }
}

contract VoteCommitmentVerifier {
    using VoteCommitmentVerifierPairing for *;
    struct VerifyingKey {
        VoteCommitmentVerifierPairing.G1Point alpha;
        VoteCommitmentVerifierPairing.G2Point beta;
        VoteCommitmentVerifierPairing.G2Point gamma;
        VoteCommitmentVerifierPairing.G2Point delta;
        VoteCommitmentVerifierPairing.G1Point[] gamma_abc;
    }
    struct Proof {
        VoteCommitmentVerifierPairing.G1Point a;
        VoteCommitmentVerifierPairing.G2Point b;
        VoteCommitmentVerifierPairing.G1Point c;
    }
    function verifyingKey() pure internal returns (VerifyingKey memory vk) {
        vk.alpha = VoteCommitmentVerifierPairing.G1Point(uint256(0x19425a8da0c55f1abcb3f669302008540d1c97a14443c0acf7f6f05bba131c02), uint256(0x29609a531750a9391a7909f9c1744ce5d5ae8ca10c433dce9e182494ed838b5f));
        vk.beta = VoteCommitmentVerifierPairing.G2Point([uint256(0x2cdfa77efdc6c3c8a91b33c6d72e13b638e1d487ff327fcca3d591d7978f4d5e), uint256(0x0f1b39ff6615794f5a1eac88b62a2d194f80c31b02ed4840857173f024a453d3)], [uint256(0x1b8777a88e2564a5e04f18b29fa4532a749f12a42197d412f825b195beb33724), uint256(0x0fa098b8d3b1f0e54bbaba1cbe6ab0794dbace14436a470c1f596cd82f7868ba)]);
        vk.gamma = VoteCommitmentVerifierPairing.G2Point([uint256(0x099dd3747cf381ca4c43323a58197a579f2bc01b92909beb2219aa166308c0df), uint256(0x12672a309fc7798e1af5806e2117b7c4ed41b8d5705695271d65152139d1d11a)], [uint256(0x0ce715f0e7f1751f493d4cd7be7fd434db19f05e65734e9b7ec598c5d49df5fb), uint256(0x2843e9490ee0378d576da6a1a8c115cf0c7a44fce584514f4ce0fe048b3bc4ac)]);
        vk.delta = VoteCommitmentVerifierPairing.G2Point([uint256(0x2fd88b16375c046c530345ebc18d67db22b2ae02b58c7677db402e1add3b9983), uint256(0x0fc335b36a4717754e172b219ac50a856a6db0098da7eb31fcecbecfdcd9ae4b)], [uint256(0x2ab4a8ce749f4d7df2a757a46bd24ae02da513640a17de698965f452f59e02f6), uint256(0x13c271a887f89cb049cc2ac32595f404ef46e9a0c0fb92628cebbfb0fa37dfe2)]);
        vk.gamma_abc = new VoteCommitmentVerifierPairing.G1Point[](4);
        vk.gamma_abc[0] = VoteCommitmentVerifierPairing.G1Point(uint256(0x264bff86a20b3bcfa9a0d3d45ae3016b30560022a53412719120cbb8ee2a1cbe), uint256(0x1fdf8f29166b841ed6d3f0678dca76a01ffda6c9c1725ae90ea0cfe7f0f1b347));
        vk.gamma_abc[1] = VoteCommitmentVerifierPairing.G1Point(uint256(0x16ab19e159cba99c174dfc31eed6b77f730c17e2a3478550de230c580aaac4db), uint256(0x0ff871c01cf11b985b5c0deedb1c020f8bcc95d0e1e117249a97840c0f86feb8));
        vk.gamma_abc[2] = VoteCommitmentVerifierPairing.G1Point(uint256(0x03eeeba46dd6c7f416b72bf51bfef8a69d5a1818e3fe96638addd6e32e1ff5ad), uint256(0x2c54ab7486777e88afedeb284b925b986b819dff7a046ef04622397af33ba7e8));
        vk.gamma_abc[3] = VoteCommitmentVerifierPairing.G1Point(uint256(0x0c4ea137cc70ebcfe44f358e66e349a3e748c5d1206321c7e278d1b3f7f11806), uint256(0x14a595f786639dcb1c7922c7369f9081292250c1fadd39644cc3a5fe8283adc9));
    }
    function verify(uint[] memory input, Proof memory proof) internal view returns (uint) {
        uint256 snark_scalar_field = 21888242871839275222246405745257275088548364400416034343698204186575808495617;
        VerifyingKey memory vk = verifyingKey();
        require(input.length + 1 == vk.gamma_abc.length);
        // Compute the linear combination vk_x
        VoteCommitmentVerifierPairing.G1Point memory vk_x = VoteCommitmentVerifierPairing.G1Point(0, 0);
        for (uint i = 0; i < input.length; i++) {
            require(input[i] < snark_scalar_field);
            vk_x = VoteCommitmentVerifierPairing.addition(vk_x, VoteCommitmentVerifierPairing.scalar_mul(vk.gamma_abc[i + 1], input[i]));
        }
        vk_x = VoteCommitmentVerifierPairing.addition(vk_x, vk.gamma_abc[0]);
        if(!VoteCommitmentVerifierPairing.pairingProd4(
             proof.a, proof.b,
             VoteCommitmentVerifierPairing.negate(vk_x), vk.gamma,
             VoteCommitmentVerifierPairing.negate(proof.c), vk.delta,
             VoteCommitmentVerifierPairing.negate(vk.alpha), vk.beta)) return 1;
        return 0;
    }
    function verifyTx(
            Proof memory proof, uint[3] memory input
        ) public view returns (bool r) {
        uint[] memory inputValues = new uint[](3);
        
        for(uint i = 0; i < input.length; i++){
            inputValues[i] = input[i];
        }
        if (verify(inputValues, proof) == 0) {
            return true;
        } else {
            return false;
        }
    }
}
