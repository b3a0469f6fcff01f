"""The `kvstore` command: run a master or a node (`roles`), look at the pool (`queries`), and
change it (`edits`). `parser` builds the command line and runs a command; nothing outside the
command imports this package (a contract in pyproject.toml)."""

from kvstore.cli.parser import build_parser, main
from kvstore.cli.roles import master_config, node_config

__all__ = ["build_parser", "main", "master_config", "node_config"]
