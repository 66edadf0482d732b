"""Feeless inference: clients' signed requests against prepaid balances, settled in batches.

``ledger``: the requests this node has seen, in SQLite (what each client owes,
what waits to settle). ``service``: the ``prepaid`` actor, which admits
requests for the consensus actor and settles certified ones in batches
(``PrepaidInference.settleBatch``). ``control``: ``balance.*`` and
``prepaid.*`` control methods.
"""
