"""The node's side of the JoyNet DAO: the proposals mirror, ``gov.*`` control methods.

``actions``: proposal actions from a TOML file to calldata, and calldata back to
words. ``mirror``: the watcher's mirror of the governor's proposals and votes in
SQLite, and each proposal's state from it. ``service``: delegating, proposing,
voting, queueing, executing and cancelling from the node's account, with
every revert explained.
"""
