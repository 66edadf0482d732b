// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712Upgradeable} from "@openzeppelin/contracts-upgradeable/utils/cryptography/EIP712Upgradeable.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {FeeSplit} from "./FeeSplit.sol";
import {JoyGoverned} from "./JoyGoverned.sol";
import {ModelMarketplace} from "./ModelMarketplace.sol";
import {NodeCoordinator} from "./NodeCoordinator.sol";
import {ProofOfInference} from "./ProofOfInference.sol";
import {ProofOfUse} from "./ProofOfUse.sol";

/// @title Feeless inference: prepaid balances, requests signed off-chain, settled in batches.
/// @notice A client deposits JOY once; each request is then an EIP-712
/// `InferenceRequest` it signs, with no transaction. Its id is that signature's
/// digest. The request names its committee (drawn by the client's node from a recent
/// block, and checked by every honest member before it serves the request: the draw
/// itself is too costly to repeat here), so nobody can pair the client's signature
/// with another committee's certificate: a client pays only for an output a strict
/// majority of the committee it signed for certified, with the same EIP-712
/// `Result(requestId, outputHash)` as `ProofOfInference` checks (its domain). Anyone
/// may settle many at once (`settleBatch`): each is checked on its own and settles or
/// is refused with a reason (`SettlementRefused`), a nonce settles once per client,
/// never above the client's max price nor after its deadline; the price is shared as
/// an escrowed request's is (`FeeSplit`) into claimable balances, the stakers' share
/// and the treasury's paid once per batch, reputations and usage counted once per
/// batch per node and per client. A withdrawal waits `withdrawalDelay`, during which
/// what the client signed before still settles from the balance.
contract PrepaidInference is JoyGoverned, EIP712Upgradeable, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant REQUEST_TYPEHASH = keccak256(
        "InferenceRequest(address client,bytes32 model,bytes32 inputHash,uint256 maxPrice,uint256 nonce,"
        "uint64 deadline,address[] committee)"
    );
    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    uint256 public constant MAX_BATCH = 256;
    uint256 public constant MIN_WITHDRAWAL_DELAY = 1 days; // 10 seconds on the devnet
    uint256 public constant MAX_WITHDRAWAL_DELAY = 30 days;

    struct InferenceRequest {
        address client;
        bytes32 model;
        bytes32 inputHash;
        uint256 maxPrice;
        uint256 nonce;
        uint64 deadline;
        address[] committee;
    }

    /// A request with its client's signature and its committee's certificate.
    struct Redemption {
        InferenceRequest request;
        bytes clientSignature;
        bytes32 outputHash;
        uint256 signedBy; // bit i set: committee[i] signed the result
        bytes signatures; // theirs, 65 bytes each (r, s, v), in committee order
    }

    struct Account {
        uint256 balance; // all of it pays for settled requests, what is withdrawing too
        uint256 withdrawing;
        uint64 withdrawableAt;
    }

    enum Refusal {
        None,
        BadClientSignature,
        AlreadySettled,
        Expired,
        ModelNotServable,
        PriceAboveMax,
        WrongCommittee,
        NoMajority,
        BadSignature,
        InsufficientBalance
    }

    IERC20 public token;
    NodeCoordinator public coordinator;
    ModelMarketplace public marketplace;
    ProofOfInference public proofOfInference;
    ProofOfUse public proofOfUse;
    uint256 public withdrawalDelay;

    mapping(address => Account) private _accounts;
    mapping(address => mapping(uint256 => uint256)) private _settledNonces; // client, word: bits
    mapping(address => uint256) public claimable; // owners, royalty recipients, signers

    event Deposited(address indexed client, uint256 amount, uint256 balance);
    event WithdrawalStarted(address indexed client, uint256 amount, uint64 withdrawableAt);
    event Withdrawn(address indexed client, uint256 amount);
    event RequestSettled(bytes32 indexed requestId, address indexed client, bytes32 outputHash, uint256 price);
    event SettlementRefused(bytes32 indexed requestId, address indexed client, Refusal reason);
    event Claimed(address indexed account, uint256 amount);
    event ParametersChanged(uint256 withdrawalDelay);

    error NoWithdrawalStarted();
    error StillWithdrawing(uint64 withdrawableAt);
    error NothingToClaim();

    function initialize(
        IERC20 token_,
        NodeCoordinator coordinator_,
        ModelMarketplace marketplace_,
        ProofOfInference proofOfInference_,
        ProofOfUse proofOfUse_,
        address governance,
        uint256 withdrawalDelay_
    ) external initializer {
        __JoyGoverned_init(governance);
        __EIP712_init("JoyNet Prepaid", "1");
        token = token_;
        coordinator = coordinator_;
        marketplace = marketplace_;
        proofOfInference = proofOfInference_;
        proofOfUse = proofOfUse_;
        _setParameters(withdrawalDelay_);
    }

    // ---- balances

    function deposit(uint256 amount) public nonReentrant {
        if (amount == 0) revert OutOfBounds("amount");
        token.safeTransferFrom(msg.sender, address(this), amount);
        Account storage a = _accounts[msg.sender];
        a.balance += amount;
        emit Deposited(msg.sender, amount, a.balance);
    }

    /// The same as `deposit`, approving it with an EIP-2612 permit.
    function depositWithPermit(uint256 amount, uint256 permitDeadline, uint8 v, bytes32 r, bytes32 s) external {
        // A permit someone already submitted (front-running) left the allowance in place.
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, permitDeadline, v, r, s) {}
        catch {}
        deposit(amount);
    }

    /// Start withdrawing `amount` (replacing a withdrawal in progress); it can leave after
    /// `withdrawalDelay`, and until then still pays for requests settled from the balance.
    function startWithdrawal(uint256 amount) external {
        Account storage a = _accounts[msg.sender];
        if (amount == 0 || amount > a.balance) revert OutOfBounds("amount");
        a.withdrawing = amount;
        a.withdrawableAt = uint64(block.timestamp + withdrawalDelay);
        emit WithdrawalStarted(msg.sender, amount, a.withdrawableAt);
    }

    function withdraw() external nonReentrant returns (uint256 amount) {
        Account storage a = _accounts[msg.sender];
        if (a.withdrawing == 0) revert NoWithdrawalStarted();
        if (block.timestamp < a.withdrawableAt) revert StillWithdrawing(a.withdrawableAt);
        amount = a.withdrawing < a.balance ? a.withdrawing : a.balance; // settlements came first
        a.balance -= amount;
        a.withdrawing = 0;
        if (amount > 0) token.safeTransfer(msg.sender, amount);
        emit Withdrawn(msg.sender, amount);
    }

    /// A client's balance (all of it), what is withdrawing and when it may leave, and what
    /// new requests may spend (the balance less what is withdrawing).
    function accountOf(address client)
        external
        view
        returns (uint256 balance, uint256 withdrawing, uint64 withdrawableAt, uint256 available)
    {
        Account storage a = _accounts[client];
        uint256 leaving = a.withdrawing < a.balance ? a.withdrawing : a.balance;
        return (a.balance, a.withdrawing, a.withdrawableAt, a.balance - leaving);
    }

    /// Pay out what settlements credited to the caller (model owners, royalty recipients,
    /// certificate signers).
    function claim() external nonReentrant returns (uint256 amount) {
        amount = claimable[msg.sender];
        if (amount == 0) revert NothingToClaim();
        claimable[msg.sender] = 0;
        token.safeTransfer(msg.sender, amount);
        emit Claimed(msg.sender, amount);
    }

    // ---- requests

    function requestId(InferenceRequest calldata request) public view returns (bytes32) {
        return _hashTypedDataV4(_structHash(request));
    }

    function isSettled(address client, uint256 nonce) public view returns (bool) {
        return _settledNonces[client][nonce >> 8] & (1 << (nonce & 0xff)) != 0;
    }

    // ---- settlement

    /// What a batch reads once: the fee split, the treasury, the certificates' domain,
    /// reputation steps; and what it adds up to pay or record once.
    struct Batch {
        uint16 feeBps;
        uint16 signersBps;
        uint16 stakersBps;
        address treasury;
        bytes32 requestDomain;
        bytes32 resultDomain;
        bytes32 resultTypehash;
        int256 agreeReward;
        int256 missPenalty;
        uint256 toStakers;
        uint256 toTreasury;
        bytes32 model; // the model read last, and what was read of it
        address owner;
        uint256 price;
        uint8 committeeSize;
        bool servable;
        address[] royaltyRecipients;
        uint16[] royaltyBps;
        address[] nodes; // reputation changes, by node
        int256[] deltas;
        uint256 nodeCount;
        bytes32 eligibleFor; // the model whose members below were found eligible
        address[] eligible;
        uint256 eligibleCount;
        bytes32[] usageModels; // settled requests, by model and client
        address[] usageClients;
        uint256[] usageCounts;
        uint256 usageCount;
    }

    /// Settle every redemption that holds; refuse the others with their reason. Returns
    /// how many settled. Anyone may call it (a node's settler does).
    function settleBatch(Redemption[] calldata redemptions) external nonReentrant returns (uint256 settled) {
        uint256 n = redemptions.length;
        if (n == 0 || n > MAX_BATCH) revert OutOfBounds("batch");
        Batch memory b = _openBatch(n);
        for (uint256 i = 0; i < n; i++) {
            Redemption calldata item = redemptions[i];
            bytes32 id = MessageHashUtils.toTypedDataHash(b.requestDomain, _structHash(item.request));
            Refusal refusal = _check(b, item, id);
            if (refusal != Refusal.None) {
                emit SettlementRefused(id, item.request.client, refusal);
                continue;
            }
            _settle(b, item, id);
            settled++;
        }
        _closeBatch(b);
    }

    function _openBatch(uint256 n) private view returns (Batch memory b) {
        b.feeBps = marketplace.feeBps();
        b.signersBps = marketplace.signersBps();
        b.stakersBps = marketplace.stakersBps();
        b.treasury = marketplace.treasury();
        (, string memory name, string memory version, uint256 chainId, address verifying,,) =
            proofOfInference.eip712Domain();
        b.resultDomain = keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256(bytes(name)), keccak256(bytes(version)), chainId, verifying)
        );
        b.requestDomain = _domainSeparatorV4();
        b.resultTypehash = proofOfInference.RESULT_TYPEHASH();
        b.agreeReward = proofOfInference.agreeReward();
        b.missPenalty = proofOfInference.missPenalty();
        uint256 members = n * coordinator.MAX_COMMITTEE();
        b.nodes = new address[](members);
        b.deltas = new int256[](members);
        b.eligible = new address[](members);
        b.usageModels = new bytes32[](n);
        b.usageClients = new address[](n);
        b.usageCounts = new uint256[](n);
    }

    function _check(Batch memory b, Redemption calldata item, bytes32 id) private view returns (Refusal) {
        InferenceRequest calldata r = item.request;
        (address signer, ECDSA.RecoverError failed,) = ECDSA.tryRecover(id, item.clientSignature);
        if (failed != ECDSA.RecoverError.NoError || signer != r.client) return Refusal.BadClientSignature;
        if (isSettled(r.client, r.nonce)) return Refusal.AlreadySettled;
        if (block.timestamp > r.deadline) return Refusal.Expired;
        if (r.model != b.model) _readModel(b, r.model);
        if (!b.servable) return Refusal.ModelNotServable;
        if (b.price > r.maxPrice) return Refusal.PriceAboveMax;
        address[] calldata committee = r.committee;
        if (committee.length != b.committeeSize || !_eligible(b, committee, r.model)) return Refusal.WrongCommittee;
        uint256 signedBy = item.signedBy;
        if (committee.length < 256 && signedBy >> committee.length != 0) return Refusal.WrongCommittee;
        uint256 count = _popcount(signedBy);
        if (count * 2 <= committee.length || count * 65 != item.signatures.length) return Refusal.NoMajority;
        bytes32 digest = MessageHashUtils.toTypedDataHash(
            b.resultDomain, keccak256(abi.encode(b.resultTypehash, id, item.outputHash))
        );
        bytes calldata signatures = item.signatures;
        uint256 offset = 0;
        for (uint256 m = 0; m < committee.length; m++) {
            if (signedBy & (1 << m) == 0) continue;
            bytes32 sigR = bytes32(signatures[offset:offset + 32]);
            bytes32 sigS = bytes32(signatures[offset + 32:offset + 64]);
            (address member, ECDSA.RecoverError bad,) =
                ECDSA.tryRecover(digest, uint8(signatures[offset + 64]), sigR, sigS);
            offset += 65;
            if (bad != ECDSA.RecoverError.NoError || member != committee[m]) return Refusal.BadSignature;
        }
        if (_accounts[r.client].balance < b.price) return Refusal.InsufficientBalance;
        return Refusal.None;
    }

    function _settle(Batch memory b, Redemption calldata item, bytes32 id) private {
        InferenceRequest calldata r = item.request;
        _settledNonces[r.client][r.nonce >> 8] |= 1 << (r.nonce & 0xff);
        _accounts[r.client].balance -= b.price;
        FeeSplit.Shares memory s = FeeSplit.shares(b.price, b.feeBps, b.signersBps, b.stakersBps);
        uint256 paidRoyalties = 0;
        for (uint256 i = 0; i < b.royaltyRecipients.length; i++) {
            uint256 royalty = FeeSplit.royalty(s.ownerPortion, b.royaltyBps[i]);
            paidRoyalties += royalty;
            claimable[b.royaltyRecipients[i]] += royalty;
        }
        claimable[b.owner] += s.ownerPortion - paidRoyalties;
        uint256 signers = item.signatures.length / 65;
        uint256 each = s.toSigners / signers;
        b.toTreasury += s.toTreasury + (s.toSigners - each * signers);
        b.toStakers += s.toStakers;
        address[] calldata committee = r.committee;
        for (uint256 m = 0; m < committee.length; m++) {
            bool signed = item.signedBy & (1 << m) != 0;
            if (signed) claimable[committee[m]] += each;
            _addReputation(b, committee[m], signed ? b.agreeReward : -b.missPenalty);
        }
        _addUsage(b, r.model, r.client);
        emit RequestSettled(id, r.client, item.outputHash, b.price);
    }

    function _closeBatch(Batch memory b) private {
        if (b.toTreasury > 0) token.safeTransfer(b.treasury, b.toTreasury);
        if (b.toStakers > 0) {
            token.safeTransfer(address(coordinator), b.toStakers);
            coordinator.distribute(new address[](0), 0, b.toStakers);
        }
        for (uint256 i = 0; i < b.nodeCount; i++) {
            if (b.deltas[i] != 0) coordinator.adjustReputation(b.nodes[i], b.deltas[i]);
        }
        for (uint256 i = 0; i < b.usageCount; i++) {
            proofOfUse.recordMany(b.usageModels[i], b.usageClients[i], b.usageCounts[i], b.usageCounts[i]);
        }
    }

    function _readModel(Batch memory b, bytes32 model) private view {
        b.model = model;
        (b.owner, b.price, b.committeeSize, b.servable, b.royaltyRecipients, b.royaltyBps) =
            marketplace.payoutOf(model);
    }

    /// Every member distinct and eligible for the model now (each asked once per batch).
    function _eligible(Batch memory b, address[] calldata committee, bytes32 model) private view returns (bool) {
        if (model != b.eligibleFor) {
            b.eligibleFor = model;
            b.eligibleCount = 0;
        }
        for (uint256 i = 0; i < committee.length; i++) {
            address member = committee[i];
            for (uint256 j = 0; j < i; j++) {
                if (committee[j] == member) return false;
            }
            if (_known(b, member)) continue;
            if (!coordinator.isEligible(member, model)) return false;
            b.eligible[b.eligibleCount++] = member;
        }
        return true;
    }

    function _known(Batch memory b, address member) private pure returns (bool) {
        for (uint256 i = 0; i < b.eligibleCount; i++) {
            if (b.eligible[i] == member) return true;
        }
        return false;
    }

    function _addReputation(Batch memory b, address node, int256 delta) private pure {
        for (uint256 i = 0; i < b.nodeCount; i++) {
            if (b.nodes[i] == node) {
                b.deltas[i] += delta;
                return;
            }
        }
        b.nodes[b.nodeCount] = node;
        b.deltas[b.nodeCount++] = delta;
    }

    function _addUsage(Batch memory b, bytes32 model, address client) private pure {
        for (uint256 i = 0; i < b.usageCount; i++) {
            if (b.usageModels[i] == model && b.usageClients[i] == client) {
                b.usageCounts[i]++;
                return;
            }
        }
        b.usageModels[b.usageCount] = model;
        b.usageClients[b.usageCount] = client;
        b.usageCounts[b.usageCount++] = 1;
    }

    function _structHash(InferenceRequest calldata r) private pure returns (bytes32) {
        return keccak256(
            abi.encode(
                REQUEST_TYPEHASH,
                r.client,
                r.model,
                r.inputHash,
                r.maxPrice,
                r.nonce,
                r.deadline,
                keccak256(abi.encodePacked(r.committee))
            )
        );
    }

    function _popcount(uint256 x) private pure returns (uint256 count) {
        while (x != 0) {
            x &= x - 1;
            count++;
        }
    }

    // ---- parameters (governance)

    function setParameters(uint256 withdrawalDelay_) external onlyGovernance {
        _setParameters(withdrawalDelay_);
    }

    function _setParameters(uint256 withdrawalDelay_) private {
        // Long enough for the nodes to settle what a client signed before it withdraws.
        _atLeast(withdrawalDelay_, MIN_WITHDRAWAL_DELAY, 10 seconds, "withdrawalDelay");
        if (withdrawalDelay_ > MAX_WITHDRAWAL_DELAY) revert OutOfBounds("withdrawalDelay");
        withdrawalDelay = withdrawalDelay_;
        emit ParametersChanged(withdrawalDelay_);
    }
}
