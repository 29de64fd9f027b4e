"""Weight-sync bandwidth trainer -> rollout server, against a plain host memcpy of the same bytes.

  python bench/weight_sync.py --quick --out /tmp/weight_sync.json      # 4 layers, < 3 minutes
  python bench/weight_sync.py --out bench/results/weight_sync.json     # Qwen2-0.5B shapes

Writes a random Qwen2 checkpoint with Qwen2-0.5B's shapes (D 896, 14 q / 2 kv heads, MLP 4864,
vocab 151936, tied embeddings; 24 layers, or 4 with --quick) in --dtype (bfloat16 by default),
serves it with `python -m rollout_server` (real vLLM engine, gRPC on loopback), then times
`RolloutClient.update_weights` end to end, --reps times per transport after one warm-up each
(the transports take turns):
  shm     the client writes every array once into a /dev/shm file; one control message names it
  stream  the bytes travel in 4 MiB gRPC messages; the server spools them into /dev/shm
and, in the same run, `np.copyto` of every array into a preallocated (touched) flat buffer.
Bandwidth = update bytes / median wall seconds. The server's own split of each update comes back
in UpdateWeightsReply: receive_s (bytes in), validate_s (finite check), load_s (vLLM
`reload_weights`, which on CPU also repacks the linear weights); "client" is the rest, per
repetition (writing the shm file, or for stream what of the chunking does not overlap the
receive, plus the RPC). The split columns are medians of each part, so they need not add up.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)


def write_model(path: str, layers: int, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A random Qwen2 checkpoint (config, safetensors, tokenizer) with Qwen2-0.5B's shapes.

    Returns its tensors as numpy arrays (ml_dtypes bfloat16 for bf16) under their HF names,
    which is what a trainer hands to `update_weights`."""
    import ml_dtypes
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longrl_jax.data.tokenizer import build_qwen2_tokenizer

    tok = build_qwen2_tokenizer([f"w{i}" for i in range(60)], path)
    cfg = Qwen2Config(num_hidden_layers=layers, tie_word_embeddings=True, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), **QWEN2_05B)
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    with torch.device("meta"):  # names and shapes only; values are drawn below, fast
        shapes = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.dtype = dtype
    cfg.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(shapes.items()):
        t = torch.empty(shape, dtype=tdtype)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        state[name] = t
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if dtype == "bfloat16":
        return {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for k, v in state.items()}
    return {k: v.numpy() for k, v in state.items()}


def time_memcpy(arrays: dict[str, np.ndarray], reps: int) -> list[float]:
    total = sum(a.nbytes for a in arrays.values())
    dst = np.ones(total, np.uint8)  # touched: page faults are not part of the copy
    flat = [a.reshape(-1).view(np.uint8) for a in arrays.values()]
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        off = 0
        for src in flat:
            np.copyto(dst[off:off + src.size], src)
            off += src.size
        times.append(time.perf_counter() - t0)
    del dst
    return times[1:]  # the first is a warm-up


def time_updates(client, arrays, transports, reps: int, version: int) -> tuple[dict, int]:
    """The transports take turns within each repetition, so drift on the machine hits all alike."""
    rows = {t: [] for t in transports}
    for i in range(reps + 1):
        for transport in transports:
            version += 1
            t0 = time.perf_counter()
            reply = client.update_weights(arrays, version, transport=transport)
            wall = time.perf_counter() - t0
            assert reply.weight_version == version, (reply.weight_version, version)
            if i:  # the first round is a warm-up
                rows[transport].append({"wall_s": wall, "receive_s": reply.receive_s,
                                        "validate_s": reply.validate_s, "load_s": reply.load_s,
                                        "nbytes": int(reply.nbytes)})
    return rows, version


def summarize(name: str, walls: list[float], nbytes: int, memcpy_gbps: float | None,
              split: list[dict] | None = None) -> dict:
    med = statistics.median(walls)
    out = {"transport": name, "reps": len(walls), "median_s": med, "min_s": min(walls),
           "max_s": max(walls), "gb_per_s": nbytes / med / GB,
           "ratio_to_memcpy": (nbytes / med / GB) / memcpy_gbps if memcpy_gbps else 1.0}
    if split:
        for k in ("receive_s", "validate_s", "load_s"):
            out[k] = statistics.median(r[k] for r in split)
        # per repetition, then the median: the client's own work plus the RPC (for stream, the
        # client's chunking overlaps the server's receive and is mostly hidden in it)
        out["client_s"] = statistics.median(
            r["wall_s"] - r["receive_s"] - r["validate_s"] - r["load_s"] for r in split)
        out["raw"] = split
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, 3 reps (< 3 min)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--layers", type=int, default=None, help="default 24 (4 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="default 5 (3 with --quick)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--workdir", default=None,
                    help="where the checkpoint goes (default: a temp dir)")
    ap.add_argument("--log", default=None, help="the server's log (default: in the work dir)")
    args = ap.parse_args()
    layers = args.layers or (4 if args.quick else 24)
    reps = args.reps or (3 if args.quick else 5)

    from longrl_jax.rl.connection import RolloutServerProcess

    tmp = tempfile.TemporaryDirectory(prefix="weight_sync_", dir=args.workdir)
    path = os.path.join(tmp.name, "qwen2")
    t0 = time.perf_counter()
    arrays = write_model(path, layers, args.dtype)
    nbytes = sum(a.nbytes for a in arrays.values())
    n_params = sum(a.size for a in arrays.values())
    print(f"model: {layers} layers, {n_params / 1e6:.1f} M params, {args.dtype}, "
          f"{nbytes / GB:.3f} GB in {len(arrays)} tensors (written in "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)

    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    log = args.log or os.path.join(tmp.name, "rollout_server.log")
    results = {"date": datetime.date.today().isoformat(), "layers": layers, "dtype": args.dtype,
               "params": n_params, "nbytes": nbytes, "tensors": len(arrays), "reps": reps}
    t0 = time.perf_counter()
    with RolloutServerProcess(path, env=env, log_path=log,
                              args=["--max-model-len", "512", "--dtype", args.dtype]) as server:
        client = server.client
        print(f"server ready in {time.perf_counter() - t0:.0f} s", flush=True)
        memcpy = time_memcpy(arrays, reps)
        mc = summarize("memcpy", memcpy, nbytes, None)
        rows, version = [mc], client.info().weight_version
        splits, version = time_updates(client, arrays, ("shm", "stream"), reps, version)
        for transport, split in splits.items():
            rows.append(summarize(transport, [r["wall_s"] for r in split], nbytes,
                                  mc["gb_per_s"], split))
        # again after the updates: the host's memcpy speed can drift on this shared machine
        memcpy2 = time_memcpy(arrays, reps)
        rows.append(summarize("memcpy (after)", memcpy2, nbytes, mc["gb_per_s"]))
        [[s]] = client.generate([[5, 6, 7, 8]], max_tokens=4, temperature=0.0, ignore_eos=True)
        assert s.weight_version == version and len(s.token_ids) == 4
    results["rows"] = rows

    print(f"\n{nbytes / GB:.3f} GB per update, median of {reps}:")
    print(f"{'transport':<15} {'median s':>9} {'GB/s':>7} {'/ memcpy':>9} {'receive s':>10} "
          f"{'validate s':>11} {'load s':>7} {'client s':>9}")
    for r in rows:
        extra = "".join(f" {r[k]:>{w}.3f}" for k, w in (("receive_s", 10), ("validate_s", 11),
                                                        ("load_s", 7), ("client_s", 9))
                        if k in r)
        print(f"{r['transport']:<15} {r['median_s']:>9.3f} {r['gb_per_s']:>7.2f} "
              f"{r['ratio_to_memcpy']:>9.3f}{extra}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    tmp.cleanup()


if __name__ == "__main__":
    main()
