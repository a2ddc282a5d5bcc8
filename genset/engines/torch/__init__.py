"""The torch engine: a Llama-family model runner over a paged KV cache.

Importing this package does not import torch (the frontend uses `tiny.resolve_model` and must
stay torch-free); import the submodules you need.
"""
