"""Several cooperating processes (`jax.distributed`): start-up, who does what, and the few
host-side exchanges a multi-controller run needs.

Every process runs the same program on its own devices; arrays sharded over the global mesh are
computed together, and host values that differ between processes (the samples each process's
rollout server returned, the video rows each process embedded) are exchanged here, so every
process holds the same global step afterwards and places its own shards of it.

With one process every function here is a no-op or an identity, so single-host code pays
nothing for it.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time

import jax
import numpy as np

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Start-up.

def cluster_environment() -> str:
    """The multi-process launcher `jax.distributed.initialize()` would detect by itself, or ""
    (a Slurm step of several tasks, a TPU pod slice of several hosts, JAX_COORDINATOR_ADDRESS)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_STEP_ID") is not None and int(env.get("SLURM_STEP_NUM_TASKS",
                                                              env.get("SLURM_NTASKS", "1"))) > 1:
        return "Slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU pod"
    return ""


def initialize(d) -> bool:
    """Joins the run's processes from `config.distributed` before anything touches a device;
    True when the run has several processes. `coordinator` "" means one process unless the
    environment names a cluster (`cluster_environment`), whose values jax reads itself.

    On CPU the cross-process collectives are gloo's (XLA:CPU has none of its own). A process
    that dies is noticed by the others within `heartbeat_timeout_s` (`PeerWatch`), not after
    the minutes a collective or jax's default heartbeat would wait."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    auto = cluster_environment()
    if not d.coordinator and not auto:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if d.coordinator:
        kw = dict(coordinator_address=d.coordinator, num_processes=d.num_processes,
                  process_id=d.process_id)
    if d.local_device_ids:
        kw["local_device_ids"] = [int(i) for i in str(d.local_device_ids).split(",")]
    # jax's own heartbeat is the backstop; `PeerWatch` names the lost peer first
    jax.distributed.initialize(initialization_timeout=int(d.init_timeout_s),
                               heartbeat_timeout_seconds=2 * int(d.heartbeat_timeout_s), **kw)
    log.info("jax.distributed: process %d of %d (%s), %d local devices of %d",
             jax.process_index(), jax.process_count(), d.coordinator or auto,
             jax.local_device_count(), jax.device_count())
    if jax.process_index():
        # if process 0 dies, jax itself stops this one at once, blaming "the leader task"
        print(f"longrl_jax: process {jax.process_index()} of {jax.process_count()}; the leader "
              f"task of the distributed service is process 0 ({d.coordinator or auto})",
              flush=True)
    return jax.process_count() > 1


# ------------------------------------------------------------------------------------------------
# Who does what.

def count() -> int:
    return jax.process_count()


def index() -> int:
    return jax.process_index()


def is_main() -> bool:
    """Process 0: the one that writes metrics, summaries, plots and exports."""
    return jax.process_index() == 0


def share(n: int, process: int | None = None, processes: int | None = None) -> slice:
    """Process `process`'s contiguous block of a global list of `n` items (sizes differ by at
    most one; the blocks in process order are the list)."""
    p = jax.process_index() if process is None else process
    k = jax.process_count() if processes is None else processes
    return slice(p * n // k, (p + 1) * n // k)


def barrier(name: str) -> None:
    """Every process reaches `name` before any goes on (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------
# Host exchanges.

def allgather_objects(obj) -> list:
    """[process 0's obj, process 1's, ...] on every process. Peers are the same job on the same
    code (pickle), so host structures (prompts with their video rows, samples and scores) cross
    whole; with one process, [obj]."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
    sizes = np.asarray(sizes).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(rows[i, :int(s)].tobytes()) for i, s in enumerate(sizes)]


def gather_blocks(mine: list) -> list:
    """The global list whose contiguous block (`share`) each process holds as `mine`."""
    return [x for block in allgather_objects(list(mine)) for x in block]


def to_host(tree):
    """Every jax array of `tree` as a whole numpy array on every process (a collective when an
    array spans processes: every process must call it at the same point)."""
    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


def host_model(model):
    """`model` with numpy parameters gathered whole (export, weight sync, a local vision copy);
    the model itself when every parameter is already on this process's devices."""
    from flax import nnx
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return model
    return nnx.merge(graphdef, to_host(state))


def local_copy(model):
    """(model, mesh): `model`'s parameters gathered whole and replicated on a mesh of this
    process's own devices (all on the frame axes), for work one process does alone (encoding its
    own videos). A collective: every process calls it at the same point."""
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from longrl_jax.parallel import mesh as mesh_lib
    mesh = mesh_lib.make_mesh((1, -1, 1, 1), devices=jax.local_devices())
    graphdef, state = nnx.split(host_model(model))
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda x: jax.device_put(x, replicated)
                         if isinstance(x, (np.ndarray, jax.Array)) else x, state)
    return nnx.merge(graphdef, state), mesh


# ------------------------------------------------------------------------------------------------
# Failure.

class PeerWatch:
    """Stops this process when a peer dies, with an error naming it, within `timeout_s`.

    Every process bumps its own key in the coordination service's key-value store every
    `interval_s`; a peer whose key has not moved for `timeout_s` (or a store that cannot be
    reached: process 0, which hosts it, is gone) is lost. A collective waiting on a dead
    peer would otherwise hang until gloo's own timeout, many minutes later. The process exits
    with status 1 after printing the reason (`os._exit`: a thread blocked in a collective
    cannot be interrupted)."""

    def __init__(self, *, interval_s: float = 1.0, timeout_s: float = 20.0, on_lost=None):
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_lost = on_lost or _exit_lost
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "PeerWatch":
        if jax.process_count() == 1:
            return self
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def settle(self) -> None:
        """After an error: give the watch the time to find a lost peer (and exit naming it),
        since a collective that fails because a peer died says only that a connection closed."""
        if self._thread is not None and not self._stop.is_set():
            self._thread.join(self.timeout_s + 5 * self.interval_s)
        self.stop()

    def _run(self) -> None:
        from jax._src import distributed
        client = distributed.global_state.client
        me, n = jax.process_index(), jax.process_count()
        seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
        beat = 0
        while not self._stop.wait(self.interval_s):
            beat += 1
            now = time.monotonic()
            try:
                client.key_value_set(f"longrl_jax/alive/{me}", str(beat), allow_overwrite=True)
                for p in seen:
                    try:
                        value = client.key_value_try_get(f"longrl_jax/alive/{p}")
                    except Exception:  # noqa: BLE001 -- not written yet
                        value = None
                    if value != seen[p][0]:
                        seen[p] = (value, now)
                    elif now - seen[p][1] > self.timeout_s:
                        if not self._stop.is_set():
                            self.on_lost(f"process {p} of {n} stopped responding "
                                         f"(no heartbeat for {now - seen[p][1]:.0f} s)")
                        return
            except Exception as e:  # noqa: BLE001 -- the coordination service is gone
                if not self._stop.is_set():
                    self.on_lost(f"lost the coordinator (process 0 of {n}): "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                return


def _exit_lost(why: str) -> None:
    msg = f"longrl_jax.main: process {jax.process_index()}: {why}; stopping"
    log.error(msg)
    print(msg, flush=True)
    os._exit(1)
