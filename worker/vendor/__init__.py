"""Third-party code Tunery ships unchanged, each folder with its licence and its origin.

`llama_cpp/`: llama.cpp's Hugging Face to GGUF converter (`convert_hf_to_gguf.py` and its
`conversion` package), MIT licence in `llama_cpp/LICENSE`. It is not importable from PyPI as
a module; `worker.pipeline.gguf_export` runs it as a script. Not a Python package on purpose:
the script imports `conversion` from its own folder.
"""
