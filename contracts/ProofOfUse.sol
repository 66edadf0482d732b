// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {JoyGoverned} from "./JoyGoverned.sol";

/// @title Append-only log of settled usage: who used which model, how much.
/// @notice Written by the marketplace (RECORDER_ROLE) when a request settles;
/// one record per request id. Batched settlements of prepaid requests
/// (`PrepaidInference`, RECORDER_ROLE) add to the totals only, per model and user:
/// a row per request would cost more than the request's whole settlement.
contract ProofOfUse is JoyGoverned {
    bytes32 public constant RECORDER_ROLE = keccak256("RECORDER_ROLE");

    struct Usage {
        bytes32 model;
        address user;
        uint256 units;
        uint64 timestamp;
    }

    mapping(bytes32 => Usage) public usageOf; // by request id
    mapping(bytes32 => uint256) public unitsByModel;
    mapping(address => uint256) public unitsByUser;
    mapping(bytes32 => uint256) public requestsByModel;
    mapping(address => uint256) public requestsByUser;
    uint256 public totalRecords;

    event UsageRecorded(bytes32 indexed requestId, bytes32 indexed model, address indexed user, uint256 units);
    event UsageAggregated(bytes32 indexed model, address indexed user, uint256 units, uint256 requests);

    error AlreadyRecorded(bytes32 requestId);

    function initialize(address governance) external initializer {
        __JoyGoverned_init(governance);
    }

    function record(bytes32 model, address user, uint256 units, bytes32 requestId) external onlyRole(RECORDER_ROLE) {
        if (usageOf[requestId].timestamp != 0) revert AlreadyRecorded(requestId);
        usageOf[requestId] = Usage(model, user, units, uint64(block.timestamp));
        unitsByModel[model] += units;
        unitsByUser[user] += units;
        requestsByModel[model] += 1;
        requestsByUser[user] += 1;
        totalRecords += 1;
        emit UsageRecorded(requestId, model, user, units);
    }

    /// `requests` settled requests of `user` for `model`, `units` in all (no per-request rows).
    function recordMany(bytes32 model, address user, uint256 units, uint256 requests)
        external
        onlyRole(RECORDER_ROLE)
    {
        unitsByModel[model] += units;
        unitsByUser[user] += units;
        requestsByModel[model] += requests;
        requestsByUser[user] += requests;
        totalRecords += requests;
        emit UsageAggregated(model, user, units, requests);
    }
}
