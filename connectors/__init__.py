"""Adapters that put other engines on Pantry's KV pool, through the pool's client library only.

Nothing in Pantry imports this package; each adapter imports its engine only inside itself
(`connectors.vllm_connector` is the one module that imports vLLM)."""
