"""Serving models: vLLM engines driven from trio, model folders and their preparation."""
