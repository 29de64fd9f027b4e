"""The rollout connection of one process in a run of several (`jax.distributed`).

Which server a process talks to (`config.rollout`):
  - `server_per` "host" (default): the first process of each host starts one server, the
    host's other processes use it;
  - `server_per` "process": every process starts its own (the local tests, so that two servers
    are exercised on one machine);
  - `addresses` "h:p,h:p,...": running servers, one per process or one per host, in order.

Each process sends its own prompts to its server (`rollouts.sample_and_score` splits the step).
Every server receives every weight version: the parameters, sharded over all processes, are
gathered whole on every process (a collective), and each server's owner sends them. After each
sync every process reads its server's version back and all are compared: a server left behind
stops the run (a sample is accepted only from the version the step requires, whichever server
made it). With one process this is `RolloutConnection` with nothing added.
"""

from __future__ import annotations

import copy
import logging
import os
import socket

from longrl_jax import hosts
from longrl_jax.rl.connection import RemoteRolloutServer, RolloutConnection

log = logging.getLogger(__name__)

SERVER_PER = ("host", "process")


def connect(config, workdir: str, tokenizer_dir: str):
    """The connection this process uses (not started: `start(model)`)."""
    if hosts.count() == 1:
        return RolloutConnection(config, workdir, tokenizer_dir)
    return ProcessConnection(config, workdir, tokenizer_dir)


def server_plan(rollout, host_names: list[str]) -> tuple[list[int], list[str]]:
    """(owner process of each process's server, address of each process's server: "" where the
    owner starts it) for processes on `host_names` (one per process, in process order)."""
    n = len(host_names)
    hosts_in_order = list(dict.fromkeys(host_names))
    first = {h: host_names.index(h) for h in hosts_in_order}
    addresses = [a.strip() for a in rollout.addresses.split(",") if a.strip()]
    if addresses and len(addresses) not in (n, len(hosts_in_order)):
        raise ValueError(f"config.rollout.addresses: {len(addresses)} addresses for {n} "
                         f"processes on {len(hosts_in_order)} hosts (give one per process or "
                         f"one per host)")
    per_process = rollout.server_per == "process" or len(addresses) == n
    owners = list(range(n)) if per_process else [first[h] for h in host_names]
    if not addresses:
        return owners, [""] * n
    if per_process:
        return owners, addresses
    return owners, [addresses[hosts_in_order.index(h)] for h in host_names]


class ProcessConnection:
    """`RolloutConnection`'s interface for one process of several (see the module doc)."""

    def __init__(self, config, workdir: str, tokenizer_dir: str):
        self.config = config
        self.workdir = workdir
        self.tokenizer_dir = tokenizer_dir
        self.me = hosts.index()
        self.owners, self.addresses = server_plan(
            config.rollout, hosts.allgather_objects(socket.gethostname()))
        self.owner = self.owners[self.me] == self.me
        self.inner: RolloutConnection | None = None
        self.prompts_sent = 0

    # ---- the interface the trainers use ---------------------------------------------------------

    @property
    def client(self):
        return self.inner.client

    @property
    def version(self) -> int:
        return self.inner.version

    def counters(self) -> dict[str, float]:
        return self.inner.counters()

    def start(self, model) -> None:
        """Owners start (or connect to) their server from the gathered weights; then the others
        connect to their owner's."""
        host = hosts.host_model(model)            # every process: a collective
        rollout = copy.deepcopy(self.config.rollout)
        with rollout.unlocked():
            rollout.address = self.addresses[self.me]
        config = copy.deepcopy(self.config)
        with config.unlocked():
            config.rollout = rollout
        # each process's server files (its HF copy, its log) under rollout/p<I>
        self.inner = RolloutConnection(config, os.path.join(self.workdir, "rollout",
                                                            f"p{self.me}"), self.tokenizer_dir)
        if self.owner:
            self.inner.start(host)
        started = hosts.allgather_objects(self.inner.server.address if self.owner else "")
        if not self.owner:
            address = started[self.owners[self.me]]
            self.inner.server = RemoteRolloutServer(address, token=rollout.token or None,
                                                    ca_file=rollout.get("ca_file") or None).start()
        self._agree("start")

    def sync(self, model) -> float:
        """The policy's weights as the next version on every server; the bytes this process
        sent (0 where another process owns the server)."""
        host = hosts.host_model(model)
        nbytes = self.inner.sync(host) if self.owner else 0.0
        self._agree("sync")
        return nbytes

    def put_videos(self, prompts) -> None:
        self.inner.put_videos(prompts)

    def generate(self, prompts, **kw):
        self.prompts_sent += len(prompts)
        return self.inner.generate(prompts, **kw)

    def stop(self) -> None:
        hosts.barrier("rollout: stop")            # no server goes while a peer still uses it
        if self.inner is not None:
            if self.owner:
                self.inner.stop()
            elif self.inner.server is not None:
                self.inner.server.stop()
            self.inner = None

    # ---- every server at one version ------------------------------------------------------------

    def _agree(self, when: str) -> None:
        """Every process reads its server's weight version; all must be equal."""
        hosts.barrier(f"rollout: {when}")         # the owners' updates are done
        version = self.inner.client.info().weight_version
        if not self.owner:                        # the owner pushed it; samples must come from it
            self.inner.follow(version)
        seen = hosts.allgather_objects((self.inner.server.address, version, self.prompts_sent))
        log.info("rollout servers after %s: %s", when,
                 [{"process": p, "address": a, "weight_version": v, "prompts": k}
                  for p, (a, v, k) in enumerate(seen)])
        if len({v for _, v, _ in seen}) > 1:
            raise RuntimeError(f"rollout servers disagree on the weight version after {when}: "
                               + ", ".join(f"process {p} ({a}): {v}"
                                           for p, (a, v, _) in enumerate(seen)))
