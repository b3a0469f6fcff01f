"""The decode role: pulls prompt KV from the pool and generates in a continuous batch."""
