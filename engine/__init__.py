"""Pantry engine: Llama-family models in torch, paged KV cache, loaders, tokenizer, sampling."""
