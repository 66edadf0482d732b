"""The operator dashboard: static files the ``http`` actor serves (no build step)."""
