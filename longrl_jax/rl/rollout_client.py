"""The trainer's side of the rollout protocol.

`RolloutClient(address)` talks to `python -m rollout_server`. Arrays travel as raw bytes with
explicit dtype and shape. A weight update is one `UpdateWeights` call: on the same host the
arrays are written once into a file in /dev/shm and only its table crosses gRPC; across hosts
they stream in chunks. The client keeps no state about the server (its weight version, the
embeddings it holds): `connection.RolloutConnection` is the run's one record of those, and the one
place that recovers from a failure. `ca_file` turns on TLS (the server's `--tls-cert`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import uuid
from typing import Iterable, Mapping, Sequence

import grpc
import numpy as np

from rollout_server.protos import rollout_pb2 as pb
from rollout_server.protos import rollout_pb2_grpc as pb_grpc

CHUNK_BYTES = 4 << 20
MAX_MESSAGE_BYTES = 256 << 20


class RolloutError(RuntimeError):
    """A rollout call failed; `code` is the gRPC status code, the message the server's reason."""

    def __init__(self, code: grpc.StatusCode | None, message: str):
        super().__init__(f"{code.name if code else 'ERROR'}: {message}")
        self.code = code


class StaleWeightsError(RolloutError):
    """Samples came from an older weight version than the trainer requires."""


@dataclasses.dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: int


@dataclasses.dataclass(frozen=True)
class EmbeddingRef:
    """A reference to rows [start, end) of a stored embedding (end None: to the last row)."""
    key: str
    start: int = 0
    end: int | None = None


def _dtype_name(a: np.ndarray) -> str:
    return a.dtype.name  # 'bfloat16' for ml_dtypes arrays


class RolloutClient:
    """A connection to one rollout server: one method per RPC, errors as `RolloutError`."""

    def __init__(self, address: str, token: str | None = None, *, ca_file: str | None = None,
                 timeout_s: float = 600.0):
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 64 << 20)]
        if ca_file:
            with open(ca_file, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            self._channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(address, options=opts)
        self._stub = pb_grpc.RolloutStub(self._channel)
        self._swept = False
        self.last_computed_prompt_tokens = -1

    # ---- plumbing -------------------------------------------------------------------------------

    def _call(self, method, request, timeout=None):
        try:
            return method(request, timeout=timeout or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise RolloutError(e.code(), e.details()) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- status ---------------------------------------------------------------------------------

    def health(self, timeout_s: float = 5.0) -> pb.HealthReply:
        return self._call(self._stub.Health, pb.HealthRequest(), timeout=timeout_s)

    def wait_until_ready(self, timeout_s: float = 300.0, *, process=None) -> None:
        """Polls Health until the server answers ready; `process` (a Popen) fails fast if it dies."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RolloutError(None, f"the server process exited with {process.returncode}")
            try:
                if self.health(timeout_s=2.0).ready:
                    return
                last = "not ready"
            except RolloutError as e:
                last = str(e)
            time.sleep(0.2)
        raise RolloutError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"{self.address} not ready after {timeout_s:.0f} s ({last})")

    def info(self) -> pb.InfoReply:
        return self._call(self._stub.Info, pb.InfoRequest())

    def shutdown(self) -> None:
        self._call(self._stub.Shutdown, pb.ShutdownRequest(), timeout=10)

    # ---- embeddings -----------------------------------------------------------------------------

    def put_embeddings(self, key: str, array: np.ndarray) -> bool:
        """Stores rows [N, hidden] under `key` (idempotent); True if the server did not have it."""
        array = np.ascontiguousarray(array)
        if array.ndim == 3:  # [frames, tokens, hidden] as encode_video returns
            array = array.reshape(-1, array.shape[-1])
        raw = memoryview(array.reshape(-1).view(np.uint8))

        def chunks():
            yield pb.EmbeddingChunk(key=key, dtype=_dtype_name(array), shape=list(array.shape),
                                    data=bytes(raw[:CHUNK_BYTES]))
            for i in range(CHUNK_BYTES, len(raw), CHUNK_BYTES):
                yield pb.EmbeddingChunk(data=bytes(raw[i:i + CHUNK_BYTES]))

        return self._call(self._stub.PutEmbeddings, chunks()).stored

    def has_embeddings(self, keys: Sequence[str]) -> list[bool]:
        return list(self._call(self._stub.HasEmbeddings, pb.HasEmbeddingsRequest(keys=list(keys))).present)

    # ---- generation -----------------------------------------------------------------------------

    def generate(self, prompts, n: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 seed: int | None = None, *, top_p: float = 1.0, top_k: int = -1,
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 min_weight_version: int = 0) -> list[list[Sample]]:
        """Samples `n` answers per prompt; returns, per prompt, a list of `Sample`.

        A prompt is a sequence of token ids, or a list of segments: token-id sequences and
        `EmbeddingRef`s (or bare keys) that the server splices in order. Samples from a weight
        version below `min_weight_version` are refused by the server: StaleWeightsError.
        """
        request = pb.GenerateRequest(
            prompts=[_prompt(p) for p in prompts], min_weight_version=min_weight_version,
            sampling=pb.SamplingOptions(n=n, max_tokens=max_tokens, temperature=temperature,
                                        top_p=top_p, top_k=top_k, seed=seed,
                                        stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos))
        try:
            reply = self._call(self._stub.Generate, request)
        except RolloutError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise StaleWeightsError(e.code, str(e)) from None
            raise
        if reply.weight_version < min_weight_version:
            raise StaleWeightsError(None, f"samples from weight version {reply.weight_version}, "
                                          f"need >= {min_weight_version}")
        self.last_computed_prompt_tokens = reply.computed_prompt_tokens
        return [[Sample(list(s.token_ids), list(s.logprobs), s.finish_reason, reply.weight_version)
                 for s in c.samples] for c in reply.completions]

    # ---- weights --------------------------------------------------------------------------------

    def update_weights(self, named_arrays: Mapping[str, np.ndarray], version: int, *,
                       transport: str = "auto") -> pb.UpdateWeightsReply:
        """Replaces every served parameter in one call (HF names, the server's dtype).

        transport: 'shm' (same host; one copy into /dev/shm), 'stream' (chunked gRPC), or 'auto'
        (shm when the address is loopback and /dev/shm exists).
        """
        if transport == "auto":
            host = self.address.rsplit(":", 1)[0].strip("[]")
            local = host in ("127.0.0.1", "localhost", "::1")
            transport = "shm" if local and os.path.isdir("/dev/shm") else "stream"
        table, total = [], 0
        arrays = []
        for name, a in named_arrays.items():
            a = np.ascontiguousarray(a)
            table.append(pb.TensorMeta(name=name, dtype=_dtype_name(a), shape=list(a.shape),
                                       offset=total, nbytes=a.nbytes))
            arrays.append(a)
            total += a.nbytes
        header = dict(version=version, tensors=table, total_bytes=total)
        if transport == "shm":
            if not self._swept:
                sweep_stale_weight_files()
                self._swept = True
            path = os.path.join("/dev/shm", f"{WEIGHT_FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
            try:
                with open(path, "wb") as f:
                    for a in arrays:
                        f.write(memoryview(a.reshape(-1).view(np.uint8)))
                reply = self._call(self._stub.UpdateWeights,
                                   iter([pb.WeightChunk(shm_path=path, **header)]))
            finally:
                if os.path.exists(path):
                    os.remove(path)
        elif transport == "stream":
            reply = self._call(self._stub.UpdateWeights, _weight_chunks(header, arrays))
        else:
            raise ValueError(f"transport {transport!r}: use 'auto', 'shm' or 'stream'")
        return reply


WEIGHT_FILE_PREFIX = "longrl-weights-"
_WEIGHT_FILE = re.compile(re.escape(WEIGHT_FILE_PREFIX) + r"(\d+)-[0-9a-f]{32}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_weight_files(shm_dir: str = "/dev/shm") -> list[str]:
    """Removes weight files whose writer is gone: a trainer SIGKILLed during `update_weights`
    never runs its `finally`, and /dev/shm is memory. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = _WEIGHT_FILE.fullmatch(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.remove(os.path.join(shm_dir, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _weight_chunks(header: dict, arrays: Iterable[np.ndarray]):
    yield pb.WeightChunk(**header)
    pending = bytearray()
    for a in arrays:
        raw = memoryview(a.reshape(-1).view(np.uint8))
        for i in range(0, len(raw), CHUNK_BYTES):
            piece = raw[i:i + CHUNK_BYTES]
            if not pending and len(piece) == CHUNK_BYTES:
                yield pb.WeightChunk(data=bytes(piece))
                continue
            pending += piece
            if len(pending) >= CHUNK_BYTES:
                yield pb.WeightChunk(data=bytes(pending[:CHUNK_BYTES]))
                del pending[:CHUNK_BYTES]
    if pending:
        yield pb.WeightChunk(data=bytes(pending))


def _prompt(p) -> pb.Prompt:
    if isinstance(p, np.ndarray) or (isinstance(p, Sequence) and p and
                                      all(isinstance(t, (int, np.integer)) for t in p)):
        return pb.Prompt(segments=[pb.Segment(tokens=pb.TokenIds(ids=[int(t) for t in p]))])
    segs = []
    for s in p:
        if isinstance(s, str):
            s = EmbeddingRef(s)
        if isinstance(s, EmbeddingRef):
            segs.append(pb.Segment(embedding=pb.EmbeddingRef(
                key=s.key, start_row=s.start, end_row=s.end or 0)))
        else:
            segs.append(pb.Segment(tokens=pb.TokenIds(ids=[int(t) for t in np.asarray(s).reshape(-1)])))
    return pb.Prompt(segments=segs)


def spliced_prompt(layout, key: str) -> list:
    """The segments of a `models.splice.SpliceLayout` with its video rows taken from `key`."""
    out = []
    for kind, value in layout.segments():
        out.append(EmbeddingRef(key, *value) if kind == "video" else np.asarray(value))
    return out
