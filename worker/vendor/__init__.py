"""Third-party code Tunery ships unchanged, each folder with its licence and its origin.

`llama_cpp/`: llama.cpp's Hugging Face to GGUF converter (`convert_hf_to_gguf.py`, its
`conversion` package and the `gguf-py` library it runs with), MIT licences in
`llama_cpp/LICENSE` and `llama_cpp/gguf-py/LICENSE`, origin in `llama_cpp/VENDORED.md`. It is
not on PyPI as a module; `worker.pipeline.gguf_export` runs it as a script. The folder is no
Python package on purpose: the script imports `conversion` and `gguf` from beside itself.
"""
