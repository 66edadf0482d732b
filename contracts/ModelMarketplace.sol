// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {FeeSplit} from "./FeeSplit.sol";
import {JoyGoverned} from "./JoyGoverned.sol";
import {NodeCoordinator} from "./NodeCoordinator.sol";
import {ProofOfUse} from "./ProofOfUse.sol";

/// @title Models by IPFS CID, and pay-per-inference with escrow.
/// @notice A model is registered by its CID (id = keccak256 of the CID string)
/// with its owner, price per request, royalty recipients, committee size and
/// kind. `requestInference` escrows the price and emits `InferenceRequested`;
/// an LLM request's committee is drawn afterwards by anyone (`drawCommittee`),
/// from the hash of the block that recorded the request and the request's
/// sequence number: nothing its requester chooses (model, input, nonce) goes
/// into the draw, so no request can be ground for a committee. The proof-of-inference contract (SETTLER_ROLE) settles a
/// verified request: the platform fee (`feeBps` of the price) is split between
/// the certificate's signers, the stakers and the treasury; the rest goes to the
/// royalty recipients and the owner. After the deadline an unsettled request is
/// refunded to its requester. Fee and split are set by governance, within bounds.
contract ModelMarketplace is JoyGoverned, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant SETTLER_ROLE = keccak256("SETTLER_ROLE");

    uint16 public constant MAX_FEE_BPS = 1000;
    uint256 public constant MAX_ROYALTY_RECIPIENTS = 8;

    enum Kind {
        Llm,
        Zk
    }

    /// How a model's committees check an output (the node's `consensus.verification`):
    /// every member generates and votes on exact outputs, or one executes and the others
    /// check its tokens by prefill within the registered tolerance.
    enum Verification {
        Replicate,
        Prefill
    }

    struct VerificationPolicy {
        Verification mode;
        uint32 marginMilli; // prefill: how far below a verifier's top-1 a token may be (milli-nats)
        uint16 outsideBps; // prefill, greedy jobs: positions allowed beyond the margin
        uint16 sampledOutsideBps; // prefill, sampled jobs: the same
    }

    /// Bounds of a policy: a check looser than these no longer tells models apart.
    uint32 public constant MAX_MARGIN_MILLI = 10_000;
    uint16 public constant MAX_OUTSIDE_BPS = 2000;
    uint16 public constant MAX_SAMPLED_OUTSIDE_BPS = 7000;

    enum Status {
        None,
        Pending,
        Settled,
        Refunded
    }

    struct Model {
        address owner;
        uint256 price;
        uint8 committeeSize;
        Kind kind;
        bool active;
        string cid;
        bytes32 weightsCommitment; // zk models: commitment their verifier checks
        address verifier; // zk models: the Groth16 verifier contract
        address[] royaltyRecipients;
        uint16[] royaltyBps; // of the owner's portion
    }

    struct Request {
        bytes32 model;
        address requester;
        bytes32 inputHash;
        uint256 price;
        uint64 deadline;
        Status status;
        address[] committee; // LLM requests: empty until drawn
        uint64 drawBlock; // the block that recorded the request: its hash seeds the draw
        uint64 sequence; // the request's number among all requests
    }

    IERC20 public token;
    NodeCoordinator public coordinator;
    ProofOfUse public proofOfUse;
    address public treasury;

    uint16 public feeBps; // of the price
    uint16 public signersBps; // of the fee
    uint16 public stakersBps; // of the fee; the treasury gets the rest

    mapping(bytes32 => Model) private _models;
    mapping(bytes32 => Request) private _requests;
    mapping(address => uint256) public requestNonces;
    mapping(bytes32 => VerificationPolicy) private _verification;
    uint64 public requestCount;

    event ModelRegistered(bytes32 indexed model, string cid, address indexed owner, uint256 price, uint8 committeeSize, Kind kind);
    event ModelUpdated(bytes32 indexed model, uint256 price, bool active);
    event VerificationChanged(
        bytes32 indexed model, Verification mode, uint32 marginMilli, uint16 outsideBps, uint16 sampledOutsideBps
    );
    event InferenceRequested(
        bytes32 indexed requestId,
        bytes32 indexed model,
        address indexed requester,
        bytes32 inputHash,
        uint256 price,
        uint64 deadline
    );
    event CommitteeDrawn(bytes32 indexed requestId, bytes32 seed, address[] committee);
    event InferenceSettled(bytes32 indexed requestId, uint256 fee, uint256 toOwner);
    event InferenceRefunded(bytes32 indexed requestId, uint256 amount);
    event ParametersChanged(uint16 feeBps, uint16 signersBps, uint16 stakersBps, address treasury);

    error ModelExists(bytes32 model);
    error UnknownModel(bytes32 model);
    error NotModelOwner(bytes32 model);
    error BadRoyalties();
    error BadVerification();
    error PriceAboveMax(uint256 price, uint256 maxPrice);
    error DeadlinePassed();
    error NoCommittee(bytes32 model);
    error NotPending(bytes32 requestId);
    error CommitteeAlreadyDrawn(bytes32 requestId);
    error NoDrawForZk(bytes32 requestId);
    error DrawTooEarly(uint64 drawBlock);
    error DrawTooLate(uint64 drawBlock);
    error DeadlineNotReached(uint64 deadline);

    function initialize(
        IERC20 token_,
        NodeCoordinator coordinator_,
        ProofOfUse proofOfUse_,
        address governance,
        address treasury_
    ) external initializer {
        __JoyGoverned_init(governance);
        token = token_;
        coordinator = coordinator_;
        proofOfUse = proofOfUse_;
        // 2.5 % of the price; of it, 40 % to the signers, 30 % to the stakers, 30 % to the treasury
        _setParameters(250, 4000, 3000, treasury_);
    }

    // ---- models

    function modelIdOf(string calldata cid) public pure returns (bytes32) {
        return keccak256(bytes(cid));
    }

    function registerModel(
        string calldata cid,
        uint256 price,
        uint8 committeeSize,
        Kind kind,
        address[] calldata royaltyRecipients,
        uint16[] calldata royaltyBps,
        bytes32 weightsCommitment,
        address verifier
    ) external returns (bytes32 model) {
        model = modelIdOf(cid);
        if (_models[model].owner != address(0)) revert ModelExists(model);
        if (kind == Kind.Llm && (committeeSize == 0 || committeeSize > coordinator.MAX_COMMITTEE())) {
            revert OutOfBounds("committeeSize");
        }
        if (kind == Kind.Zk && verifier == address(0)) revert OutOfBounds("verifier");
        _checkRoyalties(royaltyRecipients, royaltyBps);
        Model storage m = _models[model];
        m.owner = msg.sender;
        m.price = price;
        m.committeeSize = committeeSize;
        m.kind = kind;
        m.active = true;
        m.cid = cid;
        m.weightsCommitment = weightsCommitment;
        m.verifier = verifier;
        m.royaltyRecipients = royaltyRecipients;
        m.royaltyBps = royaltyBps;
        emit ModelRegistered(model, cid, msg.sender, price, committeeSize, kind);
    }

    function updateModel(bytes32 model, uint256 price, bool active) external {
        Model storage m = _models[model];
        if (m.owner != msg.sender) revert NotModelOwner(model);
        m.price = price;
        m.active = active;
        emit ModelUpdated(model, price, active);
    }

    /// The owner sets how its model's outputs are checked; members apply it to every job,
    /// so it is public and the same for all. Replicate carries no tolerance.
    function setVerification(bytes32 model, VerificationPolicy calldata policy) external {
        Model storage m = _models[model];
        if (m.owner != msg.sender) revert NotModelOwner(model);
        bool tolerant = policy.marginMilli != 0 || policy.outsideBps != 0 || policy.sampledOutsideBps != 0;
        if (
            m.kind != Kind.Llm || (policy.mode == Verification.Replicate && tolerant)
                || policy.marginMilli > MAX_MARGIN_MILLI || policy.outsideBps > MAX_OUTSIDE_BPS
                || policy.sampledOutsideBps > MAX_SAMPLED_OUTSIDE_BPS
        ) revert BadVerification();
        _verification[model] = policy;
        emit VerificationChanged(model, policy.mode, policy.marginMilli, policy.outsideBps, policy.sampledOutsideBps);
    }

    function verificationOf(bytes32 model) external view returns (VerificationPolicy memory) {
        return _verification[model];
    }

    function _checkRoyalties(address[] calldata recipients, uint16[] calldata bps) private pure {
        if (recipients.length != bps.length || recipients.length > MAX_ROYALTY_RECIPIENTS) revert BadRoyalties();
        uint256 total = 0;
        for (uint256 i = 0; i < bps.length; i++) {
            if (recipients[i] == address(0)) revert BadRoyalties();
            total += bps[i];
        }
        if (total > 10_000) revert BadRoyalties();
    }

    // ---- requests

    function requestInference(bytes32 model, bytes32 inputHash, uint256 maxPrice, uint64 deadline)
        public
        nonReentrant
        returns (bytes32 requestId)
    {
        Model storage m = _models[model];
        if (m.owner == address(0) || !m.active) revert UnknownModel(model);
        if (m.price > maxPrice) revert PriceAboveMax(m.price, maxPrice);
        if (deadline <= block.timestamp) revert DeadlinePassed();
        requestId = keccak256(
            abi.encode(block.chainid, address(this), msg.sender, requestNonces[msg.sender]++, model, inputHash)
        );
        // A smaller committee than the model asks for would let fewer nodes certify.
        if (m.kind == Kind.Llm && coordinator.eligibleCount(model) < m.committeeSize) {
            revert NoCommittee(model);
        }
        token.safeTransferFrom(msg.sender, address(this), m.price);
        Request storage r = _requests[requestId];
        r.model = model;
        r.requester = msg.sender;
        r.inputHash = inputHash;
        r.price = m.price;
        r.deadline = deadline;
        r.status = Status.Pending;
        r.drawBlock = uint64(block.number);
        r.sequence = requestCount++;
        emit InferenceRequested(requestId, model, msg.sender, inputHash, m.price, deadline);
    }

    /// Draw an LLM request's committee, from a later block on (anyone may: the node that
    /// took the request does). The seed is the hash of the block that recorded the request,
    /// unknown when the request was signed, with the request's sequence number.
    function drawCommittee(bytes32 requestId) external returns (address[] memory committee) {
        Request storage r = _requests[requestId];
        if (r.status != Status.Pending) revert NotPending(requestId);
        Model storage m = _models[r.model];
        if (m.kind != Kind.Llm) revert NoDrawForZk(requestId);
        if (r.committee.length != 0) revert CommitteeAlreadyDrawn(requestId);
        if (block.number <= r.drawBlock) revert DrawTooEarly(r.drawBlock);
        bytes32 anchor = blockhash(r.drawBlock);
        if (anchor == bytes32(0)) revert DrawTooLate(r.drawBlock); // older than 256 blocks
        bytes32 seed = keccak256(abi.encode(anchor, r.sequence));
        committee = coordinator.selectCommittee(r.model, seed, m.committeeSize);
        if (committee.length < m.committeeSize) revert NoCommittee(r.model);
        r.committee = committee;
        emit CommitteeDrawn(requestId, seed, committee);
    }

    /// The same as `requestInference`, approving the escrow with an EIP-2612 permit.
    function requestInferenceWithPermit(
        bytes32 model,
        bytes32 inputHash,
        uint256 maxPrice,
        uint64 deadline,
        uint256 permitDeadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external returns (bytes32) {
        // If someone already submitted this permit (front-running), the allowance is
        // in place and the request goes on; if not, transferFrom fails as it should.
        try IERC20Permit(address(token)).permit(msg.sender, address(this), maxPrice, permitDeadline, v, r, s) {}
        catch {}
        return requestInference(model, inputHash, maxPrice, deadline);
    }

    /// Pay out a verified request (called by the proof-of-inference contract).
    function settle(bytes32 requestId, address[] calldata signers, uint256 units)
        external
        onlyRole(SETTLER_ROLE)
        nonReentrant
    {
        Request storage r = _requests[requestId];
        if (r.status != Status.Pending) revert NotPending(requestId);
        r.status = Status.Settled;
        Model storage m = _models[r.model];
        FeeSplit.Shares memory s = FeeSplit.shares(r.price, feeBps, signersBps, stakersBps);
        uint256 paidRoyalties = 0;
        for (uint256 i = 0; i < m.royaltyRecipients.length; i++) {
            uint256 royalty = FeeSplit.royalty(s.ownerPortion, m.royaltyBps[i]);
            paidRoyalties += royalty;
            if (royalty > 0) token.safeTransfer(m.royaltyRecipients[i], royalty);
        }
        uint256 toOwner = s.ownerPortion - paidRoyalties;
        if (toOwner > 0) token.safeTransfer(m.owner, toOwner);
        if (s.toTreasury > 0) token.safeTransfer(treasury, s.toTreasury);
        if (s.toSigners + s.toStakers > 0) {
            token.safeTransfer(address(coordinator), s.toSigners + s.toStakers);
        }
        coordinator.distribute(signers, s.toSigners, s.toStakers);
        proofOfUse.record(r.model, r.requester, units, requestId);
        emit InferenceSettled(requestId, s.fee, toOwner);
    }

    function refund(bytes32 requestId) external nonReentrant {
        Request storage r = _requests[requestId];
        if (r.status != Status.Pending) revert NotPending(requestId);
        if (block.timestamp <= r.deadline) revert DeadlineNotReached(r.deadline);
        r.status = Status.Refunded;
        token.safeTransfer(r.requester, r.price);
        emit InferenceRefunded(requestId, r.price);
    }

    // ---- views

    function modelInfo(bytes32 model)
        external
        view
        returns (
            address owner,
            uint256 price,
            uint8 committeeSize,
            Kind kind,
            bool active,
            string memory cid,
            bytes32 weightsCommitment,
            address verifier
        )
    {
        Model storage m = _models[model];
        return (m.owner, m.price, m.committeeSize, m.kind, m.active, m.cid, m.weightsCommitment, m.verifier);
    }

    /// What settling a request for `model` needs (a prepaid batch reads it once per model).
    function payoutOf(bytes32 model)
        external
        view
        returns (
            address owner,
            uint256 price,
            uint8 committeeSize,
            bool servable, // an active LLM
            address[] memory royaltyRecipients,
            uint16[] memory royaltyBps
        )
    {
        Model storage m = _models[model];
        return (
            m.owner,
            m.price,
            m.committeeSize,
            m.active && m.kind == Kind.Llm,
            m.royaltyRecipients,
            m.royaltyBps
        );
    }

    function requestInfo(bytes32 requestId)
        external
        view
        returns (
            bytes32 model,
            address requester,
            bytes32 inputHash,
            uint256 price,
            uint64 deadline,
            Status status,
            address[] memory committee
        )
    {
        Request storage r = _requests[requestId];
        return (r.model, r.requester, r.inputHash, r.price, r.deadline, r.status, r.committee);
    }

    // ---- parameters (governance)

    function setParameters(uint16 feeBps_, uint16 signersBps_, uint16 stakersBps_, address treasury_)
        external
        onlyGovernance
    {
        _setParameters(feeBps_, signersBps_, stakersBps_, treasury_);
    }

    function _setParameters(uint16 feeBps_, uint16 signersBps_, uint16 stakersBps_, address treasury_) private {
        if (feeBps_ > MAX_FEE_BPS) revert OutOfBounds("feeBps");
        if (uint256(signersBps_) + stakersBps_ > 10_000) revert OutOfBounds("split");
        if (treasury_ == address(0)) revert OutOfBounds("treasury");
        feeBps = feeBps_;
        signersBps = signersBps_;
        stakersBps = stakersBps_;
        treasury = treasury_;
        emit ParametersChanged(feeBps_, signersBps_, stakersBps_, treasury_);
    }
}
