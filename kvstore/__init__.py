"""Pantry's KV-cache pool: block addressing, master, storage node, client and CLI."""
