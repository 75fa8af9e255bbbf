"""Tunery's LoRA resolver for vLLM: `vllm serve <base> --enable-lora` finds a completed job's
adapter by its name, `tunery-job-<job id>`, in Tunery's storage.

`adapter_cache` is the storage side and imports no vLLM; `plugin` is the thin class vLLM loads
through its `vllm.general_plugins` entry point.
"""
