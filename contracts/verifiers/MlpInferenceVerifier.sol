// SPDX-License-Identifier: MIT
// This file is MIT Licensed.
//
// Copyright 2017 Christian Reitwiessner
// Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated documentation files (the "Software"), to deal in the Software without restriction, including without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the following conditions:
// The above copyright notice and this permission notice shall be included in all copies or substantial portions of the Software.
// THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
pragma solidity ^0.8.0;
library MlpInferenceVerifierPairing {
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

contract MlpInferenceVerifier {
    using MlpInferenceVerifierPairing for *;
    struct VerifyingKey {
        MlpInferenceVerifierPairing.G1Point alpha;
        MlpInferenceVerifierPairing.G2Point beta;
        MlpInferenceVerifierPairing.G2Point gamma;
        MlpInferenceVerifierPairing.G2Point delta;
        MlpInferenceVerifierPairing.G1Point[] gamma_abc;
    }
    struct Proof {
        MlpInferenceVerifierPairing.G1Point a;
        MlpInferenceVerifierPairing.G2Point b;
        MlpInferenceVerifierPairing.G1Point c;
    }
    function verifyingKey() pure internal returns (VerifyingKey memory vk) {
        vk.alpha = MlpInferenceVerifierPairing.G1Point(uint256(0x0fe99d41c880d3261bbd63a58281a1acaa7443f4296e1b92008b1f51de968719), uint256(0x13a4ff56cf87cd2d0a4cbc64c01d1eb16a853b592b89fbaae05e39c4ac04f980));
        vk.beta = MlpInferenceVerifierPairing.G2Point([uint256(0x0adda20ea268995c12e3794bf5e22135450f596631a7fb579e46332eff1eb305), uint256(0x1f740b9af8e43c56a14e128241a1f8da0fcded06f3647d5834c6d0024aab897e)], [uint256(0x0219c6eb6b4fcc7144bb940ca631e8de5e8da3b7140bb5bd2c74de137f034b24), uint256(0x1112202c85b90f7936c27f20a77d248127d55c23fb8a6b6152009ecb49889d43)]);
        vk.gamma = MlpInferenceVerifierPairing.G2Point([uint256(0x2d9f92730b1c996bea460988e0df83a2c1f38ac4b785c9fce19dc9f5c6ef7175), uint256(0x098ad6ec03ca9ebbfbf8a68a67bb98d9a38f9998e4373f0c83b9003e56addca3)], [uint256(0x2fa0f3b140a1b2a855c8cce6c91573ca0e6b3952d4240ad711ccf9a8c3b2fe4f), uint256(0x1738d3cdccc1bd88f0759b5fd4db62d0a65619dede40cb8e891785a4965f211b)]);
        vk.delta = MlpInferenceVerifierPairing.G2Point([uint256(0x2c0eaf8a8c9108753f326006957e0d2df94b9749b7903f844879a6e46fdbbb50), uint256(0x1182912cb4f998f57a8f6dc161863f0824749181bdebf42fb4f7b374ce6de21d)], [uint256(0x2ffcb7569db54ab6b6a6630188a29eb9144dd96c903aeec3848d61791d158312), uint256(0x08d4f4e8ba9cfa5f1e47c21a46d4dc4b24d2ac8641898b16477803fb186807a9)]);
        vk.gamma_abc = new MlpInferenceVerifierPairing.G1Point[](7);
        vk.gamma_abc[0] = MlpInferenceVerifierPairing.G1Point(uint256(0x1e989037468280b8e30e209ccae584715e0f173912dd2dced2be93cb45716e7b), uint256(0x071b4f241e98f198b4b780500ddd46c97091b12d52e7e812d8deefbd05c34007));
        vk.gamma_abc[1] = MlpInferenceVerifierPairing.G1Point(uint256(0x1d79e6b0e8ce849baefbcc708528184d0d9310203f99b6e28f8014ac134319f4), uint256(0x2403f18d3e8a23f8f140bde3a081c34549d8d465663067da1eb6ac071d32de8a));
        vk.gamma_abc[2] = MlpInferenceVerifierPairing.G1Point(uint256(0x2dbcc542542d48a9f7f7007ec005b0e418bfb4b5bcd27c2333cef15e5e8943d8), uint256(0x1fd4f5b3a78f874d678e3149696acb79f6f96a8d81447cd3bb16866bd76d757f));
        vk.gamma_abc[3] = MlpInferenceVerifierPairing.G1Point(uint256(0x2f74e5ddf5dd4136ed1c3c80a1fa2914e4d940d89d3d9754b87db5280f164e87), uint256(0x19309a16f21dd09bd784e871de91e0ec47d2d5b5d62ac606b66ba54e566cb8b7));
        vk.gamma_abc[4] = MlpInferenceVerifierPairing.G1Point(uint256(0x03c7ba58abb832846c049dfabc4a14039fc80087fd0480ee82b1dd44ddf24260), uint256(0x2f380098f0a6dfbcf20f004a6f9240f9af7f7172abce86683c7528674f32b8e9));
        vk.gamma_abc[5] = MlpInferenceVerifierPairing.G1Point(uint256(0x00fd93f701b4fe2e709603897134faf534fbf25bd30c6137c09dee43f235e977), uint256(0x2a6adc4f6a264a1326f5d59d5a3971d21492ce9ef27333b56b21cd75aeb0b3e3));
        vk.gamma_abc[6] = MlpInferenceVerifierPairing.G1Point(uint256(0x16bf2c60d270938ab78b048515347f222302259503ce575ad1b9fd9d51afbdfe), uint256(0x0392bedcb05f060a731f32030bf6654d9084f4d71b808aa75dc74528aa7cd92d));
    }
    function verify(uint[] memory input, Proof memory proof) internal view returns (uint) {
        uint256 snark_scalar_field = 21888242871839275222246405745257275088548364400416034343698204186575808495617;
        VerifyingKey memory vk = verifyingKey();
        require(input.length + 1 == vk.gamma_abc.length);
        // Compute the linear combination vk_x
        MlpInferenceVerifierPairing.G1Point memory vk_x = MlpInferenceVerifierPairing.G1Point(0, 0);
        for (uint i = 0; i < input.length; i++) {
            require(input[i] < snark_scalar_field);
            vk_x = MlpInferenceVerifierPairing.addition(vk_x, MlpInferenceVerifierPairing.scalar_mul(vk.gamma_abc[i + 1], input[i]));
        }
        vk_x = MlpInferenceVerifierPairing.addition(vk_x, vk.gamma_abc[0]);
        if(!MlpInferenceVerifierPairing.pairingProd4(
             proof.a, proof.b,
             MlpInferenceVerifierPairing.negate(vk_x), vk.gamma,
             MlpInferenceVerifierPairing.negate(proof.c), vk.delta,
             MlpInferenceVerifierPairing.negate(vk.alpha), vk.beta)) return 1;
        return 0;
    }
    function verifyTx(
            Proof memory proof, uint[6] memory input
        ) public view returns (bool r) {
        uint[] memory inputValues = new uint[](6);
        
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
