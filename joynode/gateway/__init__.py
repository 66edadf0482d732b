"""The OpenAI-compatible gateway's parts (issue 19). ``apikeys``: the API keys that
authorize its clients, stored hashed in the node's SQLite; ``control``: their
``apikeys.*`` control methods."""
