// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712Upgradeable} from "@openzeppelin/contracts-upgradeable/utils/cryptography/EIP712Upgradeable.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EnumerableSet} from "@openzeppelin/contracts/utils/structs/EnumerableSet.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {FeeSplit} from "./FeeSplit.sol";
import {JoyGoverned} from "./JoyGoverned.sol";
import {ProofOfUse} from "./ProofOfUse.sol";

/// @title SovereignRPC on-chain: RPC providers with deposits, client plans in JOY, relay
/// accounting in batches, and slashing for wrong answers.
/// @notice In the spirit of Incubed (IN3) registries and Lava/Pocket relay accounting.
///
/// Providers register per chain id they serve (`register`) with a JOY deposit of at least
/// `minDeposit` and an endpoint. A provider is active while registered, not unbonding and
/// holding `minDeposit`; `beginUnbonding` makes it inactive at once, but its deposit stays
/// here, and slashable, for `unbondingDelay` before `withdraw`. Reputation is two on-chain
/// counters per provider and chain (calls served as reported, times slashed) that nodes
/// score off-chain.
///
/// Clients pay in JOY by plan: a subscription (`subscribe`: `pricePerDay` a day, extending
/// `planUntil`) or pay-per-call credit (`depositCredit`, debited by usage reports at
/// `pricePerCall`). Both take the platform fee (`feeBps`, 2.5 %, `FeeSplit` as the
/// marketplace's) for the treasury: a subscription when it is paid (the rest is the
/// subscriber's reward budget, paid to the providers that serve it), credit when a report
/// debits it (the rest to the provider).
///
/// Usage comes in batches (`reportUsage`) from an active provider. Reports are trusted up
/// to hard bounds and disputable, not proven: the contract cannot see relays. A report
/// carries at most `MAX_REPORT_ENTRIES` clients and `maxCallsPerReport` calls; it can
/// debit a credit client no more than the client's credit (a client trusts the providers
/// it uses with the credit it deposits, and can take it back, `beginCreditWithdrawal`),
/// and it pays a subscriber's calls at most `callReward` each (at most `pricePerCall`)
/// from that subscriber's own budget (what its subscriptions paid, less the fee) while it
/// lasts. So an inflated report takes from the clients it names no more than they paid,
/// and a provider reporting calls of a subscription it paid for itself gets back no more
/// than its own money, less the fee: no report can draw on what other subscribers paid
/// for the providers that serve them. Every report is public (`UsageReported`,
/// `CreditDebited`, and `ProofOfUse` totals under `usageKey(chainId)`): clients and nodes
/// check them against what they saw, and the DAO slashes a provider whose reports it finds
/// inflated (`slashByGovernance`, with the evidence's hash).
/// Earnings are pulled (`claim`).
///
/// Slashing: a provider signs its answers about blocks as EIP-712
/// `BlockClaim(chainId, number, blockHash)` in this contract's domain ("JoyNet SovereignRPC"
/// / "1"). For the chain this contract lives on, `blockhash` proves a wrong one: anyone
/// brings it (`slashWrongBlock`) within 256 blocks and `slashBps` of the provider's deposit
/// there is taken, `bountyBps` of it to the caller and the rest to the treasury. For other
/// chains the contract sees no block hashes: the DAO judges the evidence
/// (`slashByGovernance`). A provider left below `minDeposit` is inactive until it tops up.
/// Every parameter is the DAO's, within the bounds hard-coded in `setParameters`.
contract EnhancedSovereignRPC is JoyGoverned, EIP712Upgradeable, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;
    using EnumerableSet for EnumerableSet.AddressSet;

    bytes32 public constant BLOCK_CLAIM_TYPEHASH =
        keccak256("BlockClaim(uint64 chainId,uint256 number,bytes32 blockHash)");

    /// Bounds of a report: its gas (a ProofOfUse record per entry) and what one report may claim.
    uint256 public constant MAX_REPORT_ENTRIES = 256;
    uint256 public constant MAX_CALLS_PER_REPORT = 1_000_000;
    uint256 public constant MAX_ENDPOINT_BYTES = 256;
    uint32 public constant MAX_PLAN_DAYS = 366;
    uint256 public constant MAX_MIN_DEPOSIT = 1_000_000 ether; // JOY has 18 decimals
    uint256 public constant MAX_PRICE_PER_DAY = 10_000 ether;
    uint256 public constant MAX_PRICE_PER_CALL = 1 ether;
    uint256 public constant MIN_UNBONDING_DELAY = 1 days; // 1 minute on the devnet
    uint256 public constant MAX_UNBONDING_DELAY = 30 days;
    uint256 public constant MIN_CREDIT_WITHDRAWAL_DELAY = 1 hours; // 10 seconds on the devnet
    uint256 public constant MAX_CREDIT_WITHDRAWAL_DELAY = 7 days;
    uint16 public constant MAX_FEE_BPS = 1000;
    uint16 public constant MAX_SLASH_BPS = 5000;
    uint16 public constant MAX_BOUNTY_BPS = 5000;

    /// Everything governance sets, in one call (`setParameters`) and one event.
    struct Parameters {
        uint256 minDeposit; // per provider and chain, to be active
        uint256 unbondingDelay; // from `beginUnbonding` to `withdraw`
        uint256 creditWithdrawalDelay; // from `beginCreditWithdrawal` to `withdrawCredit`
        uint256 pricePerDay; // a subscription's
        uint256 pricePerCall; // what a report debits a credit client per call
        uint256 callReward; // what a subscription call earns from the reward pool
        uint256 maxCallsPerReport;
        uint16 feeBps; // of every payment, to the treasury
        uint16 slashBps; // of the deposit, taken by a proven wrong block claim
        uint16 bountyBps; // of a slash, to whoever proved it
        address treasury;
    }

    struct Provider {
        uint256 deposit;
        uint64 registeredAt; // 0: not registered
        uint64 unbondingUntil; // 0: bonded
        uint32 slashes;
        uint96 servedCalls;
        string endpoint;
    }

    struct Credit {
        uint256 balance; // all of it pays for reported calls, what is withdrawing too
        uint256 withdrawing;
        uint64 withdrawableAt;
    }

    IERC20 public token;
    ProofOfUse public proofOfUse;
    address public treasury;
    uint256 public minDeposit;
    uint256 public unbondingDelay;
    uint256 public creditWithdrawalDelay;
    uint256 public pricePerDay;
    uint256 public pricePerCall;
    uint256 public callReward;
    uint256 public maxCallsPerReport;
    uint16 public feeBps;
    uint16 public slashBps;
    uint16 public bountyBps;

    /// Subscriptions' payments less the fee, paid out to providers as `callReward`s: in
    /// all, and per subscriber (a report draws only on the budgets of the clients it names).
    uint256 public rewardPool;
    mapping(address => uint256) public rewardBudget;
    mapping(address => uint64) public planUntil;
    mapping(address => uint256) public earnings; // providers', claimed with `claim`

    mapping(address => mapping(uint64 => Provider)) private _providers;
    mapping(uint64 => EnumerableSet.AddressSet) private _listed; // registered, not unbonding
    mapping(address => Credit) private _credits;
    mapping(bytes32 => bool) private _usedClaims; // keccak256(provider, claim digest)

    event ProviderRegistered(address indexed provider, uint64 indexed chainId, uint256 deposit, string endpoint);
    event ProviderUpdated(address indexed provider, uint64 indexed chainId, uint256 deposit, string endpoint);
    event ProviderUnbonding(address indexed provider, uint64 indexed chainId, uint64 unbondingUntil);
    event ProviderWithdrawn(address indexed provider, uint64 indexed chainId, uint256 amount);
    /// `deposit` is what is left; `evidence` the wrong claim's digest, or the DAO's evidence.
    event ProviderSlashed(
        address indexed provider,
        uint64 indexed chainId,
        address indexed slasher,
        uint256 amount,
        uint256 bounty,
        uint256 deposit,
        bytes32 evidence
    );
    event PlanSubscribed(address indexed client, uint64 until);
    event CreditDeposited(address indexed client, uint256 amount, uint256 credit);
    event CreditWithdrawalStarted(address indexed client, uint256 amount, uint64 withdrawableAt);
    event CreditWithdrawn(address indexed client, uint256 amount, uint256 credit);
    event CreditDebited(
        address indexed client, address indexed provider, uint256 calls, uint256 amount, uint256 credit
    );
    /// One per report: the calls of authorized clients it counted, what it debited from
    /// credit (before the fee) and what it paid from the reward pool.
    event UsageReported(
        address indexed provider, uint64 indexed chainId, uint256 calls, uint256 debited, uint256 rewarded
    );
    event EarningsClaimed(address indexed provider, uint256 amount);
    event ParametersChanged(
        uint256 minDeposit,
        uint256 unbondingDelay,
        uint256 creditWithdrawalDelay,
        uint256 pricePerDay,
        uint256 pricePerCall,
        uint256 callReward,
        uint256 maxCallsPerReport,
        uint16 feeBps,
        uint16 slashBps,
        uint16 bountyBps,
        address treasury
    );

    error DepositTooLow(uint256 deposit, uint256 minimum);
    error AlreadyRegistered(address provider, uint64 chainId);
    error NotProvider(address provider, uint64 chainId);
    error NotActiveProvider(address provider, uint64 chainId);
    error ProviderIsUnbonding(uint64 unbondingUntil);
    error NotUnbonding();
    error UnbondingNotOver(uint64 unbondingUntil);
    error NoEarnings();
    error NoCreditWithdrawal();
    error CreditLocked(uint64 withdrawableAt);
    error BlockNotVerifiable(uint256 number);
    error CorrectClaim(uint256 number, bytes32 blockHash);
    error WrongSigner(address signer);
    error ClaimUsed(bytes32 digest);

    function initialize(IERC20 token_, ProofOfUse proofOfUse_, address governance, Parameters calldata parameters_)
        external
        initializer
    {
        __JoyGoverned_init(governance);
        __EIP712_init("JoyNet SovereignRPC", "1");
        token = token_;
        proofOfUse = proofOfUse_;
        _setParameters(parameters_);
    }

    // ---- providers

    /// Register to serve `chainId` at `endpoint`, with a deposit of at least `minDeposit`
    /// (approved to this contract). A provider that withdrew may register again; its
    /// counters (served calls, slashes) stay.
    function register(uint64 chainId, uint256 deposit, string calldata endpoint) external nonReentrant {
        if (chainId == 0) revert OutOfBounds("chainId");
        _checkEndpoint(endpoint);
        Provider storage p = _providers[msg.sender][chainId];
        if (p.registeredAt != 0) revert AlreadyRegistered(msg.sender, chainId);
        if (deposit < minDeposit) revert DepositTooLow(deposit, minDeposit);
        token.safeTransferFrom(msg.sender, address(this), deposit);
        p.deposit = deposit;
        p.registeredAt = uint64(block.timestamp);
        p.endpoint = endpoint;
        _listed[chainId].add(msg.sender);
        emit ProviderRegistered(msg.sender, chainId, deposit, endpoint);
    }

    /// Add to the deposit for `chainId` (how a provider slashed below `minDeposit`, or one
    /// the DAO raised the minimum above, becomes active again).
    function addDeposit(uint64 chainId, uint256 amount) external nonReentrant {
        Provider storage p = _bonded(msg.sender, chainId);
        if (amount == 0) revert OutOfBounds("amount");
        token.safeTransferFrom(msg.sender, address(this), amount);
        p.deposit += amount;
        emit ProviderUpdated(msg.sender, chainId, p.deposit, p.endpoint);
    }

    function updateEndpoint(uint64 chainId, string calldata endpoint) external {
        Provider storage p = _bonded(msg.sender, chainId);
        _checkEndpoint(endpoint);
        p.endpoint = endpoint;
        emit ProviderUpdated(msg.sender, chainId, p.deposit, endpoint);
    }

    /// Stop serving `chainId`: inactive from now on (out of `activeProviders`, no more
    /// reports), the deposit withdrawable after `unbondingDelay`. Until then it can still be
    /// slashed, for what the provider signed or reported while it served.
    function beginUnbonding(uint64 chainId) external {
        Provider storage p = _bonded(msg.sender, chainId);
        p.unbondingUntil = uint64(block.timestamp + unbondingDelay);
        _listed[chainId].remove(msg.sender);
        emit ProviderUnbonding(msg.sender, chainId, p.unbondingUntil);
    }

    /// Take the whole deposit for `chainId` back once unbonding is over; the registration ends.
    function withdraw(uint64 chainId) external nonReentrant returns (uint256 amount) {
        Provider storage p = _providers[msg.sender][chainId];
        if (p.registeredAt == 0) revert NotProvider(msg.sender, chainId);
        if (p.unbondingUntil == 0) revert NotUnbonding();
        if (block.timestamp < p.unbondingUntil) revert UnbondingNotOver(p.unbondingUntil);
        amount = p.deposit;
        p.deposit = 0;
        p.registeredAt = 0;
        p.unbondingUntil = 0;
        delete p.endpoint;
        if (amount > 0) token.safeTransfer(msg.sender, amount);
        emit ProviderWithdrawn(msg.sender, chainId, amount);
    }

    function providerOf(address provider, uint64 chainId)
        external
        view
        returns (
            uint256 deposit,
            string memory endpoint,
            uint64 registeredAt,
            uint64 unbondingUntil,
            uint256 servedCalls,
            uint256 slashes
        )
    {
        Provider storage p = _providers[provider][chainId];
        return (p.deposit, p.endpoint, p.registeredAt, p.unbondingUntil, p.servedCalls, p.slashes);
    }

    function isActive(address provider, uint64 chainId) public view returns (bool) {
        return _isActive(_providers[provider][chainId]);
    }

    /// The providers active for `chainId` now, in no particular order. A view for nodes (an
    /// eth_call): nothing on-chain iterates the list, so it needs no cap on its length.
    function activeProviders(uint64 chainId) external view returns (address[] memory active) {
        address[] memory listed = _listed[chainId].values();
        active = new address[](listed.length);
        uint256 count = 0;
        for (uint256 i = 0; i < listed.length; i++) {
            // Listed is registered and bonded; below the minimum (slashed, or the DAO raised it) is not active.
            if (_providers[listed[i]][chainId].deposit >= minDeposit) active[count++] = listed[i];
        }
        assembly ("memory-safe") {
            mstore(active, count)
        }
    }

    // ---- client plans

    /// Subscribe for `numDays` days (`pricePerDay` each, approved to this contract): the plan
    /// runs to `numDays` days after the later of now and its current end. The fee goes to
    /// the treasury, the rest to the caller's reward budget (what providers serving it earn).
    function subscribe(uint32 numDays) public nonReentrant returns (uint64 until) {
        if (numDays == 0 || numDays > MAX_PLAN_DAYS) revert OutOfBounds("days");
        uint256 cost = pricePerDay * numDays;
        token.safeTransferFrom(msg.sender, address(this), cost);
        FeeSplit.Shares memory s = FeeSplit.shares(cost, feeBps, 0, 0);
        rewardPool += s.ownerPortion;
        rewardBudget[msg.sender] += s.ownerPortion;
        if (s.toTreasury > 0) token.safeTransfer(treasury, s.toTreasury);
        uint256 start = planUntil[msg.sender] > block.timestamp ? planUntil[msg.sender] : block.timestamp;
        until = uint64(start + uint256(numDays) * 1 days);
        planUntil[msg.sender] = until;
        emit PlanSubscribed(msg.sender, until);
    }

    /// The same as `subscribe`, approving its cost (`pricePerDay * numDays`) with an EIP-2612 permit.
    function subscribeWithPermit(uint32 numDays, uint256 permitDeadline, uint8 v, bytes32 r, bytes32 s)
        external
        returns (uint64)
    {
        uint256 cost = pricePerDay * numDays;
        // A permit someone already submitted (front-running) left the allowance in place.
        try IERC20Permit(address(token)).permit(msg.sender, address(this), cost, permitDeadline, v, r, s) {}
        catch {}
        return subscribe(numDays);
    }

    /// Add `amount` (approved to this contract) to the caller's pay-per-call credit; reports
    /// debit it at `pricePerCall`, the fee taken then.
    function depositCredit(uint256 amount) public nonReentrant {
        if (amount == 0) revert OutOfBounds("amount");
        token.safeTransferFrom(msg.sender, address(this), amount);
        Credit storage c = _credits[msg.sender];
        c.balance += amount;
        emit CreditDeposited(msg.sender, amount, c.balance);
    }

    /// The same as `depositCredit`, approving it with an EIP-2612 permit.
    function depositCreditWithPermit(uint256 amount, uint256 permitDeadline, uint8 v, bytes32 r, bytes32 s)
        external
    {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, permitDeadline, v, r, s) {}
        catch {}
        depositCredit(amount);
    }

    /// Start taking `amount` of unused credit back (replacing a withdrawal in progress).
    /// Delayed, not immediate: providers serve a client first and report its calls later,
    /// in batches; an immediate withdrawal would let a client use the service and leave
    /// before the report, unpaid. So the client is no longer authorized by what is
    /// withdrawing from now on (`creditOf`'s `available`), and for `creditWithdrawalDelay`
    /// reports of calls served before still debit the whole balance; what is left leaves then.
    function beginCreditWithdrawal(uint256 amount) external {
        Credit storage c = _credits[msg.sender];
        if (amount == 0 || amount > c.balance) revert OutOfBounds("amount");
        c.withdrawing = amount;
        c.withdrawableAt = uint64(block.timestamp + creditWithdrawalDelay);
        emit CreditWithdrawalStarted(msg.sender, amount, c.withdrawableAt);
    }

    /// Pay out the withdrawal begun with `beginCreditWithdrawal`, after its delay: what
    /// reports left of it.
    function withdrawCredit() external nonReentrant returns (uint256 amount) {
        Credit storage c = _credits[msg.sender];
        if (c.withdrawing == 0) revert NoCreditWithdrawal();
        if (block.timestamp < c.withdrawableAt) revert CreditLocked(c.withdrawableAt);
        amount = c.withdrawing < c.balance ? c.withdrawing : c.balance; // reports came first
        c.balance -= amount;
        c.withdrawing = 0;
        if (amount > 0) token.safeTransfer(msg.sender, amount);
        emit CreditWithdrawn(msg.sender, amount, c.balance);
    }

    /// A client's credit (all of it), what is withdrawing and when it may leave, and what
    /// authorizes new calls (the credit less what is withdrawing).
    function creditOf(address client)
        public
        view
        returns (uint256 balance, uint256 withdrawing, uint64 withdrawableAt, uint256 available)
    {
        Credit storage c = _credits[client];
        uint256 leaving = c.withdrawing < c.balance ? c.withdrawing : c.balance;
        return (c.balance, c.withdrawing, c.withdrawableAt, c.balance - leaving);
    }

    /// Whether providers should serve `client` now: an unexpired subscription, or credit
    /// that is not withdrawing.
    function isAuthorized(address client) external view returns (bool) {
        if (planUntil[client] > block.timestamp) return true;
        (,,, uint256 available) = creditOf(client);
        return available > 0;
    }

    // ---- usage

    /// The ProofOfUse "model" RPC usage of `chainId` is counted under.
    function usageKey(uint64 chainId) public pure returns (bytes32) {
        return keccak256(abi.encode("rpc", chainId));
    }

    /// Report `calls[i]` calls of `clients[i]` served for `chainId` (an active provider for
    /// it only). A client with an unexpired subscription earns the provider `callReward` a
    /// call from its reward budget, while the budget lasts; any other is debited `pricePerCall`
    /// a call from its credit, at most all of it, paid to the provider less the fee (taken
    /// on the report's total). A client with neither counts for nothing and is not recorded;
    /// the others are recorded to ProofOfUse (`usageKey(chainId)`, one request per entry).
    /// Trusted up to the bounds (entries, `maxCallsPerReport`, the clients' credit and
    /// budgets), not proven: see the contract's notice; the DAO slashes inflated reports.
    function reportUsage(uint64 chainId, address[] calldata clients, uint256[] calldata calls)
        external
        nonReentrant
    {
        Provider storage p = _providers[msg.sender][chainId];
        if (!_isActive(p)) revert NotActiveProvider(msg.sender, chainId);
        uint256 entries = clients.length;
        if (entries == 0 || entries > MAX_REPORT_ENTRIES || calls.length != entries) revert OutOfBounds("clients");
        uint256 total = 0;
        for (uint256 i = 0; i < entries; i++) {
            total += calls[i];
        }
        if (total > maxCallsPerReport) revert OutOfBounds("calls");
        bytes32 usage = usageKey(chainId);
        uint256 pool = rewardPool;
        uint256 served = 0;
        uint256 debited = 0;
        uint256 rewarded = 0;
        for (uint256 i = 0; i < entries; i++) {
            address client = clients[i];
            uint256 count = calls[i];
            if (count == 0) continue;
            if (planUntil[client] > block.timestamp) {
                uint256 reward = count * callReward;
                uint256 budget = rewardBudget[client];
                if (reward > budget) reward = budget;
                rewardBudget[client] = budget - reward;
                pool -= reward; // (the sum of the budgets)
                rewarded += reward;
            } else {
                Credit storage c = _credits[client];
                uint256 cost = count * pricePerCall;
                if (cost > c.balance) cost = c.balance;
                if (cost == 0) continue; // neither plan: not served for pay, not recorded
                c.balance -= cost;
                debited += cost;
                emit CreditDebited(client, msg.sender, count, cost, c.balance);
            }
            served += count;
            proofOfUse.recordMany(usage, client, count, 1);
        }
        rewardPool = pool;
        p.servedCalls += uint96(served); // at most MAX_CALLS_PER_REPORT a report
        FeeSplit.Shares memory s = FeeSplit.shares(debited, feeBps, 0, 0);
        earnings[msg.sender] += s.ownerPortion + rewarded;
        if (s.toTreasury > 0) token.safeTransfer(treasury, s.toTreasury);
        emit UsageReported(msg.sender, chainId, served, debited, rewarded);
    }

    /// Pay out what reports earned the caller.
    function claim() external nonReentrant returns (uint256 amount) {
        amount = earnings[msg.sender];
        if (amount == 0) revert NoEarnings();
        earnings[msg.sender] = 0;
        token.safeTransfer(msg.sender, amount);
        emit EarningsClaimed(msg.sender, amount);
    }

    // ---- slashing

    /// What a provider signs to answer that block `number` of this chain has `blockHash`
    /// (EIP-712 `BlockClaim` in this contract's domain, chainId = this chain's).
    function blockClaimDigest(uint256 number, bytes32 blockHash) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(BLOCK_CLAIM_TYPEHASH, uint64(block.chainid), number, blockHash)));
    }

    function isClaimUsed(address provider, uint256 number, bytes32 claimedHash) external view returns (bool) {
        return _usedClaims[keccak256(abi.encode(provider, blockClaimDigest(number, claimedHash)))];
    }

    /// Slash `provider` for signing that block `number` of this chain has `claimedHash` when
    /// it has not: `slashBps` of its deposit for this chain (also while unbonding),
    /// `bountyBps` of that to the caller (none if the caller is the provider), the rest to
    /// the treasury. Anyone may call, once per claim, while `blockhash(number)` is known
    /// (the last 256 blocks). A provider signs only blocks it holds final: a claim about a
    /// block a reorg replaced is as wrong as any other. Only this chain's blocks: the EVM
    /// sees no other chain's hashes (other chains: `slashByGovernance`).
    function slashWrongBlock(address provider, uint256 number, bytes32 claimedHash, bytes calldata signature)
        external
        nonReentrant
    {
        bytes32 actual = blockhash(number); // zero for this block, later ones, and older than 256
        if (actual == bytes32(0)) revert BlockNotVerifiable(number);
        if (actual == claimedHash) revert CorrectClaim(number, claimedHash);
        bytes32 digest = blockClaimDigest(number, claimedHash);
        (address signer, ECDSA.RecoverError bad,) = ECDSA.tryRecover(digest, signature);
        if (bad != ECDSA.RecoverError.NoError || signer != provider) revert WrongSigner(signer);
        uint64 chainId = uint64(block.chainid);
        Provider storage p = _providers[provider][chainId];
        if (p.registeredAt == 0) revert NotProvider(provider, chainId);
        bytes32 key = keccak256(abi.encode(provider, digest));
        if (_usedClaims[key]) revert ClaimUsed(digest);
        _usedClaims[key] = true;
        uint256 amount = (p.deposit * slashBps) / 10_000;
        uint256 bounty = msg.sender == provider ? 0 : (amount * bountyBps) / 10_000;
        _slash(provider, chainId, p, amount, bounty, digest);
    }

    /// A slash the DAO decided on evidence the contract cannot check (wrong answers about
    /// other chains, inflated usage reports): `amount` (at most the deposit, also while
    /// unbonding) to the treasury; `evidence` is the hash of what the DAO judged.
    function slashByGovernance(address provider, uint64 chainId, uint256 amount, bytes32 evidence)
        external
        onlyGovernance
        nonReentrant
    {
        Provider storage p = _providers[provider][chainId];
        if (p.registeredAt == 0) revert NotProvider(provider, chainId);
        if (amount == 0) revert OutOfBounds("amount");
        // The deposit may have shrunk while the vote ran (another slash): take what is left.
        if (amount > p.deposit) amount = p.deposit;
        _slash(provider, chainId, p, amount, 0, evidence);
    }

    function _slash(
        address provider,
        uint64 chainId,
        Provider storage p,
        uint256 amount,
        uint256 bounty,
        bytes32 evidence
    ) private {
        p.deposit -= amount;
        p.slashes += 1;
        if (bounty > 0) token.safeTransfer(msg.sender, bounty);
        if (amount > bounty) token.safeTransfer(treasury, amount - bounty);
        emit ProviderSlashed(provider, chainId, msg.sender, amount, bounty, p.deposit, evidence);
    }

    // ---- parameters (governance)

    function parameters() external view returns (Parameters memory) {
        return Parameters(
            minDeposit,
            unbondingDelay,
            creditWithdrawalDelay,
            pricePerDay,
            pricePerCall,
            callReward,
            maxCallsPerReport,
            feeBps,
            slashBps,
            bountyBps,
            treasury
        );
    }

    function setParameters(Parameters calldata parameters_) external onlyGovernance {
        _setParameters(parameters_);
    }

    function _setParameters(Parameters calldata q) private {
        // Above zero, so a deposit is at stake; capped, so no vote prices every provider out.
        if (q.minDeposit == 0 || q.minDeposit > MAX_MIN_DEPOSIT) revert OutOfBounds("minDeposit");
        // Long enough for a wrong claim or an inflated report to be slashed before the deposit leaves.
        _atLeast(q.unbondingDelay, MIN_UNBONDING_DELAY, 1 minutes, "unbondingDelay");
        if (q.unbondingDelay > MAX_UNBONDING_DELAY) revert OutOfBounds("unbondingDelay");
        // Long enough for providers to report the calls they served before the credit leaves.
        _atLeast(q.creditWithdrawalDelay, MIN_CREDIT_WITHDRAWAL_DELAY, 10 seconds, "creditWithdrawalDelay");
        if (q.creditWithdrawalDelay > MAX_CREDIT_WITHDRAWAL_DELAY) revert OutOfBounds("creditWithdrawalDelay");
        // Free plans would authorize anyone at no cost.
        if (q.pricePerDay == 0 || q.pricePerDay > MAX_PRICE_PER_DAY) revert OutOfBounds("pricePerDay");
        if (q.pricePerCall == 0 || q.pricePerCall > MAX_PRICE_PER_CALL) revert OutOfBounds("pricePerCall");
        // A subscription call never earns a provider more than a paid one would.
        if (q.callReward > q.pricePerCall) revert OutOfBounds("callReward");
        // What one unproven report can claim; zero would refuse every report.
        if (q.maxCallsPerReport == 0 || q.maxCallsPerReport > MAX_CALLS_PER_REPORT) {
            revert OutOfBounds("maxCallsPerReport");
        }
        if (q.feeBps > MAX_FEE_BPS) revert OutOfBounds("feeBps");
        // A proven wrong answer always costs something, and never more than half the deposit at once.
        if (q.slashBps == 0 || q.slashBps > MAX_SLASH_BPS) revert OutOfBounds("slashBps");
        // At most half: a provider proving its own claim through another account still loses.
        if (q.bountyBps > MAX_BOUNTY_BPS) revert OutOfBounds("bountyBps");
        if (q.treasury == address(0)) revert OutOfBounds("treasury");
        minDeposit = q.minDeposit;
        unbondingDelay = q.unbondingDelay;
        creditWithdrawalDelay = q.creditWithdrawalDelay;
        pricePerDay = q.pricePerDay;
        pricePerCall = q.pricePerCall;
        callReward = q.callReward;
        maxCallsPerReport = q.maxCallsPerReport;
        feeBps = q.feeBps;
        slashBps = q.slashBps;
        bountyBps = q.bountyBps;
        treasury = q.treasury;
        emit ParametersChanged(
            q.minDeposit,
            q.unbondingDelay,
            q.creditWithdrawalDelay,
            q.pricePerDay,
            q.pricePerCall,
            q.callReward,
            q.maxCallsPerReport,
            q.feeBps,
            q.slashBps,
            q.bountyBps,
            q.treasury
        );
    }

    // ---- internal

    function _isActive(Provider storage p) private view returns (bool) {
        return p.registeredAt != 0 && p.unbondingUntil == 0 && p.deposit >= minDeposit;
    }

    /// The caller's registration for `chainId`, which must be there and not unbonding.
    function _bonded(address provider, uint64 chainId) private view returns (Provider storage p) {
        p = _providers[provider][chainId];
        if (p.registeredAt == 0) revert NotProvider(provider, chainId);
        if (p.unbondingUntil != 0) revert ProviderIsUnbonding(p.unbondingUntil);
    }

    function _checkEndpoint(string calldata endpoint) private pure {
        uint256 length = bytes(endpoint).length;
        if (length == 0 || length > MAX_ENDPOINT_BYTES) revert OutOfBounds("endpoint");
    }
}
