// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {JoyGoverned} from "./JoyGoverned.sol";
import {StakedJoy} from "./StakedJoy.sol";

/// @title The node registry: stake, registration, reputation, rewards, slashing,
/// and the committee each inference request is answered by.
/// @notice A node stakes JOY (at least `minStake`) and registers its libp2p peer id,
/// multiaddrs, served models and capacity. Reputation changes only through the
/// proof-of-inference contract (REPUTATION_ROLE). Stake leaves through an
/// unbonding delay. Equivocation evidence (checked by the proof-of-inference
/// contract, SLASHER_ROLE) takes the whole stake: part to the reporter, the rest
/// to the treasury, and deregisters the node. Stakers earn a share of platform
/// fees pro rata to active stake (reward-per-token accounting); certificate
/// signers are credited their share; both are claimed with `claimRewards`. Active
/// stake is mirrored 1:1 in stJOY (StakedJoy), so stakers vote with it. A dispute the
/// DAO upholds slashes the certificate's signers (DisputeResolver, SLASHER_ROLE), the
/// requester's refund first.
contract NodeCoordinator is JoyGoverned, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant REPUTATION_ROLE = keccak256("REPUTATION_ROLE");
    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");
    bytes32 public constant DISTRIBUTOR_ROLE = keccak256("DISTRIBUTOR_ROLE");

    uint256 public constant INITIAL_REPUTATION = 1000;
    uint256 public constant MAX_REPUTATION = 10_000;
    /// Bounded candidate set: committee selection reads at most this many nodes per model.
    uint256 public constant MAX_NODES_PER_MODEL = 128;
    uint256 public constant MAX_COMMITTEE = 16;
    uint256 public constant MAX_MODELS_PER_NODE = 32;
    uint256 public constant MIN_UNBONDING_DELAY = 1 days; // 1 minute on the devnet
    uint256 public constant MAX_UNBONDING_DELAY = 30 days;
    uint16 public constant MAX_REPORTER_SHARE_BPS = 5000;
    uint256 private constant PRECISION = 1e18;

    struct Node {
        uint256 stake; // active stake: counts for rewards and committee weight
        uint256 unbonding; // leaving stake, withdrawable at unbondingReleaseAt
        uint256 unbondingReleaseAt;
        uint256 reputation;
        uint32 capacity;
        bool registered;
        bool joined; // has registered before: only a first registration sets INITIAL_REPUTATION
        string peerId;
        string[] multiaddrs;
        bytes32[] models;
    }

    IERC20 public token;
    StakedJoy public stakedJoy;
    address public treasury;
    uint256 public minStake;
    uint256 public unbondingDelay;
    uint16 public reporterShareBps; // of a slashed stake, to whoever proved equivocation

    mapping(address => Node) private _nodes;
    mapping(bytes32 => address[]) private _modelNodes;
    mapping(bytes32 => mapping(address => uint256)) private _modelIndex; // index + 1
    uint256 public totalStaked;

    mapping(address => uint256) public openDisputes; // against the node: its stake cannot leave

    uint256 public rewardPerToken; // scaled by PRECISION
    mapping(address => uint256) private _rewardPerTokenPaid;
    mapping(address => uint256) private _rewards;

    event Staked(address indexed node, uint256 amount, uint256 stake);
    event Registered(address indexed node, string peerId, string[] multiaddrs, bytes32[] models, uint32 capacity);
    event Deregistered(address indexed node);
    event UnbondingStarted(address indexed node, uint256 amount, uint256 releaseAt);
    event Withdrawn(address indexed node, uint256 amount);
    event ReputationChanged(address indexed node, uint256 reputation);
    event Slashed(address indexed node, address indexed reporter, uint256 amount, uint256 toReporter);
    event RewardsDistributed(uint256 toSigners, uint256 toStakers);
    event RewardsClaimed(address indexed account, uint256 amount);
    event ParametersChanged(uint256 minStake, uint256 unbondingDelay, uint16 reporterShareBps, address treasury);

    error StakeTooLow(uint256 stake, uint256 minimum);
    error NotRegistered(address node);
    error TooMany(string what, uint256 limit);
    error NothingToWithdraw();
    error StillUnbonding(uint256 releaseAt);
    error UnderDispute(uint256 openDisputes);

    function initialize(
        IERC20 token_,
        StakedJoy stakedJoy_,
        address governance,
        address treasury_,
        uint256 minStake_,
        uint256 unbondingDelay_
    ) external initializer {
        __JoyGoverned_init(governance);
        token = token_;
        stakedJoy = stakedJoy_;
        _setParameters(minStake_, unbondingDelay_, 1000, treasury_);
    }

    // ---- staking and registration

    function stake(uint256 amount) external nonReentrant {
        _settleRewards(msg.sender);
        token.safeTransferFrom(msg.sender, address(this), amount);
        Node storage node = _nodes[msg.sender];
        node.stake += amount;
        totalStaked += amount;
        stakedJoy.mint(msg.sender, amount);
        emit Staked(msg.sender, amount, node.stake);
    }

    /// Register, or update an existing registration (same call).
    function register(
        string calldata peerId,
        string[] calldata multiaddrs,
        bytes32[] calldata models,
        uint32 capacity
    ) external {
        Node storage node = _nodes[msg.sender];
        if (node.stake < minStake) revert StakeTooLow(node.stake, minStake);
        if (models.length > MAX_MODELS_PER_NODE) revert TooMany("models", MAX_MODELS_PER_NODE);
        if (!node.registered) {
            node.registered = true;
            // A node that comes back (after unbonding, or a slash) keeps the reputation it
            // left with; zero stays zero, so it is never selected again.
            if (!node.joined) {
                node.joined = true;
                node.reputation = INITIAL_REPUTATION;
            }
        }
        _leaveModels(msg.sender, node);
        node.peerId = peerId;
        node.multiaddrs = multiaddrs;
        node.capacity = capacity;
        for (uint256 i = 0; i < models.length; i++) {
            bytes32 model = models[i];
            if (_modelIndex[model][msg.sender] != 0) continue; // listed twice
            if (_modelNodes[model].length >= MAX_NODES_PER_MODEL) revert TooMany("nodes for a model", MAX_NODES_PER_MODEL);
            _modelNodes[model].push(msg.sender);
            _modelIndex[model][msg.sender] = _modelNodes[model].length;
            node.models.push(model);
        }
        emit Registered(msg.sender, peerId, multiaddrs, node.models, capacity);
    }

    /// Move `amount` of stake into unbonding; a node left below the minimum is deregistered.
    function unstake(uint256 amount) external {
        Node storage node = _nodes[msg.sender];
        if (amount == 0 || amount > node.stake) revert OutOfBounds("amount");
        _settleRewards(msg.sender);
        node.stake -= amount;
        totalStaked -= amount;
        stakedJoy.burn(msg.sender, amount);
        node.unbonding += amount;
        node.unbondingReleaseAt = block.timestamp + unbondingDelay;
        emit UnbondingStarted(msg.sender, amount, node.unbondingReleaseAt);
        if (node.registered && node.stake < minStake) _deregister(msg.sender, node);
    }

    function withdraw() external nonReentrant {
        Node storage node = _nodes[msg.sender];
        uint256 amount = node.unbonding;
        if (amount == 0) revert NothingToWithdraw();
        if (block.timestamp < node.unbondingReleaseAt) revert StillUnbonding(node.unbondingReleaseAt);
        // A dispute may still slash it: the DAO's vote takes longer than unbonding.
        if (openDisputes[msg.sender] > 0) revert UnderDispute(openDisputes[msg.sender]);
        node.unbonding = 0;
        token.safeTransfer(msg.sender, amount);
        emit Withdrawn(msg.sender, amount);
    }

    // ---- reputation and slashing (proof-of-inference contract)

    function adjustReputation(address account, int256 delta) external onlyRole(REPUTATION_ROLE) {
        Node storage node = _nodes[account];
        if (!node.registered) return; // slashed or gone: nothing to adjust
        int256 next = int256(node.reputation) + delta;
        if (next < 0) next = 0;
        if (next > int256(MAX_REPUTATION)) next = int256(MAX_REPUTATION);
        node.reputation = uint256(next);
        emit ReputationChanged(account, node.reputation);
    }

    /// Equivocation: the whole stake, `reporterShareBps` of it to the reporter.
    function slash(address account, address reporter) external onlyRole(SLASHER_ROLE) nonReentrant {
        uint256 amount = _nodes[account].stake + _nodes[account].unbonding;
        // A node reporting itself gets no reporter share.
        uint256 toReporter = reporter == account ? 0 : (amount * reporterShareBps) / 10_000;
        _slash(account, reporter, toReporter);
    }

    /// An upheld dispute: the whole stake, up to `owed` of it to `payee` (the
    /// requester's refund). Returns what `payee` got.
    function slashOwing(address account, address payee, uint256 owed)
        external
        onlyRole(SLASHER_ROLE)
        nonReentrant
        returns (uint256 paid)
    {
        uint256 amount = _nodes[account].stake + _nodes[account].unbonding;
        paid = owed < amount ? owed : amount;
        _slash(account, payee, paid);
    }

    /// A dispute against these signers opened (`held`) or closed: while one is open their
    /// stake may unbond but not be withdrawn.
    function holdStake(address[] calldata accounts, bool held) external onlyRole(SLASHER_ROLE) {
        for (uint256 i = 0; i < accounts.length; i++) {
            if (held) openDisputes[accounts[i]] += 1;
            else openDisputes[accounts[i]] -= 1;
        }
    }

    function _slash(address account, address payee, uint256 toPayee) private {
        Node storage node = _nodes[account];
        _settleRewards(account);
        uint256 amount = node.stake + node.unbonding;
        uint256 forfeited = _rewards[account]; // unclaimed rewards go with the stake
        _rewards[account] = 0;
        totalStaked -= node.stake;
        if (node.stake > 0) stakedJoy.burn(account, node.stake);
        node.stake = 0;
        node.unbonding = 0;
        node.reputation = 0;
        if (node.registered) _deregister(account, node);
        if (toPayee > 0) token.safeTransfer(payee, toPayee);
        if (amount + forfeited > toPayee) token.safeTransfer(treasury, amount + forfeited - toPayee);
        emit Slashed(account, payee, amount, toPayee);
    }

    // ---- rewards (marketplace)

    /// The caller has transferred `toSigners + toStakers` JOY to this contract.
    function distribute(address[] calldata signers, uint256 toSigners, uint256 toStakers)
        external
        onlyRole(DISTRIBUTOR_ROLE)
    {
        if (signers.length > 0) {
            uint256 each = toSigners / signers.length;
            for (uint256 i = 0; i < signers.length; i++) {
                _rewards[signers[i]] += each;
            }
            uint256 dust = toSigners - each * signers.length;
            if (dust > 0) token.safeTransfer(treasury, dust);
        } else if (toSigners > 0) {
            token.safeTransfer(treasury, toSigners);
        }
        if (totalStaked == 0) {
            if (toStakers > 0) token.safeTransfer(treasury, toStakers);
        } else {
            uint256 increment = (toStakers * PRECISION) / totalStaked;
            rewardPerToken += increment;
            // What the per-token rounding cannot pay out goes to the treasury, not limbo.
            uint256 dust = toStakers - (increment * totalStaked) / PRECISION;
            if (dust > 0) token.safeTransfer(treasury, dust);
        }
        emit RewardsDistributed(toSigners, toStakers);
    }

    function earned(address account) public view returns (uint256) {
        uint256 accrued = (_nodes[account].stake * (rewardPerToken - _rewardPerTokenPaid[account])) / PRECISION;
        return _rewards[account] + accrued;
    }

    function claimRewards() external nonReentrant returns (uint256 amount) {
        _settleRewards(msg.sender);
        amount = _rewards[msg.sender];
        _rewards[msg.sender] = 0;
        if (amount > 0) token.safeTransfer(msg.sender, amount);
        emit RewardsClaimed(msg.sender, amount);
    }

    function _settleRewards(address account) private {
        _rewards[account] = earned(account);
        _rewardPerTokenPaid[account] = rewardPerToken;
    }

    // ---- committee selection

    /// The `k` nodes drawn by `seed` for `model`: active nodes serving it, ranked by
    /// keccak256(seed, node) (high 128 bits) times stake x reputation, highest first,
    /// ties broken by lower address. joynode computes the same ranking off-chain
    /// (joynode/chain/committee.py). Paid requests draw with `ModelMarketplace.drawCommittee`'s
    /// seed; unpaid jobs (off-chain) with their request id.
    function selectCommittee(bytes32 model, bytes32 seed, uint256 k)
        external
        view
        returns (address[] memory committee)
    {
        if (k == 0 || k > MAX_COMMITTEE) revert OutOfBounds("k");
        address[] storage candidates = _modelNodes[model];
        address[] memory best = new address[](k);
        uint256[] memory scores = new uint256[](k);
        uint256 filled = 0;
        for (uint256 i = 0; i < candidates.length; i++) {
            address candidate = candidates[i];
            Node storage node = _nodes[candidate];
            uint256 weight = node.stake * node.reputation;
            if (weight == 0 || node.stake < minStake) continue;
            uint256 draw = uint256(keccak256(abi.encode(seed, candidate))) >> 128;
            uint256 score = draw * weight;
            // insertion into the sorted top-k
            uint256 position = filled;
            while (position > 0 && _before(score, candidate, scores[position - 1], best[position - 1])) {
                if (position < k) {
                    scores[position] = scores[position - 1];
                    best[position] = best[position - 1];
                }
                position--;
            }
            if (position < k) {
                scores[position] = score;
                best[position] = candidate;
                if (filled < k) filled++;
            }
        }
        committee = new address[](filled);
        for (uint256 i = 0; i < filled; i++) committee[i] = best[i];
    }

    /// How many nodes serving `model` a committee could be drawn from (stake and weight).
    function eligibleCount(bytes32 model) external view returns (uint256 count) {
        address[] storage candidates = _modelNodes[model];
        for (uint256 i = 0; i < candidates.length; i++) {
            Node storage node = _nodes[candidates[i]];
            if (node.stake * node.reputation != 0 && node.stake >= minStake) count++;
        }
    }

    function _before(uint256 scoreA, address a, uint256 scoreB, address b) private pure returns (bool) {
        return scoreA > scoreB || (scoreA == scoreB && a < b);
    }

    // ---- views

    function nodeInfo(address account)
        external
        view
        returns (
            uint256 stake_,
            uint256 unbonding,
            uint256 unbondingReleaseAt,
            uint256 reputation,
            uint32 capacity,
            bool registered,
            string memory peerId,
            string[] memory multiaddrs,
            bytes32[] memory models
        )
    {
        Node storage node = _nodes[account];
        return (
            node.stake,
            node.unbonding,
            node.unbondingReleaseAt,
            node.reputation,
            node.capacity,
            node.registered,
            node.peerId,
            node.multiaddrs,
            node.models
        );
    }

    function nodesServing(bytes32 model) external view returns (address[] memory) {
        return _modelNodes[model];
    }

    function isActive(address account) external view returns (bool) {
        Node storage node = _nodes[account];
        return node.registered && node.stake >= minStake;
    }

    /// Whether `account` could be drawn for `model` now: registered for it, with at least
    /// the minimum stake and some reputation (what `selectCommittee` requires).
    function isEligible(address account, bytes32 model) external view returns (bool) {
        Node storage node = _nodes[account];
        return _modelIndex[model][account] != 0 && node.stake >= minStake && node.reputation != 0;
    }

    // ---- parameters (governance)

    function setParameters(uint256 minStake_, uint256 unbondingDelay_, uint16 reporterShareBps_, address treasury_)
        external
        onlyGovernance
    {
        _setParameters(minStake_, unbondingDelay_, reporterShareBps_, treasury_);
    }

    function _setParameters(uint256 minStake_, uint256 unbondingDelay_, uint16 reporterShareBps_, address treasury_)
        private
    {
        if (minStake_ == 0) revert OutOfBounds("minStake");
        _atLeast(unbondingDelay_, MIN_UNBONDING_DELAY, 1 minutes, "unbondingDelay");
        if (unbondingDelay_ > MAX_UNBONDING_DELAY) revert OutOfBounds("unbondingDelay");
        if (reporterShareBps_ > MAX_REPORTER_SHARE_BPS) revert OutOfBounds("reporterShareBps");
        if (treasury_ == address(0)) revert OutOfBounds("treasury");
        minStake = minStake_;
        unbondingDelay = unbondingDelay_;
        reporterShareBps = reporterShareBps_;
        treasury = treasury_;
        emit ParametersChanged(minStake_, unbondingDelay_, reporterShareBps_, treasury_);
    }

    // ---- internal

    function _deregister(address account, Node storage node) private {
        _leaveModels(account, node);
        node.registered = false;
        emit Deregistered(account);
    }

    function _leaveModels(address account, Node storage node) private {
        for (uint256 i = 0; i < node.models.length; i++) {
            bytes32 model = node.models[i];
            uint256 index = _modelIndex[model][account];
            if (index == 0) continue;
            address[] storage list = _modelNodes[model];
            address last = list[list.length - 1];
            list[index - 1] = last;
            _modelIndex[model][last] = index;
            list.pop();
            delete _modelIndex[model][account];
        }
        delete node.models;
    }
}
