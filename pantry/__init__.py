"""Pantry: KV-cache-centric, prefill/decode-disaggregated LLM serving."""
