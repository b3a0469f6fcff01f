"""The front door: public APIs, KV-centric scheduling, admission."""
