"""The chain RPC gateway: ``/rpc/{chain_id}`` for each chain the operator lists."""
