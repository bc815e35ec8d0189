"""Generate the Python stubs for proto/robot_inference.proto into policy_wire/.

    python proto/generate.py            # write policy_wire/
    python proto/generate.py --out DIR  # write DIR/policy_wire/ (the staleness test uses this)

The .proto is mapped to the virtual path `policy_wire/robot_inference.proto`,
so protoc writes `from policy_wire import robot_inference_pb2` into the gRPC
stub and the package imports without sys.path tricks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PACKAGE = "policy_wire"
PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
INIT_TEXT = '''"""The wire. robot_inference_pb2*.py and this file are generated from proto/robot_inference.proto by
proto/generate.py: never edit them. input_spec.py is written by hand: the input spec both sides read."""
'''


def generate(out_root: Path) -> list[Path]:
    """Run protoc; return the generated files."""
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    argv = [
        "protoc",
        f"-I{PACKAGE}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PACKAGE}/robot_inference.proto",
    ]
    if protoc.main(argv) != 0:
        raise SystemExit("protoc failed; see the message above")
    (out_root / PACKAGE / "__init__.py").write_text(INIT_TEXT)
    return sorted((out_root / PACKAGE).iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
