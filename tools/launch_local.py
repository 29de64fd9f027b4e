"""Runs a job as N cooperating processes on this machine (`jax.distributed`, coordinator on
127.0.0.1 at a free port), for tests and for trying a several-host run on one host.

  python tools/launch_local.py --num_processes 2 --devices_per_process 4 -- \
      --config=configs/demo.py:quick --workdir=runs/demo2

Everything after `--` goes to `python -m longrl_jax.main`, with
`--config.distributed.coordinator=127.0.0.1:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I` added for process I. Each process's output lines are
prefixed `[pI]`. `--devices_per_process K` gives each process K fake CPU devices (XLA_FLAGS).
The exit status is the first non-zero status of a process, else 0. A process that fails makes
the others stop by themselves (they watch their peers); any still running `--grace_s` later is
killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(num_processes: int, main_args: list[str], port: int) -> list[list[str]]:
    """The command line of each process."""
    return [[sys.executable, "-m", "longrl_jax.main", *main_args,
             f"--config.distributed.coordinator=127.0.0.1:{port}",
             f"--config.distributed.num_processes={num_processes}",
             f"--config.distributed.process_id={i}"] for i in range(num_processes)]


def environment(devices_per_process: int) -> dict:
    env = dict(os.environ)
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(
            flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
        sys.stdout.flush()


def launch(num_processes: int, main_args: list[str], *, devices_per_process: int = 0,
           grace_s: float = 120.0) -> int:
    port = free_port()
    env = environment(devices_per_process)
    procs, pumps = [], []
    for i, cmd in enumerate(commands(num_processes, main_args, port)):
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]"), daemon=True)
        t.start()
        pumps.append(t)

    def forward(sig, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)

    first_failure, failed_at = 0, None
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.poll() not in (None, 0) and not first_failure:
                first_failure, failed_at = p.returncode, time.monotonic()
                print(f"[launch_local] process {i} exited with status {p.returncode}",
                      flush=True)
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    print(f"[launch_local] killing process {i}: still running {grace_s:.0f} s "
                          f"after a peer failed", flush=True)
                    p.kill()
        time.sleep(0.2)
    for t in pumps:
        t.join(timeout=5)
    codes = [p.returncode for p in procs]
    return first_failure or next((c for c in codes if c), 0)


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        print("usage: launch_local.py --num_processes N [--devices_per_process K] -- "
              "<longrl_jax.main arguments>", file=sys.stderr)
        return 2
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=0,
                        help="fake CPU devices per process (0: leave XLA_FLAGS as it is)")
    parser.add_argument("--grace_s", type=float, default=120.0)
    args = parser.parse_args(argv[:cut])
    if args.num_processes < 1:
        parser.error("--num_processes must be at least 1")
    return launch(args.num_processes, argv[cut + 1:],
                  devices_per_process=args.devices_per_process, grace_s=args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
