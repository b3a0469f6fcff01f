"""The committed protobuf modules are what `make proto` generates from the .proto files now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_are_current() -> None:
    res = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_check_catches_an_edited_proto(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    proto = copy / "proto" / "pantry" / "v1" / "common.proto"
    proto.write_text(proto.read_text().replace("bool ignore_eos = 7;",
                                               "bool ignore_eos = 7;\n  bool added = 99;"))
    res = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=copy,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "common_pb2.py" in res.stdout
