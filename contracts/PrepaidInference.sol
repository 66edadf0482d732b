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
///
/// A client may also let one node sign requests for it (a `Spender`: an EIP-712
/// approval of that node, capped in JOY and expiring, which anyone may bring here). A
/// gateway holding it serves a signed-in wallet with no signature per request; the cap
/// bounds what the node can spend of the client's balance, and the client can revoke
/// it at any time. Requests signed by the spender settle as the client's own.
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
    bytes32 public constant SPENDER_TYPEHASH =
        keccak256("Spender(address client,address spender,uint256 cap,uint64 expiry,uint64 nonce)");
    uint256 public constant MAX_SPENDER_LIFETIME = 30 days;

    struct InferenceRequest {
        address client;
        bytes32 model;
        bytes32 inputHash;
        uint256 maxPrice;
        uint256 nonce;
        uint64 deadline;
        address[] committee;
    }

    struct Account {
        uint256 balance; // all of it pays for settled requests, what is withdrawing too
        uint256 withdrawing;
        uint64 withdrawableAt;
    }

    /// What a client let a node spend for it: `spent` of `cap` until `expiry`; `nonce`
    /// orders the client's approvals of that node (an older one cannot come back).
    struct Spending {
        uint128 cap;
        uint128 spent;
        uint64 expiry;
        uint64 nonce;
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
        InsufficientBalance,
        OverSpenderCap
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
    mapping(address => mapping(address => Spending)) private _spenders; // client, spender

    event Deposited(address indexed client, uint256 amount, uint256 balance);
    event WithdrawalStarted(address indexed client, uint256 amount, uint64 withdrawableAt);
    event Withdrawn(address indexed client, uint256 amount);
    /// The requests a batch settled (one event per batch: a log per request would cost
    /// each 1,500 gas more); whether one request settled: `isSettled(client, nonce)`.
    event Settled(bytes32[] requestIds);
    event SettlementRefused(bytes32 indexed requestId, address indexed client, Refusal reason);
    event Claimed(address indexed account, uint256 amount);
    event ParametersChanged(uint256 withdrawalDelay);
    event SpenderApproved(address indexed client, address indexed spender, uint256 cap, uint64 expiry);
    event SpenderRevoked(address indexed client, address indexed spender);

    error NoWithdrawalStarted();
    error StillWithdrawing(uint64 withdrawableAt);
    error NothingToClaim();
    error BadSpenderApproval();
    error StaleSpenderApproval(uint64 nonce);

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

    function requestId(InferenceRequest calldata r) external view returns (bytes32) {
        bytes32 committeeHash = keccak256(abi.encodePacked(r.committee));
        return _hashTypedDataV4(
            _structHash(r.client, r.model, r.inputHash, r.maxPrice, r.nonce, r.deadline, committeeHash)
        );
    }

    function isSettled(address client, uint256 nonce) public view returns (bool) {
        return _settledNonces[client][nonce >> 8] & (1 << (nonce & 0xff)) != 0;
    }

    // ---- spenders

    /// Record `client`'s signed approval of `spender` (anyone may bring it: the spender
    /// does). It replaces an older approval of that spender, spent amount and all.
    function approveSpender(
        address client,
        address spender,
        uint256 cap,
        uint64 expiry,
        uint64 nonce,
        bytes calldata signature
    ) external {
        if (spender == address(0) || spender == client) revert BadSpenderApproval();
        if (cap == 0 || cap > type(uint128).max) revert OutOfBounds("cap");
        if (expiry <= block.timestamp || expiry > block.timestamp + MAX_SPENDER_LIFETIME) {
            revert OutOfBounds("expiry");
        }
        Spending storage current = _spenders[client][spender];
        if (nonce <= current.nonce) revert StaleSpenderApproval(current.nonce);
        bytes32 digest =
            _hashTypedDataV4(keccak256(abi.encode(SPENDER_TYPEHASH, client, spender, cap, expiry, nonce)));
        (address signer, ECDSA.RecoverError bad,) = ECDSA.tryRecover(digest, signature);
        if (bad != ECDSA.RecoverError.NoError || signer != client) revert BadSpenderApproval();
        _spenders[client][spender] = Spending(uint128(cap), 0, expiry, nonce);
        emit SpenderApproved(client, spender, cap, expiry);
    }

    /// The caller takes back what it let `spender` spend (what already settled stays).
    function revokeSpender(address spender) external {
        _spenders[msg.sender][spender].expiry = 0;
        emit SpenderRevoked(msg.sender, spender);
    }

    function spenderOf(address client, address spender)
        external
        view
        returns (uint256 cap, uint256 spent, uint64 expiry, uint64 nonce)
    {
        Spending memory s = _spenders[client][spender];
        return (s.cap, s.spent, s.expiry, s.nonce);
    }

    // ---- settlement

    /// A batch, packed as below (big-endian, no padding), so that a request costs the
    /// calldata it needs and no ABI decoding: addresses and models are written once per
    /// batch and named by their index; a committee member by its index too. Built by
    /// `joynode.prepaid.redemption.pack_batch`.
    ///
    ///     batch   := u16 A, address[A], u16 M, bytes32[M], u16 V, voucher[V], u16 N, item[N]
    ///     voucher := u16 member, bytes32 r, bytes32 s, u8 v
    ///     item    := u16 client, u16 model, bytes32 inputHash, u256 maxPrice, u256 nonce,
    ///                u64 deadline, bytes32 outputHash, (bytes32 r, bytes32 s, u8 v) client's,
    ///                u8 k, u16 signedBy, u16 vouchedBy, u16 member[k],
    ///                (bytes32 r, bytes32 s, u8 v) of each member whose signedBy bit is set
    ///
    /// A member certifies an item's result one of two ways. `signedBy` bit i: member[i]'s
    /// own EIP-712 `Result(requestId, outputHash)` follows, in member order. `vouchedBy`
    /// bit i: member[i]'s voucher covers it: one signature per batch, of
    /// `Results(bytes32 chain)` in this contract's domain, where `chain` folds the
    /// results of every item that names the member in `vouchedBy`, in batch order:
    /// `chain = keccak256(abi.encode(chain, requestId, outputHash))` from zero. A
    /// member in many items of a batch costs one signature check instead of one each; a
    /// voucher that does not verify counts for none of its items.
    uint256 private constant ITEM_FIXED = 210; // an item's bytes up to its members
    uint256 private constant VOUCHER_SIZE = 67;
    bytes32 public constant RESULTS_TYPEHASH = keccak256("Results(bytes32 chain)");

    /// What a batch reads once (the fee split, the certificates' domain, reputation
    /// steps, each model's terms and each client's balance) and what it adds up to pay or
    /// record once, by address and model index.
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
        address[] addresses;
        bytes32[] models;
        Terms[] terms; // by model
        uint256[] eligibleFor; // by address: 1 + the model it was found eligible for
        int256[] reputation; // by address: the change
        uint256[] credits; // by address: signer shares
        uint256[] balances; // by address: the client's balance, once read
        bool[] balanceRead;
        uint256[] spent; // by address: what its settled requests cost
        uint256[] usage; // (model << 16 | client) << 32 | count, settled requests
        uint256 usageCount;
        bytes32[] chains; // by address: its vouched results folded, then 1 if its voucher holds
        uint256 vouchersAt; // offset of the first voucher
        uint256 voucherCount;
        uint256 itemCount;
        uint256 next; // the next item's offset
    }

    /// A model's terms, read when the batch opens.
    struct Terms {
        bool servable;
        uint8 committeeSize;
        address owner;
        uint256 price;
        address[] royaltyRecipients;
        uint16[] royaltyBps;
        FeeSplit.Shares shares;
        uint256 settled;
    }

    /// One request of a batch, as far as it is read before its checks (the rest is read
    /// from the batch where it is needed).
    struct Item {
        bytes32 id;
        uint256 offset; // where it starts in the batch
        uint256 client; // address index
        uint256 model; // model index
        uint256 signedBy;
        uint256 vouchedBy;
        uint256 certifiedBy; // the members whose certificate holds (signed or vouched)
        uint256[] members; // address indexes
        address[] committee; // their addresses
        address spender; // who signed for the client (zero: the client itself)
    }

    /// Settle every request of `batch` (packed as above) that holds; refuse the others
    /// with their reason. Returns how many settled. Anyone may call it (a node's settler
    /// does). A batch that does not decode reverts whole.
    function settleBatch(bytes calldata batch) external nonReentrant returns (uint256 settled) {
        Batch memory b = _openBatch(batch);
        // First every item is read (its id, the vouchers' chains), then the vouchers
        // checked, then each item checked and settled.
        Item[] memory items = new Item[](b.itemCount);
        for (uint256 i = 0; i < items.length; i++) {
            items[i] = _readItem(b, batch);
        }
        if (b.next != batch.length) revert OutOfBounds("batch");
        _checkVouchers(b, batch);
        bytes32[] memory ids = new bytes32[](items.length);
        uint256 scratch;
        assembly ("memory-safe") {
            scratch := mload(0x40)
        }
        for (uint256 i = 0; i < items.length; i++) {
            Item memory item = items[i];
            Refusal refusal = _check(b, batch, item);
            if (refusal == Refusal.None) {
                _settle(b, batch, item);
                ids[settled++] = item.id;
            } else {
                emit SettlementRefused(item.id, b.addresses[item.client], refusal);
            }
            // What checking an item allocates (its hashing) is not used after it: the
            // next one reuses that memory, so memory does not grow (and cost) with the batch.
            assembly ("memory-safe") {
                mstore(0x40, scratch)
            }
        }
        _closeBatch(b);
        if (settled > 0) {
            assembly ("memory-safe") {
                mstore(ids, settled)
            }
            emit Settled(ids);
        }
    }

    function _openBatch(bytes calldata batch) private view returns (Batch memory b) {
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
        uint256 pos = 0;
        uint256 count = _u16(batch, pos);
        b.addresses = new address[](count);
        pos += 2;
        _need(batch, pos, count * 20);
        for (uint256 i = 0; i < count; i++) {
            b.addresses[i] = address(uint160(_read(batch, pos, 20)));
            pos += 20;
        }
        count = _u16(batch, pos);
        b.models = new bytes32[](count);
        b.terms = new Terms[](count);
        pos += 2;
        _need(batch, pos, count * 32);
        for (uint256 i = 0; i < count; i++) {
            b.models[i] = bytes32(_read(batch, pos, 32));
            b.terms[i] = _terms(b, b.models[i]);
            pos += 32;
        }
        b.voucherCount = _u16(batch, pos);
        b.vouchersAt = pos + 2;
        pos = b.vouchersAt + b.voucherCount * VOUCHER_SIZE;
        b.itemCount = _u16(batch, pos);
        if (b.itemCount == 0 || b.itemCount > MAX_BATCH) revert OutOfBounds("batch");
        b.next = pos + 2;
        uint256 addresses = b.addresses.length;
        b.eligibleFor = new uint256[](addresses);
        b.reputation = new int256[](addresses);
        b.credits = new uint256[](addresses);
        b.balances = new uint256[](addresses);
        b.balanceRead = new bool[](addresses);
        b.spent = new uint256[](addresses);
        b.usage = new uint256[](b.itemCount);
        b.chains = new bytes32[](addresses);
    }

    function _readItem(Batch memory b, bytes calldata batch) private pure returns (Item memory item) {
        unchecked { // offsets are bounded by the calldata's size, counts by 2^16
            uint256 pos = b.next;
            _need(batch, pos, ITEM_FIXED);
            item.offset = pos;
            item.client = _index(_read(batch, pos, 2), b.addresses.length);
            item.model = _index(_read(batch, pos + 2, 2), b.models.length);
            uint256 k = _read(batch, pos + 205, 1);
            item.signedBy = _read(batch, pos + 206, 2);
            item.vouchedBy = _read(batch, pos + 208, 2);
            pos += ITEM_FIXED;
            _need(batch, pos, 2 * k);
            item.members = new uint256[](k);
            item.committee = new address[](k);
            address[] memory addresses = b.addresses;
            for (uint256 m = 0; m < k; m++) {
                uint256 member = _index(_read(batch, pos, 2), addresses.length);
                item.members[m] = member;
                item.committee[m] = addresses[member];
                pos += 2;
            }
            pos += 65 * _popcount(item.signedBy);
            if (pos > batch.length) revert OutOfBounds("batch");
            b.next = pos;
            // The item is kept for the checks; its hashing is not: that memory is reused.
            uint256 scratch;
            bytes32 committeeHash;
            address[] memory committee = item.committee;
            assembly ("memory-safe") {
                scratch := mload(0x40)
                // EIP-712 hashes an address[] as its 32-byte words, as they lie in memory
                committeeHash := keccak256(add(committee, 0x20), mul(mload(committee), 0x20))
            }
            pos = item.offset;
            bytes32 structHash = _structHash(
                addresses[item.client],
                b.models[item.model],
                bytes32(_read(batch, pos + 4, 32)), // inputHash
                _read(batch, pos + 36, 32), // maxPrice
                _read(batch, pos + 68, 32), // nonce
                uint64(_read(batch, pos + 100, 8)), // deadline
                committeeHash
            );
            item.id = MessageHashUtils.toTypedDataHash(b.requestDomain, structHash);
            bytes32 outputHash = bytes32(_read(batch, pos + 108, 32));
            for (uint256 m = 0; m < k; m++) {
                if (item.vouchedBy & (1 << m) == 0) continue;
                uint256 member = item.members[m];
                b.chains[member] = keccak256(abi.encode(b.chains[member], item.id, outputHash));
            }
            assembly ("memory-safe") {
                mstore(0x40, scratch)
            }
        }
    }

    /// Each voucher's member: its chain replaced by 1 if the voucher signs it, else by 0.
    /// Only 1 counts, so a member named in `vouchedBy` without a voucher counts for none.
    function _checkVouchers(Batch memory b, bytes calldata batch) private view {
        bytes32 holds = bytes32(uint256(1));
        uint256 pos = b.vouchersAt;
        for (uint256 i = 0; i < b.voucherCount; i++) {
            uint256 member = _index(_read(batch, pos, 2), b.addresses.length);
            bytes32 chain = b.chains[member];
            if (chain != holds) {
                bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(RESULTS_TYPEHASH, chain)));
                (address signer, ECDSA.RecoverError bad,) = ECDSA.tryRecover(
                    digest,
                    uint8(_read(batch, pos + 66, 1)),
                    bytes32(_read(batch, pos + 2, 32)),
                    bytes32(_read(batch, pos + 34, 32))
                );
                bool signed = chain != 0 && bad == ECDSA.RecoverError.NoError && signer == b.addresses[member];
                b.chains[member] = signed ? holds : bytes32(0);
            }
            pos += VOUCHER_SIZE;
        }
    }

    function _check(Batch memory b, bytes calldata batch, Item memory item) private view returns (Refusal) {
        uint256 pos = item.offset;
        address client = b.addresses[item.client];
        (address signer, ECDSA.RecoverError failed,) = ECDSA.tryRecover(
            item.id,
            uint8(_read(batch, pos + 204, 1)),
            bytes32(_read(batch, pos + 140, 32)),
            bytes32(_read(batch, pos + 172, 32))
        );
        if (failed != ECDSA.RecoverError.NoError) return Refusal.BadClientSignature;
        if (signer != client) {
            Spending storage spending = _spenders[client][signer];
            if (spending.expiry < block.timestamp) return Refusal.BadClientSignature;
            item.spender = signer;
        }
        if (isSettled(client, _read(batch, pos + 68, 32))) return Refusal.AlreadySettled;
        if (block.timestamp > _read(batch, pos + 100, 8)) return Refusal.Expired;
        Terms memory t = b.terms[item.model];
        if (!t.servable) return Refusal.ModelNotServable;
        if (t.price > _read(batch, pos + 36, 32)) return Refusal.PriceAboveMax;
        uint256 k = item.members.length;
        if (k != t.committeeSize || (item.signedBy | item.vouchedBy) >> k != 0 || !_eligible(b, item)) {
            return Refusal.WrongCommittee;
        }
        uint256 certifiedBy = item.signedBy;
        for (uint256 m = 0; m < k; m++) {
            if (item.vouchedBy & (1 << m) != 0 && b.chains[item.members[m]] == bytes32(uint256(1))) {
                certifiedBy |= 1 << m;
            }
        }
        item.certifiedBy = certifiedBy;
        if (_popcount(certifiedBy) * 2 <= k) return Refusal.NoMajority;
        if (item.signedBy != 0) {
            bytes32 outputHash = bytes32(_read(batch, pos + 108, 32));
            bytes32 digest = MessageHashUtils.toTypedDataHash(
                b.resultDomain, keccak256(abi.encode(b.resultTypehash, item.id, outputHash))
            );
            unchecked {
                pos += ITEM_FIXED + 2 * k; // the members' signatures
            }
            for (uint256 m = 0; m < k; m++) {
                if (item.signedBy & (1 << m) == 0) continue;
                (address member, ECDSA.RecoverError bad,) = ECDSA.tryRecover(
                    digest,
                    uint8(_read(batch, pos + 64, 1)),
                    bytes32(_read(batch, pos, 32)),
                    bytes32(_read(batch, pos + 32, 32))
                );
                unchecked {
                    pos += 65;
                }
                if (bad != ECDSA.RecoverError.NoError || member != item.committee[m]) return Refusal.BadSignature;
            }
        }
        if (_balance(b, item.client) - b.spent[item.client] < t.price) return Refusal.InsufficientBalance;
        if (item.spender != address(0)) {
            Spending storage spending = _spenders[client][item.spender];
            if (spending.cap - spending.spent < t.price) return Refusal.OverSpenderCap;
        }
        return Refusal.None;
    }

    function _settle(Batch memory b, bytes calldata batch, Item memory item) private {
        uint256 nonce = _read(batch, item.offset + 68, 32);
        address client = b.addresses[item.client];
        _settledNonces[client][nonce >> 8] |= 1 << (nonce & 0xff);
        Terms memory t = b.terms[item.model];
        if (item.spender != address(0)) _spenders[client][item.spender].spent += uint128(t.price);
        // Sums of prices and reputation steps: far below 2^255 for any JOY supply.
        unchecked {
            b.spent[item.client] += t.price;
            t.settled++;
            uint256 signers = _popcount(item.certifiedBy);
            uint256 each = t.shares.toSigners / signers;
            b.toTreasury += t.shares.toTreasury + (t.shares.toSigners - each * signers);
            b.toStakers += t.shares.toStakers;
            uint256[] memory members = item.members;
            for (uint256 m = 0; m < members.length; m++) {
                uint256 member = members[m];
                if (item.certifiedBy & (1 << m) != 0) {
                    b.credits[member] += each;
                    b.reputation[member] += b.agreeReward;
                } else {
                    b.reputation[member] -= b.missPenalty;
                }
            }
        }
        _addUsage(b, item.model, item.client);
    }

    /// Pay and record what the batch added up: the clients' debits, claimable shares, the
    /// stakers' share and the treasury's, reputations, usage.
    function _closeBatch(Batch memory b) private {
        for (uint256 i = 0; i < b.addresses.length; i++) {
            address account = b.addresses[i];
            if (b.spent[i] > 0) _accounts[account].balance = b.balances[i] - b.spent[i];
            if (b.credits[i] > 0) claimable[account] += b.credits[i];
        }
        for (uint256 i = 0; i < b.terms.length; i++) {
            Terms memory t = b.terms[i];
            if (t.settled == 0) continue;
            uint256 paidRoyalties = 0;
            for (uint256 j = 0; j < t.royaltyRecipients.length; j++) {
                uint256 royalty = FeeSplit.royalty(t.shares.ownerPortion, t.royaltyBps[j]);
                paidRoyalties += royalty;
                claimable[t.royaltyRecipients[j]] += royalty * t.settled;
            }
            claimable[t.owner] += (t.shares.ownerPortion - paidRoyalties) * t.settled;
        }
        if (b.toTreasury > 0) token.safeTransfer(b.treasury, b.toTreasury);
        if (b.toStakers > 0) {
            token.safeTransfer(address(coordinator), b.toStakers);
            coordinator.distribute(new address[](0), 0, b.toStakers);
        }
        for (uint256 i = 0; i < b.addresses.length; i++) {
            if (b.reputation[i] != 0) coordinator.adjustReputation(b.addresses[i], b.reputation[i]);
        }
        for (uint256 i = 0; i < b.usageCount; i++) {
            uint256 entry = b.usage[i];
            uint256 count = entry & type(uint32).max;
            proofOfUse.recordMany(b.models[entry >> 48], b.addresses[(entry >> 32) & 0xffff], count, count);
        }
    }

    function _terms(Batch memory b, bytes32 model) private view returns (Terms memory t) {
        (t.owner, t.price, t.committeeSize, t.servable, t.royaltyRecipients, t.royaltyBps) =
            marketplace.payoutOf(model);
        t.shares = FeeSplit.shares(t.price, b.feeBps, b.signersBps, b.stakersBps);
    }

    /// Every member distinct and eligible for the model now (each asked once per batch
    /// and model in a row).
    function _eligible(Batch memory b, Item memory item) private view returns (bool) {
        bytes32 model = b.models[item.model];
        address[] memory committee = item.committee;
        uint256[] memory members = item.members;
        unchecked {
            for (uint256 i = 0; i < committee.length; i++) {
                address member = committee[i];
                for (uint256 j = 0; j < i; j++) {
                    if (committee[j] == member) return false;
                }
                if (b.eligibleFor[members[i]] == item.model + 1) continue;
                if (!coordinator.isEligible(member, model)) return false;
                b.eligibleFor[members[i]] = item.model + 1;
            }
        }
        return true;
    }

    function _balance(Batch memory b, uint256 client) private view returns (uint256) {
        if (!b.balanceRead[client]) {
            b.balanceRead[client] = true;
            b.balances[client] = _accounts[b.addresses[client]].balance;
        }
        return b.balances[client];
    }

    function _addUsage(Batch memory b, uint256 model, uint256 client) private pure {
        uint256 key = (model << 16) | client;
        for (uint256 i = 0; i < b.usageCount; i++) {
            if (b.usage[i] >> 32 == key) {
                b.usage[i]++;
                return;
            }
        }
        b.usage[b.usageCount++] = (key << 32) | 1;
    }

    /// `size` bytes of `data` at `pos`, big-endian (the caller checked they are there).
    function _read(bytes calldata data, uint256 pos, uint256 size) private pure returns (uint256 value) {
        assembly ("memory-safe") {
            value := shr(sub(256, mul(8, size)), calldataload(add(data.offset, pos)))
        }
    }

    /// Revert unless `size` bytes of `data` are there at `pos`.
    function _need(bytes calldata data, uint256 pos, uint256 size) private pure {
        if (pos + size > data.length) revert OutOfBounds("batch");
    }

    function _u16(bytes calldata data, uint256 pos) private pure returns (uint256) {
        _need(data, pos, 2);
        return _read(data, pos, 2);
    }

    function _index(uint256 index, uint256 count) private pure returns (uint256) {
        if (index >= count) revert OutOfBounds("batch");
        return index;
    }

    function _structHash(
        address client,
        bytes32 model,
        bytes32 inputHash,
        uint256 maxPrice,
        uint256 nonce,
        uint64 deadline,
        bytes32 committeeHash
    ) private pure returns (bytes32) {
        return keccak256(
            abi.encode(REQUEST_TYPEHASH, client, model, inputHash, maxPrice, nonce, deadline, committeeHash)
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
