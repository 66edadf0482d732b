// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {JoyGoverned} from "./JoyGoverned.sol";
import {ModelMarketplace} from "./ModelMarketplace.sol";
import {NodeCoordinator} from "./NodeCoordinator.sol";
import {ProofOfInference} from "./ProofOfInference.sol";

/// @title Disputes over committee certificates, resolved by the DAO.
/// @notice Within `disputeWindow` of a certificate landing, its requester (free) or
/// anyone else (posting `bond` JOY) can dispute it. Governance (the timelock, by a
/// proposal) resolves it: upheld, every signer's stake is slashed, the requester
/// refunded the price from it first and the rest sent to the treasury, and the
/// bond returned; rejected, the bond goes to the treasury. While a dispute is open
/// the signers' stake cannot be withdrawn (a vote outlasts the unbonding delay). One
/// the DAO leaves unresolved for `resolutionPeriod` expires: anyone may close it,
/// the bond goes back and the stakes are free.
contract DisputeResolver is JoyGoverned, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    uint256 public constant MIN_WINDOW = 1 days; // 1 minute on the devnet
    uint256 public constant MAX_WINDOW = 30 days;
    uint256 public constant MAX_BOND = 1_000_000 ether;
    uint256 public constant MIN_RESOLUTION = 14 days; // 1 minute on the devnet
    uint256 public constant MAX_RESOLUTION = 90 days;

    enum Status {
        None,
        Open,
        Upheld,
        Rejected,
        Expired
    }

    struct Dispute {
        Status status;
        address disputer;
        uint64 openedAt;
        uint256 bond;
        string reason;
        address[] signers;
    }

    IERC20 public token;
    ProofOfInference public proofOfInference;
    uint256 public disputeWindow;
    uint256 public bond;
    uint256 public resolutionPeriod;

    mapping(bytes32 => Dispute) private _disputes;

    event DisputeOpened(bytes32 indexed requestId, address indexed disputer, uint256 bond, string reason);
    event DisputeResolved(bytes32 indexed requestId, bool upheld, uint256 refunded);
    event DisputeExpired(bytes32 indexed requestId);
    event ParametersChanged(uint256 disputeWindow, uint256 bond, uint256 resolutionPeriod);

    error NotCertified(bytes32 requestId);
    error WindowClosed(uint256 closedAt);
    error AlreadyDisputed(bytes32 requestId);
    error WrongSigners(bytes32 requestId);
    error NotOpen(bytes32 requestId);
    error NotExpired(uint256 expiresAt);

    function initialize(
        IERC20 token_,
        ProofOfInference proofOfInference_,
        address governance,
        uint256 disputeWindow_,
        uint256 bond_,
        uint256 resolutionPeriod_
    ) external initializer {
        __JoyGoverned_init(governance);
        token = token_;
        proofOfInference = proofOfInference_;
        _setParameters(disputeWindow_, bond_, resolutionPeriod_);
    }

    /// Dispute the certificate of `requestId`, naming the `signers` it was submitted with
    /// (InferenceVerified); anyone but the requester posts the bond.
    function dispute(bytes32 requestId, address[] calldata signers, string calldata reason) external nonReentrant {
        (uint64 certifiedAt, bytes24 key) = proofOfInference.certified(requestId);
        if (certifiedAt == 0) revert NotCertified(requestId);
        if (block.timestamp > certifiedAt + disputeWindow) revert WindowClosed(certifiedAt + disputeWindow);
        if (key != proofOfInference.signersKey(signers)) revert WrongSigners(requestId);
        Dispute storage d = _disputes[requestId];
        if (d.status != Status.None) revert AlreadyDisputed(requestId);
        (, address requester,,,,,) = _marketplace().requestInfo(requestId);
        uint256 posted = msg.sender == requester ? 0 : bond;
        if (posted > 0) token.safeTransferFrom(msg.sender, address(this), posted);
        d.status = Status.Open;
        d.disputer = msg.sender;
        d.openedAt = uint64(block.timestamp);
        d.bond = posted;
        d.reason = reason;
        d.signers = signers;
        proofOfInference.coordinator().holdStake(signers, true);
        emit DisputeOpened(requestId, msg.sender, posted, reason);
    }

    /// Governance's verdict on an open dispute.
    function resolve(bytes32 requestId, bool upheld) external onlyGovernance nonReentrant {
        Dispute storage d = _disputes[requestId];
        if (d.status != Status.Open) revert NotOpen(requestId);
        d.status = upheld ? Status.Upheld : Status.Rejected;
        ModelMarketplace marketplace = _marketplace();
        NodeCoordinator coordinator = proofOfInference.coordinator();
        coordinator.holdStake(d.signers, false);
        uint256 refunded = 0;
        if (upheld) {
            (, address requester,, uint256 price,,,) = marketplace.requestInfo(requestId);
            for (uint256 i = 0; i < d.signers.length; i++) {
                refunded += coordinator.slashOwing(d.signers[i], requester, price - refunded);
            }
            if (d.bond > 0) token.safeTransfer(d.disputer, d.bond);
        } else if (d.bond > 0) {
            token.safeTransfer(marketplace.treasury(), d.bond);
        }
        emit DisputeResolved(requestId, upheld, refunded);
    }

    /// Close a dispute the DAO left unresolved for `resolutionPeriod`: the bond goes
    /// back to the disputer and the signers' stakes are free to leave. Anyone may call it.
    function expire(bytes32 requestId) external nonReentrant {
        Dispute storage d = _disputes[requestId];
        if (d.status != Status.Open) revert NotOpen(requestId);
        uint256 expiresAt = d.openedAt + resolutionPeriod;
        if (block.timestamp <= expiresAt) revert NotExpired(expiresAt);
        d.status = Status.Expired;
        proofOfInference.coordinator().holdStake(d.signers, false);
        if (d.bond > 0) token.safeTransfer(d.disputer, d.bond);
        emit DisputeExpired(requestId);
    }

    function disputeOf(bytes32 requestId)
        external
        view
        returns (
            Status status,
            address disputer,
            uint64 openedAt,
            uint256 bond_,
            string memory reason,
            address[] memory signers
        )
    {
        Dispute storage d = _disputes[requestId];
        return (d.status, d.disputer, d.openedAt, d.bond, d.reason, d.signers);
    }

    function setParameters(uint256 disputeWindow_, uint256 bond_, uint256 resolutionPeriod_)
        external
        onlyGovernance
    {
        _setParameters(disputeWindow_, bond_, resolutionPeriod_);
    }

    function _setParameters(uint256 disputeWindow_, uint256 bond_, uint256 resolutionPeriod_) private {
        _atLeast(disputeWindow_, MIN_WINDOW, 1 minutes, "disputeWindow");
        if (disputeWindow_ > MAX_WINDOW) revert OutOfBounds("disputeWindow");
        if (bond_ == 0 || bond_ > MAX_BOND) revert OutOfBounds("bond");
        // Long enough for a proposal to pass (delay, vote, timelock), bounded so a stake is
        // never held for ever.
        _atLeast(resolutionPeriod_, MIN_RESOLUTION, 1 minutes, "resolutionPeriod");
        if (resolutionPeriod_ > MAX_RESOLUTION) revert OutOfBounds("resolutionPeriod");
        disputeWindow = disputeWindow_;
        bond = bond_;
        resolutionPeriod = resolutionPeriod_;
        emit ParametersChanged(disputeWindow_, bond_, resolutionPeriod_);
    }

    function _marketplace() private view returns (ModelMarketplace) {
        return proofOfInference.marketplace();
    }
}
