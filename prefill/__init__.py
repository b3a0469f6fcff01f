"""The prefill role: computes prompt KV, stores it in the pool, hands off to decode."""
