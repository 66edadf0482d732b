"""The consensus actor's Prometheus metrics (``joynode_consensus_*``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ConsensusMetrics:
    """The consensus actor's metrics, shared by its rooms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "joynode_consensus_jobs", "Jobs by outcome", ["outcome"], registry=registry
        )
        self.rejected = Counter(
            "joynode_consensus_rejected_votes",
            "Votes and offers refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.dissents = Counter(
            "joynode_consensus_dissents",
            "Committee members who revealed an output against the certified majority: this "
            "node (self: its engine disagrees with its peers') or another member (peer)",
            ["who"],
            registry=registry,
        )
        self.seconds = Histogram(
            "joynode_consensus_job_seconds", "Offer to outcome", registry=registry
        )
        self.onchain = Counter(
            "joynode_consensus_onchain_transactions",
            "Paid-job transactions (request, submit, takeover, report, refund) by outcome",
            ["action", "outcome"],
            registry=registry,
        )
        self.messages = Counter(
            "joynode_consensus_messages_sent",
            "Job messages sent, by kind and route (direct: one per recipient; gossip: one "
            "publish for whoever could not be reached directly; dropped: direct-only "
            "messages, tokens, that could not be delivered)",
            ["kind", "route"],
            registry=registry,
        )
        self.phase = Histogram(
            "joynode_consensus_phase_seconds",
            "Time in each phase (inference, waiting for commits)",
            ["phase"],
            registry=registry,
        )
