"""The admin control socket: JSON-RPC 2.0 over a local websocket."""
