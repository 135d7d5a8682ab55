"""Regenerate the committed gRPC code from kiam.proto: ``python -m protos.generate``.

The generated modules are committed so that installing podiam needs no code generation step;
``tests/test_protos.py`` regenerates them into a temporary folder and fails if they differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS_DIR = Path(__file__).resolve().parent
PROTO_FILE = "kiam.proto"
GENERATED = ("kiam_pb2.py", "kiam_pb2.pyi", "kiam_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Write the generated modules into ``out_dir``, importable as ``protos.kiam_pb2``."""
    # protoc names imports after the proto's path relative to the include root, so compiling
    # from the repository root with "protos/kiam.proto" yields "from protos import kiam_pb2".
    root = PROTOS_DIR.parent
    staging = out_dir / "_staging"
    (staging / "protos").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--python_out={staging}",
        f"--pyi_out={staging}",
        f"--grpc_python_out={staging}",
        f"protos/{PROTO_FILE}",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_FILE}")
    for name in GENERATED:
        (staging / "protos" / name).replace(out_dir / name)
    for leftover in sorted(staging.rglob("*"), reverse=True):
        leftover.rmdir() if leftover.is_dir() else leftover.unlink()
    staging.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTOS_DIR, help="output folder")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
