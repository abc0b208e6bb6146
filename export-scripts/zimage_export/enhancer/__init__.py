"""Prompt-enhancer export: Qwen3 causal-LM decoder (KV cache) and text encoder graphs that
share one weights file (see export_enhancer.py)."""
