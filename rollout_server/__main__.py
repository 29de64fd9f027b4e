"""`python -m rollout_server --model_dir DIR [--host 127.0.0.1] [--port N] [--token-file F]
[--tls-cert CERT --tls-key KEY]`.

Starts the vLLM engine on the LLM part of DIR, warms it up, then serves the rollout protocol until
`Shutdown` or SIGTERM/SIGINT. Start-up errors (an empty or unreadable token, certificate or key
file included) print one line and exit with status 2; an engine that can no longer serve exits
with status 3, so that the trainer restarts it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rollout_server", description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", "--model-dir", required=True,
                   help="HF checkpoint: a LongVILA dir (its llm/ is served) or a Qwen2 dir")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address; anything but loopback requires --token-file")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--token-file", "--token_file", dest="token_file", default=None,
                   help="file holding the shared token every call must present")
    p.add_argument("--tls-cert", "--tls_cert", dest="tls_cert", default=None,
                   help="PEM certificate chain: serve TLS (clients need its CA)")
    p.add_argument("--tls-key", "--tls_key", dest="tls_key", default=None,
                   help="PEM private key of --tls-cert")
    p.add_argument("--max-embedding-bytes", "--max_embedding_bytes", dest="max_embedding_bytes",
                   type=int, default=8 << 30, help="LRU budget of the video-embedding store")
    p.add_argument("--shm-dir", "--shm_dir", dest="shm_dir", default="/dev/shm",
                   help="where same-host weight updates may be read from")
    p.add_argument("--parent-pid", "--parent_pid", dest="parent_pid", type=int, default=None,
                   help="stop when this process (the trainer that started us) is gone")
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="serving dtype; auto = the checkpoint's")
    g.add_argument("--max-model-len", "--max_model_len", dest="max_model_len", type=int,
                   default=4096)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gpu-memory-utilization", "--gpu_memory_utilization",
                   dest="gpu_memory_utilization", type=float, default=0.5)
    g.add_argument("--tensor-parallel-size", "--tensor_parallel_size",
                   dest="tensor_parallel_size", type=int, default=1)
    g.add_argument("--block-size", "--block_size", dest="block_size", type=int, default=None,
                   help="KV-cache block size (prefix-cache granularity); default: vLLM's")
    g.add_argument("--no-warmup", dest="warmup", action="store_false")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"rollout_server: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def read_secret(flag: str, path: str, binary: bool = False):
    """The contents of a token, certificate or key file; one clear line and exit 2 if it is
    missing, unreadable or empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        fail(f"{flag} {path}: {e.strerror or e}")
    if not data.strip():
        fail(f"{flag} {path} is empty")
    return data if binary else data.decode(errors="replace").strip()


def _watch_parent(pid: int, stop: threading.Event) -> None:
    """A trainer killed with SIGKILL cannot stop us: notice that we were re-parented."""
    while not stop.wait(1.0):
        if os.getppid() != pid:
            print(f"rollout_server: parent {pid} is gone; stopping", flush=True)
            stop.set()


def _watch_engine(engine, stop: threading.Event) -> None:
    """A dead engine core cannot recover: exit so the launcher restarts the server."""
    while not stop.wait(1.0):
        if engine.dead():
            print("rollout_server: error: the vLLM engine core died; exiting", flush=True)
            os._exit(3)


def main(argv=None) -> None:
    args = parse_args(argv)
    from rollout_server.service import is_loopback

    token = read_secret("--token-file", args.token_file) if args.token_file else None
    tls = None
    if bool(args.tls_cert) != bool(args.tls_key):
        fail("--tls-cert and --tls-key go together")
    if args.tls_cert:
        tls = (read_secret("--tls-cert", args.tls_cert, binary=True),
               read_secret("--tls-key", args.tls_key, binary=True))
        for flag, path, data in (("--tls-cert", args.tls_cert, tls[0]),
                                 ("--tls-key", args.tls_key, tls[1])):
            if b"-----BEGIN " not in data:
                fail(f"{flag} {path}: not a PEM file")
    if not is_loopback(args.host) and not token:
        fail(f"--host {args.host} is not a loopback address; refusing to serve without "
             f"--token-file")
    if not 0 <= args.port < 65536:
        fail(f"--port {args.port}: not a port number")

    from rollout_server.engine import Engine, EngineOptions, StartupError
    from rollout_server.leftovers import sweep
    from rollout_server.service import RolloutService, serve

    removed = sweep(args.shm_dir)   # what a SIGKILLed server left in shared memory
    if removed:
        print(f"rollout_server: removed {len(removed)} file(s) left in {args.shm_dir} by dead "
              f"servers: {', '.join(sorted(removed)[:5])}", flush=True)

    try:
        engine = Engine(EngineOptions(
            model_dir=args.model_dir, dtype=args.dtype, max_model_len=args.max_model_len,
            seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size, block_size=args.block_size,
            warmup=args.warmup))
    except StartupError as e:
        fail(str(e))
    service = RolloutService(engine, max_embedding_bytes=args.max_embedding_bytes,
                             shm_dir=args.shm_dir)
    try:
        server, port = serve(service, args.host, args.port, token, tls=tls)
    except (OSError, RuntimeError) as e:
        fail(f"cannot serve on {args.host}:{args.port}: {e}")
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, service.shutdown_event),
                         daemon=True).start()
    threading.Thread(target=_watch_engine, args=(engine, service.shutdown_event),
                     daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.shutdown_event.set())
    print(f"rollout_server: serving {engine.path} on {args.host}:{port} "
          f"({'TLS' if tls else 'plaintext'}, pid {os.getpid()}, dtype {engine.dtype}, "
          f"max_model_len {engine.max_model_len})", flush=True)
    service.shutdown_event.wait()
    threading.Timer(30.0, lambda: os._exit(4)).start()  # a wedged engine must not keep us alive
    server.stop(grace=2).wait()
    engine.close()
    if service.exit_code:
        print(f"rollout_server: error: {service.broken}; exiting", flush=True)
    else:
        print("rollout_server: stopped", flush=True)
    os._exit(service.exit_code)  # grpc and vLLM leave non-daemon threads; all is stopped


if __name__ == "__main__":
    main()
