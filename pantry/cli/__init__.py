"""The `pantry` command: one role per process (`prefill`, `decode`, `conductor`), or `local`, a
whole system on this machine. The top layer: nothing imports it."""
