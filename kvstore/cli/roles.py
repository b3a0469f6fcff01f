"""`kvstore master` and `kvstore node`: a pool role run as a process until SIGTERM."""

from __future__ import annotations

import argparse
import logging

from kvstore.config import MasterConfig, NodeConfig
from pantry.common.config_flags import config_from_args
from pantry.common.serving import wait_for_signal, write_ready_file

log = logging.getLogger("kvstore")


def master_config(ns: argparse.Namespace) -> MasterConfig:
    return config_from_args(MasterConfig, ns)


def node_config(ns: argparse.Namespace) -> NodeConfig:
    return config_from_args(NodeConfig, ns, **({"tcp_port": None} if ns.no_tcp else {}))


def cmd_master(ns: argparse.Namespace) -> int:
    from kvstore.master_service import start_master

    cfg = master_config(ns)
    srv = start_master(cfg)
    try:
        write_ready_file(ns.ready_file, f"{cfg.host}:{srv.port}", metrics=srv.metrics.url)
        wait_for_signal()
    finally:
        srv.stop(grace=ns.grace)
    log.info("master stopped")
    return 0


def cmd_node(ns: argparse.Namespace) -> int:
    from kvstore.node_service import start_node

    srv = start_node(node_config(ns))
    try:
        write_ready_file(ns.ready_file, srv.address, metrics=srv.metrics.url)
        wait_for_signal()
    finally:
        srv.stop(grace=ns.grace)
    log.info("node stopped")
    return 0
