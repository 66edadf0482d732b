// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {EIP712Upgradeable} from "@openzeppelin/contracts-upgradeable/utils/cryptography/EIP712Upgradeable.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

import {JoyGoverned} from "./JoyGoverned.sol";
import {ModelMarketplace} from "./ModelMarketplace.sol";
import {NodeCoordinator} from "./NodeCoordinator.sol";

/// The Groth16 verifier ZoKrates exports for `circuits/mlp_inference.zok`: its
/// public values are the weights commitment, the input hash and 4 outputs.
interface IZkInferenceVerifier {
    struct G1Point {
        uint256 X;
        uint256 Y;
    }

    struct G2Point {
        uint256[2] X;
        uint256[2] Y;
    }

    struct Proof {
        G1Point a;
        G2Point b;
        G1Point c;
    }

    function verifyTx(Proof calldata proof, uint256[6] calldata input) external view returns (bool);
}

/// @title Verifies committee certificates, zero-knowledge results and equivocation evidence.
/// @notice A certificate is a strict majority of a request's committee signing,
/// with EIP-712 (domain bound to this contract and the chain id), the same
/// `Result(requestId, outputHash)`. An accepted certificate raises the signers'
/// reputation, lowers that of committee members who did not sign, settles the
/// payment and logs usage. Two different signed `Commit(requestId, commitment)`
/// messages from one node for one request are equivocation: anyone may submit
/// them and the node's stake is slashed. A request for a zk model needs no
/// committee: `submitZkResult` checks a Groth16 proof that the model's committed
/// weights, run on the request's input, give the outputs, and settles with the
/// prover as the only signer. Each certificate's time and signers are kept for
/// the dispute window (DisputeResolver).
contract ProofOfInference is JoyGoverned, EIP712Upgradeable {
    bytes32 public constant RESULT_TYPEHASH = keccak256("Result(bytes32 requestId,bytes32 outputHash)");
    bytes32 public constant COMMIT_TYPEHASH = keccak256("Commit(bytes32 requestId,bytes32 commitment)");
    int256 public constant MAX_REPUTATION_STEP = 1000;

    struct Certified {
        uint64 certifiedAt; // block timestamp of the certificate
        bytes24 signers; // leading bytes of keccak256(abi.encode(signers))
    }

    NodeCoordinator public coordinator;
    ModelMarketplace public marketplace;

    int256 public agreeReward;
    int256 public missPenalty;

    mapping(bytes32 => bytes32) public verifiedOutput; // request id => output hash
    mapping(bytes32 => Certified) public certified; // request id => committee certificate
    mapping(address => mapping(bytes32 => bool)) public equivocationReported;

    event InferenceVerified(bytes32 indexed requestId, bytes32 outputHash, address[] signers);
    event EquivocationReported(address indexed node, bytes32 indexed requestId, address indexed reporter);
    event ZkInferenceVerified(bytes32 indexed requestId, address indexed prover, uint256[4] outputs);
    event ParametersChanged(int256 agreeReward, int256 missPenalty);

    error NotPending(bytes32 requestId);
    error Expired(uint64 deadline);
    error LengthMismatch();
    error NoMajority(uint256 signers, uint256 committee);
    error NotInCommittee(address signer);
    error DuplicateSigner(address signer);
    error BadSignature(address signer);
    error SameCommitment();
    error AlreadyReported(address node, bytes32 requestId);
    error NotZkModel(bytes32 model);
    error BadProof(bytes32 requestId);

    function initialize(NodeCoordinator coordinator_, ModelMarketplace marketplace_, address governance)
        external
        initializer
    {
        __JoyGoverned_init(governance);
        __EIP712_init("JoyNet", "1");
        coordinator = coordinator_;
        marketplace = marketplace_;
        _setParameters(10, 20);
    }

    /// The key `certified` keeps a certificate's signers under.
    function signersKey(address[] memory signers) public pure returns (bytes24) {
        return bytes24(keccak256(abi.encode(signers)));
    }

    function resultDigest(bytes32 requestId, bytes32 outputHash) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(RESULT_TYPEHASH, requestId, outputHash)));
    }

    function commitDigest(bytes32 requestId, bytes32 commitment) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(COMMIT_TYPEHASH, requestId, commitment)));
    }

    function submitCertificate(
        bytes32 requestId,
        bytes32 outputHash,
        address[] calldata signers,
        bytes[] calldata signatures
    ) external {
        (,,,, uint64 deadline, ModelMarketplace.Status status, address[] memory committee) =
            marketplace.requestInfo(requestId);
        if (status != ModelMarketplace.Status.Pending) revert NotPending(requestId);
        if (block.timestamp > deadline) revert Expired(deadline);
        if (signers.length != signatures.length) revert LengthMismatch();
        if (signers.length * 2 <= committee.length) revert NoMajority(signers.length, committee.length);

        bytes32 digest = resultDigest(requestId, outputHash);
        uint256 signed = 0; // bit i set: committee[i] signed
        for (uint256 i = 0; i < signers.length; i++) {
            uint256 index = _indexIn(committee, signers[i]);
            if (signed & (1 << index) != 0) revert DuplicateSigner(signers[i]);
            signed |= 1 << index;
            (address recovered, ECDSA.RecoverError recoverError,) = ECDSA.tryRecover(digest, signatures[i]);
            if (recoverError != ECDSA.RecoverError.NoError || recovered != signers[i]) revert BadSignature(signers[i]);
        }
        verifiedOutput[requestId] = outputHash;
        certified[requestId] = Certified(uint64(block.timestamp), signersKey(signers));
        for (uint256 i = 0; i < committee.length; i++) {
            coordinator.adjustReputation(committee[i], signed & (1 << i) != 0 ? agreeReward : -missPenalty);
        }
        marketplace.settle(requestId, signers, 1);
        emit InferenceVerified(requestId, outputHash, signers);
    }

    /// Settle a zk model's request with a proof of its outputs (field elements;
    /// negative logits are p - |x|). The output hash recorded is keccak256 of them.
    function submitZkResult(bytes32 requestId, IZkInferenceVerifier.Proof calldata proof, uint256[4] calldata outputs)
        external
    {
        (bytes32 model,, bytes32 inputHash,, uint64 deadline, ModelMarketplace.Status status,) =
            marketplace.requestInfo(requestId);
        if (status != ModelMarketplace.Status.Pending) revert NotPending(requestId);
        if (block.timestamp > deadline) revert Expired(deadline);
        (,,, ModelMarketplace.Kind kind,,, bytes32 weightsCommitment, address verifier) = marketplace.modelInfo(model);
        if (kind != ModelMarketplace.Kind.Zk) revert NotZkModel(model);
        uint256[6] memory input =
            [uint256(weightsCommitment), uint256(inputHash), outputs[0], outputs[1], outputs[2], outputs[3]];
        if (!IZkInferenceVerifier(verifier).verifyTx(proof, input)) revert BadProof(requestId);
        bytes32 outputHash = keccak256(abi.encode(outputs));
        verifiedOutput[requestId] = outputHash;
        address[] memory signers = new address[](1);
        signers[0] = msg.sender;
        marketplace.settle(requestId, signers, 1);
        emit ZkInferenceVerified(requestId, msg.sender, outputs);
    }

    function reportEquivocation(
        address node,
        bytes32 requestId,
        bytes32 commitmentA,
        bytes calldata signatureA,
        bytes32 commitmentB,
        bytes calldata signatureB
    ) external {
        if (commitmentA == commitmentB) revert SameCommitment();
        if (equivocationReported[node][requestId]) revert AlreadyReported(node, requestId);
        _requireSigned(node, commitDigest(requestId, commitmentA), signatureA);
        _requireSigned(node, commitDigest(requestId, commitmentB), signatureB);
        equivocationReported[node][requestId] = true;
        coordinator.slash(node, msg.sender);
        emit EquivocationReported(node, requestId, msg.sender);
    }

    function setParameters(int256 agreeReward_, int256 missPenalty_) external onlyGovernance {
        _setParameters(agreeReward_, missPenalty_);
    }

    function _setParameters(int256 agreeReward_, int256 missPenalty_) private {
        if (agreeReward_ < 0 || agreeReward_ > MAX_REPUTATION_STEP) revert OutOfBounds("agreeReward");
        if (missPenalty_ < 0 || missPenalty_ > MAX_REPUTATION_STEP) revert OutOfBounds("missPenalty");
        agreeReward = agreeReward_;
        missPenalty = missPenalty_;
        emit ParametersChanged(agreeReward_, missPenalty_);
    }

    function _indexIn(address[] memory committee, address signer) private pure returns (uint256) {
        for (uint256 i = 0; i < committee.length; i++) {
            if (committee[i] == signer) return i;
        }
        revert NotInCommittee(signer);
    }

    function _requireSigned(address node, bytes32 digest, bytes calldata signature) private pure {
        (address recovered, ECDSA.RecoverError recoverError,) = ECDSA.tryRecover(digest, signature);
        if (recoverError != ECDSA.RecoverError.NoError || recovered != node) revert BadSignature(node);
    }
}
