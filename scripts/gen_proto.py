"""Regenerate pantry/v1/*_pb2*.py from proto/pantry/v1/*.proto (run: make proto).

With --check it regenerates into a temporary folder and exits 1 when the committed modules differ,
so CI catches a .proto edited without regenerating.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "pantry" / "v1"
# The generated modules take the proto package's own path, pantry.v1, a package name of ours.
OUT_DIR = ROOT / "pantry" / "v1"


def generate(out_root: Path) -> list[Path]:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "pantry" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    ns = parser.parse_args()
    if not ns.check:
        for path in generate(ROOT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = OUT_DIR / path.name
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(path.name)
        extra = {p.name for p in OUT_DIR.glob("*_pb2*.py*")} - {p.name for p in fresh}
        stale += sorted(extra)
        if stale:
            print("stale generated protobuf modules (run `make proto`): " + ", ".join(stale))
            return 1
    print("generated protobuf modules are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
