"""Generated protocol modules, compiled from rollout.proto on first import.

The generated files are not committed: they are compiled with the installed grpcio-tools so the
gencode always matches the installed protobuf runtime. When the package directory is read-only the
modules are compiled into a per-user cache directory added to this package's search path.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

_HERE = pathlib.Path(__file__).resolve().parent
_PROTO = _HERE / "rollout.proto"


def _compile(out_root: pathlib.Path) -> None:
    import importlib.resources

    from grpc_tools import protoc

    out_pkg = out_root / "rollout_server" / "protos"
    out_pkg.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "rollout_server" / "protos"
        src.mkdir(parents=True)
        (src / "rollout.proto").write_bytes(_PROTO.read_bytes())
        include = str(importlib.resources.files("grpc_tools") / "_proto")
        staging = pathlib.Path(tmp) / "out"
        staging.mkdir()
        code = protoc.main(["protoc", f"-I{tmp}", f"-I{include}", f"--python_out={staging}",
                            f"--grpc_python_out={staging}", str(src / "rollout.proto")])
        if code != 0:
            raise RuntimeError(f"protoc failed ({code}) compiling {_PROTO}")
        for name in ("rollout_pb2.py", "rollout_pb2_grpc.py"):
            tmp_out = out_pkg / f".{name}.{os.getpid()}"
            tmp_out.write_bytes((staging / "rollout_server" / "protos" / name).read_bytes())
            os.replace(tmp_out, out_pkg / name)  # atomic: concurrent importers never see half a file


def _ensure_compiled() -> None:
    digest = hashlib.sha256(_PROTO.read_bytes()).hexdigest()[:16]
    stamp = _HERE / ".rollout_proto.sha"
    if os.access(_HERE, os.W_OK):
        if not (stamp.exists() and stamp.read_text() == digest
                and (_HERE / "rollout_pb2_grpc.py").exists()):
            _compile(_HERE.parent.parent)
            stamp.write_text(digest)
        return
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    root = cache / "longrl_jax" / "protos" / digest
    pkg = root / "rollout_server" / "protos"
    if not (pkg / "rollout_pb2_grpc.py").exists():
        _compile(root)
    __path__.append(str(pkg))  # noqa: F821  (a package's search path)


_ensure_compiled()
