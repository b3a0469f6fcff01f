"""The bottom layer: what every Pantry role shares, torch-free.

Serving helpers (ready files, signals, logging, gRPC options, health and reflection, metrics
endpoint, tables), the engine description and load, sampling settings, the request contract and
the error types. It imports nothing of Pantry's but the generated pantry.v1 modules.
"""
