"""The gRPC service: request validation, the embedding store and weight updates.

Every request is checked before it reaches the engine, and every failure becomes a gRPC status
with a message that names the field: INVALID_ARGUMENT for malformed requests, NOT_FOUND for an
unknown embedding key, FAILED_PRECONDITION for a stale weight version, RESOURCE_EXHAUSTED for
something over a size bound, UNAUTHENTICATED for a missing or wrong token. Nothing a client sends
can stop the server; only `Shutdown` (or a signal) does, or an engine that can no longer serve (a
weight load that failed after validation): then the server exits with status 3, so that whoever
started it restarts it, rather than answering UNAVAILABLE for ever.

`LONGRL_ROLLOUT_FAULTS` names a file of fault drills (tests/test_rollout_recovery.py), one
`<fault> <version>` line each: `kill_in_update` SIGKILLs the server when the update to that
version arrives, `fail_load` makes that update's load fail after validation. Each line fires
once (it is removed from the file), so a restarted server is not killed again.
"""

from __future__ import annotations

import concurrent.futures as cf
import hmac
import ipaddress
import math
import os
import pathlib
import signal
import stat
import tempfile
import threading
import time

import grpc
import numpy as np
import torch

from rollout_server.embeddings import EmbeddingStore
from rollout_server.engine import Engine
from rollout_server.leftovers import UPDATE_FILE_PREFIX
from rollout_server.protos import rollout_pb2 as pb
from rollout_server.protos import rollout_pb2_grpc as pb_grpc
from rollout_server.tensors import DTYPES, TensorError, all_finite, from_bytes, nbytes

PROTOCOL_VERSION = "1"
MAX_MESSAGE_BYTES = 64 << 20
MAX_PROMPTS = 4096
MAX_N = 256
MAX_KEY_CHARS = 256
MAX_SEQUENCES = 1 << 16          # prompts x n of one Generate
MAX_SEED = (1 << 63) - 1
MAX_TEMPERATURE = 2.0            # vLLM's own bound
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_FILE_PREFIX = "longrl-weights-"   # the client's (longrl_jax/rl/rollout_client.py)


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _bad(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _too_big(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def _short(text: str, n: int = 64) -> str:
    """A client's string as it appears in an error message: repr'd and bounded (status details
    travel in a header, which has a size limit)."""
    return repr(text) if len(text) <= n else repr(text[:n]) + f"... ({len(text)} characters)"


def _handle(fn):
    """Turns RequestError (and any unexpected error) into a gRPC status; the server lives on."""
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except RequestError as e:
            context.abort(e.code, str(e))
        except TensorError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except MemoryError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e) or "out of memory")
        except grpc.RpcError:
            raise  # an abort already carrying its status
        except Exception as e:  # a bug or an engine failure: report it, keep serving
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
    wrapper.__name__ = fn.__name__
    return wrapper


class RolloutService(pb_grpc.RolloutServicer):
    def __init__(self, engine: Engine, *, max_embedding_bytes: int, shm_dir: str = "/dev/shm"):
        self.engine = engine
        self.store = EmbeddingStore(max_embedding_bytes)
        self.shm_dir = pathlib.Path(shm_dir if os.path.isdir(shm_dir) else tempfile.gettempdir())
        self.shutdown_event = threading.Event()
        self.broken: str | None = None       # set when a validated update failed inside vLLM
        self.exit_code = 0                   # non-zero: the server stops because it is broken
        self._update_lock = threading.Lock()

    # ---- status ---------------------------------------------------------------------------------

    @_handle
    def Health(self, request, context):
        return pb.HealthReply(ready=self.broken is None, weight_version=self.engine.version)

    @_handle
    def Info(self, request, context):
        import vllm

        e = self.engine
        return pb.InfoReply(
            architecture=e.architecture,
            params=[pb.TensorSpec(name=n, dtype=d, shape=s) for n, d, s in e.param_specs()],
            weight_version=e.version,
            versions={"vllm": vllm.__version__, "torch": torch.__version__,
                      "protocol": PROTOCOL_VERSION},
            dtype=e.dtype, hidden_size=e.hidden_size, vocab_size=e.vocab_size,
            max_model_len=e.max_model_len, max_embedding_bytes=self.store.max_bytes,
            block_size=e.block_size,
            stats=pb.Stats(embedding_entries=len(self.store), embedding_bytes=self.store.nbytes,
                           **e.stats))

    @_handle
    def Shutdown(self, request, context):
        self.shutdown_event.set()
        return pb.ShutdownReply()

    # ---- embeddings -----------------------------------------------------------------------------

    @_handle
    def PutEmbeddings(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None:
            raise _bad("PutEmbeddings: empty stream")
        key = first.key
        if not key or len(key) > MAX_KEY_CHARS:
            raise _bad(f"PutEmbeddings: key {_short(key)} must be 1..{MAX_KEY_CHARS} characters")
        name = f"PutEmbeddings {_short(key)}"
        if first.dtype not in FLOAT_DTYPES:
            raise _bad(f"{name}: dtype {_short(first.dtype)} is not one of {FLOAT_DTYPES}")
        shape = list(first.shape)
        if len(shape) != 2 or shape[0] < 1 or shape[1] != self.engine.hidden_size:
            raise _bad(f"{name}: shape {shape[:4]} is not [rows >= 1, "
                       f"{self.engine.hidden_size}] (the model's hidden size)")
        want = nbytes(first.dtype, shape)
        if want > self.store.max_bytes:
            raise _too_big(f"{name}: shape {shape} is {want} bytes, over the embedding store's "
                           f"budget of {self.store.max_bytes} bytes")
        buf = bytearray()
        for chunk in _chain(first, request_iterator):
            if chunk.key and chunk.key != key:
                raise _bad(f"PutEmbeddings: key changed mid-stream ({_short(key)} -> "
                           f"{_short(chunk.key)})")
            buf += chunk.data
            if len(buf) > want:
                raise _bad(f"{name}: data holds more than the {want} bytes its shape needs")
        if len(buf) != want:
            raise _bad(f"{name}: data holds {len(buf)} bytes; shape {shape} in {first.dtype} "
                       f"needs {want}")
        value = from_bytes(buf, first.dtype, shape).to(DTYPES[self.engine.dtype])
        if not all_finite(value):
            raise _bad(f"{name}: data contains NaN or Inf")
        stored = self.store.put(key, value)
        return pb.PutEmbeddingsReply(key=key, stored=stored, nbytes=want)

    @_handle
    def HasEmbeddings(self, request, context):
        return pb.HasEmbeddingsReply(present=[k in self.store for k in request.keys])

    # ---- generation -----------------------------------------------------------------------------

    @_handle
    def Generate(self, request, context):
        if self.broken:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"engine unusable: {self.broken}")
        e = self.engine
        if request.min_weight_version > e.version:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"serving weight version {e.version}, the request needs "
                               f">= {request.min_weight_version}")
        if not request.prompts:
            raise _bad("Generate: no prompts")
        if len(request.prompts) > MAX_PROMPTS:
            raise _too_big(f"Generate: {len(request.prompts)} prompts; at most {MAX_PROMPTS}")
        params = self._sampling(request.sampling, len(request.prompts))
        prompts = [self._prompt(i, p, params.max_tokens) for i, p in enumerate(request.prompts)]
        try:
            outs, version, computed = e.submit_generate(prompts, _per_prompt_seeds(
                params, len(prompts))).result()
        except ValueError as err:  # vLLM's own checks
            raise _bad(f"Generate: {err}") from None
        reply = pb.GenerateReply(weight_version=version, computed_prompt_tokens=computed)
        for out in outs:
            comp = reply.completions.add(prompt_tokens=_prompt_len(out))
            for o in sorted(out.outputs, key=lambda o: o.index):
                lps = [float(lp[t].logprob) for t, lp in zip(o.token_ids, o.logprobs or [])]
                comp.samples.add(token_ids=list(o.token_ids), logprobs=lps,
                                 finish_reason=str(o.finish_reason or ""))
        return reply

    def _sampling(self, s, prompts: int):
        from vllm import SamplingParams

        e = self.engine
        n = s.n or 1
        if n < 1:
            raise _bad(f"sampling.n = {s.n}: must be in [1, {MAX_N}]")
        if n > MAX_N:
            raise _too_big(f"sampling.n = {s.n}: at most {MAX_N}")
        if n * prompts > MAX_SEQUENCES:
            raise _too_big(f"sampling.n = {n} x {prompts} prompts: at most {MAX_SEQUENCES} "
                           f"sequences per request")
        if s.HasField("seed") and not (
                0 <= s.seed and s.seed + (prompts - 1) * SEED_STRIDE <= MAX_SEED):
            raise _bad(f"sampling.seed = {s.seed}: must be in [0, 2^63 - 1 - (prompts - 1) x "
                       f"{SEED_STRIDE}] (prompt i samples with seed + i x {SEED_STRIDE})")
        if not 1 <= s.max_tokens < e.max_model_len:
            raise _bad(f"sampling.max_tokens = {s.max_tokens}: must be in [1, {e.max_model_len})")
        if not (math.isfinite(s.temperature) and 0 <= s.temperature <= MAX_TEMPERATURE):
            raise _bad(f"sampling.temperature = {s.temperature}: must be in [0, "
                       f"{MAX_TEMPERATURE}]")
        top_p = s.top_p or 1.0
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise _bad(f"sampling.top_p = {s.top_p}: must be in (0, 1]")
        if s.top_k < -1 or s.top_k > e.vocab_size:
            raise _bad(f"sampling.top_k = {s.top_k}: must be -1 or 0 (off) or in [1, vocab]")
        if len(s.stop_token_ids) > 1024:
            raise _too_big(f"sampling.stop_token_ids: {len(s.stop_token_ids)} ids; at most 1024")
        bad = [t for t in s.stop_token_ids if not 0 <= t < e.vocab_size]
        if bad:
            raise _bad(f"sampling.stop_token_ids {bad[:5]}: outside the vocabulary [0, {e.vocab_size})")
        try:
            return SamplingParams(n=n, max_tokens=s.max_tokens, temperature=s.temperature,
                                  top_p=top_p, top_k=max(s.top_k, 0),
                                  seed=s.seed if s.HasField("seed") else None,
                                  stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                                  logprobs=0, detokenize=False)
        except Exception as err:  # vLLM's own rules, e.g. n > 1 with greedy sampling
            raise _bad(f"sampling: {err}") from None

    def _prompt(self, i: int, prompt, max_tokens: int) -> dict:
        e = self.engine
        if not prompt.segments:
            raise _bad(f"prompt {i}: empty")
        parts: list[tuple[str, object]] = []
        length = 0
        for j, seg in enumerate(prompt.segments):
            kind = seg.WhichOneof("kind")
            if kind == "tokens":
                ids = np.asarray(seg.tokens.ids, dtype=np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= e.vocab_size):
                    raise _bad(f"prompt {i} segment {j}: token ids outside [0, {e.vocab_size})")
                parts.append(("ids", ids))
                length += ids.size
            elif kind == "embedding":
                ref = seg.embedding
                table = self.store.get(ref.key)
                if table is None:
                    raise RequestError(grpc.StatusCode.NOT_FOUND,
                                       f"prompt {i} segment {j}: unknown embedding key "
                                       f"{_short(ref.key)} (send it with PutEmbeddings first)")
                end = ref.end_row or table.shape[0]
                if not 0 <= ref.start_row < end <= table.shape[0]:
                    raise _bad(f"prompt {i} segment {j}: embedding rows [{ref.start_row}, {end}) "
                               f"(start_row, end_row) outside the {table.shape[0]} rows of "
                               f"{_short(ref.key)}")
                parts.append(("rows", table[ref.start_row:end]))
                length += end - ref.start_row
            else:
                raise _bad(f"prompt {i} segment {j}: neither tokens nor embedding")
        if length == 0:
            raise _bad(f"prompt {i}: empty")
        if length + max_tokens > e.max_model_len:
            raise _bad(f"prompt {i}: {length} prompt tokens + max_tokens {max_tokens} exceed "
                       f"the server's max_model_len {e.max_model_len}")
        if all(k == "ids" for k, _ in parts):
            return {"prompt_token_ids": np.concatenate([p for _, p in parts]).tolist()}
        rows = [e.embed_ids(p) if k == "ids" else p for k, p in parts]
        return {"prompt_embeds": torch.cat(rows, dim=0)}

    # ---- weights --------------------------------------------------------------------------------

    @_handle
    def UpdateWeights(self, request_iterator, context):
        if not self._update_lock.acquire(blocking=False):
            raise RequestError(grpc.StatusCode.ABORTED, "another weight update is in progress")
        tmp = None
        try:
            t0 = time.perf_counter()
            first = next(request_iterator, None)
            if first is None:
                raise _bad("UpdateWeights: empty stream")
            table, total = self._check_table(first)
            if first.shm_path:
                path = self._check_shm(first.shm_path, total)
            else:
                tmp = tempfile.NamedTemporaryFile(dir=self.shm_dir, delete=False,
                                                  prefix=f"{UPDATE_FILE_PREFIX}{os.getpid()}-")
                got = 0
                with tmp:
                    for chunk in _chain(first, request_iterator):
                        got += len(chunk.data)
                        if got > total:
                            raise _bad(f"UpdateWeights: more than the declared {total} bytes")
                        tmp.write(chunk.data)
                if got != total:
                    raise _bad(f"UpdateWeights: received {got} bytes, declared {total}")
                path = tmp.name
            t1 = time.perf_counter()
            self._check_finite(path, table)
            t2 = time.perf_counter()
            if fault_drill("kill_in_update", first.version):
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                if fault_drill("fail_load", first.version):
                    raise RuntimeError("injected load failure (LONGRL_ROLLOUT_FAULTS)")
                load_s = self.engine.submit_update(path, table, first.version).result()
            except Exception as err:
                self.broken = f"weight load failed after validation: {err}"
                self.exit_code = 3                # the engine may hold half-loaded weights
                self.shutdown_event.set()
                raise RequestError(grpc.StatusCode.INTERNAL,
                                   f"{self.broken}; the server exits to be restarted") from None
            return pb.UpdateWeightsReply(weight_version=self.engine.version, nbytes=total,
                                         receive_s=t1 - t0, validate_s=t2 - t1, load_s=load_s)
        except RequestError:
            self.engine.stats["rejected_updates"] += 1
            raise
        finally:
            self._update_lock.release()
            if tmp is not None:
                pathlib.Path(tmp.name).unlink(missing_ok=True)

    def _check_table(self, first) -> tuple[list, int]:
        e = self.engine
        if first.version <= e.version:
            raise _bad(f"UpdateWeights: version {first.version} is not above the serving "
                       f"version {e.version}")
        if first.total_bytes <= 0:
            raise _bad(f"UpdateWeights: total_bytes {first.total_bytes} must be positive")
        seen, table = set(), []
        for t in first.tensors:
            name = _short(t.name, 128)
            if t.name in seen:
                raise _bad(f"UpdateWeights: tensor name {name} appears twice")
            seen.add(t.name)
            if t.name not in e.shapes:
                raise _bad(f"UpdateWeights: tensor name {name}: unknown parameter")
            if t.dtype != e.dtype:
                raise _bad(f"UpdateWeights: {name} has dtype {_short(t.dtype)}; the server "
                           f"serves {e.dtype}")
            if tuple(t.shape) != e.shapes[t.name]:
                raise _bad(f"UpdateWeights: {name} has shape {list(t.shape)[:8]}; expected "
                           f"{list(e.shapes[t.name])}")
            if t.nbytes != nbytes(t.dtype, t.shape):
                raise _bad(f"UpdateWeights: {name}: nbytes {t.nbytes} does not match its shape")
            if t.offset < 0 or t.offset + t.nbytes > first.total_bytes:
                raise _bad(f"UpdateWeights: {name}: offset {t.offset} + nbytes {t.nbytes} "
                           f"outside the total_bytes {first.total_bytes} sent")
            table.append([t.name, t.dtype, list(t.shape), int(t.offset), int(t.nbytes)])
        spans = sorted((row[3], row[3] + row[4], row[0]) for row in table)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise _bad(f"UpdateWeights: the bytes of {b} (offset {start}) overlap those of "
                           f"{a} (ending at {end})")
        missing = sorted(set(e.shapes) - seen)
        if missing:
            raise _bad(f"UpdateWeights: {len(missing)} parameter(s) missing, e.g. {missing[:3]}; "
                       f"an update carries every parameter")
        return table, int(first.total_bytes)

    def _check_shm(self, shm_path: str, total: int) -> str:
        """Only a client's weight file (its name says so) directly in the shared-memory folder:
        never another process's segment, nor a path that leads elsewhere."""
        shown = _short(shm_path, 128)
        if "\0" in shm_path:
            raise _bad(f"UpdateWeights: shm_path {shown} contains a NUL character")
        path = pathlib.Path(shm_path)
        if (path.parent.resolve() != self.shm_dir.resolve()
                or not path.name.startswith(WEIGHT_FILE_PREFIX)):
            raise _bad(f"UpdateWeights: shm_path {shown} must name a {WEIGHT_FILE_PREFIX}* file "
                       f"directly in {self.shm_dir}")
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as err:
            raise _bad(f"UpdateWeights: shm_path {shown}: {err.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise _bad(f"UpdateWeights: shm_path {shown} is not a regular file")
        if st.st_size != total:
            raise _bad(f"UpdateWeights: shm_path {shown} has {st.st_size} bytes; total_bytes "
                       f"declares {total}")
        return str(path)

    def _check_finite(self, path: str, table: list) -> None:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        for name, dtype, _shape, offset, size in table:
            t = torch.from_numpy(np.asarray(raw[offset:offset + size])).view(DTYPES[dtype])
            if not all_finite(t):
                raise _bad(f"UpdateWeights: {name} contains NaN or Inf")


def fault_drill(fault: str, version: int) -> bool:
    """True once for each `<fault> <version>` line of the LONGRL_ROLLOUT_FAULTS file."""
    path = os.environ.get("LONGRL_ROLLOUT_FAULTS")
    if not path:
        return False
    try:
        lines = pathlib.Path(path).read_text().splitlines()
    except OSError:
        return False
    want = f"{fault} {version}"
    if want not in (line.strip() for line in lines):
        return False
    rest = [line for line in lines if line.strip() != want]
    tmp = f"{path}.{os.getpid()}"
    pathlib.Path(tmp).write_text("".join(line + "\n" for line in rest))
    os.replace(tmp, path)
    print(f"rollout_server: fault drill: {want}", flush=True)
    return True


SEED_STRIDE = 1_000_003


def _per_prompt_seeds(params, n: int) -> list:
    """Prompt i samples with seed + i * SEED_STRIDE. vLLM seeds sample k of a request from
    (seed, k), so one seed for every prompt would give sample k of each prompt the same random
    stream: correlated samples across a GRPO batch."""
    if params.seed is None or n == 1:
        return [params] * n
    out = []
    for i in range(n):
        p = params.clone()
        p.seed = params.seed + i * SEED_STRIDE
        out.append(p)
    return out


def _chain(first, rest):
    yield first
    yield from rest


def _prompt_len(out) -> int:
    if out.prompt_token_ids is not None:
        return len(out.prompt_token_ids)
    embeds = getattr(out, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


# ------------------------------------------------------------------------------------------------
# Authentication and serving
# ------------------------------------------------------------------------------------------------

class TokenCheck(grpc.ServerInterceptor):
    """Every call must carry `authorization: Bearer <token>` when the server has a token."""

    def __init__(self, token: str):
        self._want = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._want):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(service: RolloutService, host: str, port: int, token: str | None,
          workers: int = 16, tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.Server, int]:
    """Starts serving; `tls` (certificate chain, private key; PEM) turns on TLS."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         interceptors=[TokenCheck(token)] if token else [], options=options)
    pb_grpc.add_RolloutServicer_to_server(service, server)
    if tls:
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    return server, bound
