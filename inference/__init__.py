"""Tunery's embedded inference engine: an OpenAI-compatible HTTP server (vLLM's protocol)
that answers with base models and the LoRA adapters jobs exported, batching requests of one
base across adapters. Its own process, so training never blocks answers; `python -m
inference` or `inference.server.serve`.
"""
