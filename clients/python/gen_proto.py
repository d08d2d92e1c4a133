"""Regenerates logd_client/_proto from ../../proto with grpcio-tools.

    python gen_proto.py          # rewrite the generated files
    python gen_proto.py --check  # exit 1 if the committed files differ

The generated modules are committed so that `pip install` needs no protoc;
the test suite runs the --check so they never drift from the proto.
"""
import filecmp
import os
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc
import grpc_tools

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
OUT = HERE / "logd_client" / "_proto"
FILES = ["logging/v1/logging.proto", "logging/v1/admin.proto"]


def generate(out: pathlib.Path) -> None:
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + FILES) != 0:
        raise SystemExit("protoc failed")
    for d in [out / "logging", out / "logging" / "v1"]:
        (d / "__init__.py").touch()
    # Generated code imports `logging.v1...`, which would shadow the standard
    # `logging` module: make the imports package-relative.
    for py in (out / "logging" / "v1").glob("*_pb2*.py"):
        text = py.read_text()
        text = text.replace("from logging.v1 import", "from . import")
        py.write_text(text)


def main() -> int:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            generate(pathlib.Path(tmp))
            for f in sorted(pathlib.Path(tmp).rglob("*.py")):
                rel = f.relative_to(tmp)
                if not (OUT / rel).exists() or not filecmp.cmp(f, OUT / rel, shallow=False):
                    print(f"generated {rel} differs from the committed one: run python gen_proto.py")
                    return 1
        print("generated stubs match the proto")
        return 0
    if (OUT / "logging").exists():
        shutil.rmtree(OUT / "logging")
    generate(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
