"""`scripts/gen_proto.py --check` (run once by `make test`) catches a .proto edited without
regenerating pantry/v1."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_check_catches_an_edited_proto(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    for part in ("proto", "scripts", "pantry/v1"):
        shutil.copytree(ROOT / part, copy / part)
    proto = copy / "proto" / "pantry" / "v1" / "common.proto"
    proto.write_text(proto.read_text().replace("bool ignore_eos = 7;",
                                               "bool ignore_eos = 7;\n  bool added = 99;"))
    res = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=copy,
                         capture_output=True, text=True, timeout=120)
    assert (res.returncode, res.stdout) == (
        1, "stale generated protobuf modules (run `make proto`): common_pb2.py, common_pb2.pyi\n"
    )
