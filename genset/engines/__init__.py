"""Engines: the interface (`interface`, `types`), the asyncio driver (`driver`), the one
scheduling core over an executor (`core`, `scheduler`, `batch`), and the torch, mocker and
TensorRT-LLM implementations. `factory.build_engine` builds the one a worker hosts.

Importing this package imports no implementation, so the frontend and router never pull in
torch (or TensorRT-LLM) through it.
"""
