"""Verified inference: committees, commit-reveal voting, majority certificates."""
