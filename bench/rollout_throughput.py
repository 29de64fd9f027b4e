"""Generation throughput of the rollout server (gRPC) vs the same vLLM engine called in-process.

  python bench/rollout_throughput.py --quick --out /tmp/rollout_throughput.json   # < 4 minutes
  python bench/rollout_throughput.py --out bench/results/rollout_throughput.json  # 3 rounds

A small random Qwen2 (D 256, 4 layers, 4 q / 2 kv heads of 64, MLP 1024, vocab 4096, --dtype)
is served two ways, never at the same time:
  server      `python -m rollout_server` behind gRPC, called with `RolloutClient.generate`
  in-process  `vllm.LLM` with the options the server's engine uses (rollout_server/engine.py
              `_start_vllm`: dtype, seed, max_model_len, enforce_eager, prompt embeds, prefix
              caching, default block size, stats on, the weight-sync worker extension, and on
              CPU no chunked prefill) and the
              SamplingParams the server builds (logprobs=0, detokenize=False), in a subprocess
Each repetition generates for --prompts fresh prompts of --prompt-len tokens, n samples each,
--max-tokens per sample (temperature 1, fixed seed, ignore_eos), so every repetition prefills
new prompts and generates prompts x n x max_tokens tokens. Two prompt kinds:
  tokens      token ids
  embeds      8 token ids + rows of a stored "video" embedding + 8 token ids. The server gets the
              video once per repetition (PutEmbeddings, timed apart) and Generate names row
              ranges of it; in-process gets the same spliced rows as `prompt_embeds` tensors
              (built before the clock starts, in the serving dtype: the very tensors the server
              builds)
Throughput = generated tokens / wall seconds of the generate call (median, and best, over
--reps per round after a warm-up repetition); the ratio server / in-process is the protocol's
overhead (goal >= 0.95). The engines alternate --rounds times (server, in-process, server, ...)
and the medians are taken over all rounds, which evens out drift on a shared machine. Wall time
on a loaded machine moves with other people's work, so each call's CPU time (user + system, of
every process involved: client, server and engine processes, or the in-process engine's) is
recorded too; CPU per generated token is the steadier measure of the server's own cost. And
the in-process run times, on its own vLLM outputs, everything a Generate adds outside vLLM (the
client's request and reply handling, the server's handler with the engine call stubbed, the
metrics read after each batch): the protocol's cost, far less exposed to the machine's noise.
The handler is timed on 1 torch thread, as the server runs on CPU, and on torch's default.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
             max_position_embeddings=4096)
MAX_MODEL_LEN = 1024
HEAD, TAIL = 8, 8   # token ids around the video rows in an embeds prompt
SEED = 1234


def write_model(path: str, dtype: str, seed: int = 0) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longrl_jax.data.tokenizer import build_qwen2_tokenizer

    tok = build_qwen2_tokenizer([f"w{i}" for i in range(60)], path)
    cfg = Qwen2Config(tie_word_embeddings=True, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), **MODEL)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to({"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])
    with torch.no_grad():  # weights far from init, so sampling is not near-uniform
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.06)
    model.config.dtype = dtype
    model.save_pretrained(path)


def workload(rep: int, prompts: int, prompt_len: int, hidden: int):
    """Repetition `rep`'s prompts: token-id lists, and (head ids, video rows, (start, end) per
    prompt, tail ids) for the embeds kind. Both processes rebuild them from the seed."""
    rng = np.random.default_rng([SEED, rep + 1000])  # warm-ups have rep < 0
    ids = rng.integers(10, MODEL["vocab_size"], size=(prompts, prompt_len)).tolist()
    rows = prompt_len - HEAD - TAIL
    video = (rng.standard_normal((prompts * rows, hidden)) * 0.06).astype(np.float32)
    head = rng.integers(10, MODEL["vocab_size"], size=(prompts, HEAD)).tolist()
    tail = rng.integers(10, MODEL["vocab_size"], size=(prompts, TAIL)).tolist()
    spans = [(i * rows, (i + 1) * rows) for i in range(prompts)]
    return ids, (head, video, spans, tail)


def vllm_kwargs(path: str, dtype: str) -> dict:
    """What rollout_server/engine.py `_start_vllm` passes to `vllm.LLM` with the server's defaults
    (EngineOptions) and `--max-model-len MAX_MODEL_LEN --dtype DTYPE`."""
    from rollout_server.engine import WORKER_EXTENSION, EngineOptions, platform_scheduler_options

    o = EngineOptions(model_dir=path, dtype=dtype, max_model_len=MAX_MODEL_LEN)
    return dict(model=path, dtype=o.dtype, seed=o.seed, max_model_len=o.max_model_len,
                enforce_eager=o.enforce_eager, enable_prompt_embeds=True,
                enable_prefix_caching=True, skip_tokenizer_init=False, disable_log_stats=False,
                gpu_memory_utilization=o.gpu_memory_utilization,
                tensor_parallel_size=o.tensor_parallel_size, block_size=o.block_size,
                worker_extension_cls=WORKER_EXTENSION,
                **platform_scheduler_options(o.max_model_len))


def tree_cpu_s(*pids: int) -> float:
    """User + system CPU seconds of these processes and all their live descendants."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


# ---- the in-process engine (run in its own process: `--inprocess SPEC`) ------------------------

def protocol_costs(llm, outs: dict, prompts: dict, table, video, spec: dict,
                   reps: int = 10) -> dict:
    """Milliseconds a Generate spends outside vLLM, measured on real vLLM outputs: the client
    building and serializing the request, the server's handler (parsing, checks, splicing, the
    reply) with the engine call answered by `outs`, the client parsing the reply, and the
    engine thread's metrics read after each batch; plus the message sizes."""
    import concurrent.futures as cf

    import torch

    from longrl_jax.rl import rollout_client as RC
    from rollout_server.protos import rollout_pb2 as pb
    from rollout_server.service import RolloutService

    class StubEngine:
        vocab_size, hidden_size = MODEL["vocab_size"], MODEL["hidden_size"]
        max_model_len = MAX_MODEL_LEN
        version, stats = 0, {}

        def __init__(self):
            self.dtype, self.outs = spec["dtype"], None

        def embed_ids(self, ids):
            return table[torch.as_tensor(ids, dtype=torch.long)]

        def submit_generate(self, prompts, params):
            fut = cf.Future()
            fut.set_result((self.outs, 0, -1))
            return fut

    engine = StubEngine()
    svc = RolloutService(engine, max_embedding_bytes=1 << 30)
    svc.store.put("video", video)
    res = {}
    default_threads = torch.get_num_threads()
    for kind, ps in prompts.items():
        engine.outs = outs[kind]
        t = {"client_build_ms": [], "server_ms": [], "client_parse_ms": [],
             "server_ms_default_threads": []}
        for i in range(2 * reps):
            # the server's process runs torch on 1 thread on CPU (engine.py); torch's default
            # (one per core) for comparison, alternating
            threads = 1 if i % 2 == 0 else default_threads
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            sampling = pb.SamplingOptions(n=spec["n"], max_tokens=spec["max_tokens"],
                                          temperature=1.0, top_p=1.0, top_k=-1, seed=SEED,
                                          ignore_eos=True)
            raw = pb.GenerateRequest(prompts=[RC._prompt(p) for p in ps],
                                     sampling=sampling).SerializeToString()
            t1 = time.perf_counter()
            reply = svc.Generate(pb.GenerateRequest.FromString(raw), None).SerializeToString()
            t2 = time.perf_counter()
            got = pb.GenerateReply.FromString(reply)
            [[RC.Sample(list(x.token_ids), list(x.logprobs), x.finish_reason, got.weight_version)
              for x in c.samples] for c in got.completions]
            t3 = time.perf_counter()
            if threads == 1:
                for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2)):
                    t[k].append(1e3 * v)
            else:
                t["server_ms_default_threads"].append(1e3 * (t2 - t1))
        torch.set_num_threads(default_threads)
        res[kind] = {k: statistics.median(v) for k, v in t.items()}
        res[kind]["server_ms_default_threads_max"] = max(t["server_ms_default_threads"])
        res[kind]["server_ms_max"] = max(t["server_ms"])
        res[kind].update(request_bytes=len(raw), reply_bytes=len(reply))
    t0 = time.perf_counter()
    for _ in range(reps):
        llm.get_metrics()
    res["get_metrics_ms"] = 1e3 * (time.perf_counter() - t0) / reps
    return res


def run_inprocess(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams

    from rollout_server.tensors import DTYPES

    llm = LLM(**vllm_kwargs(spec["path"], spec["dtype"]))
    # the server's warm-up, then its serving dtype for the spliced rows
    llm.generate([{"prompt_token_ids": [0, 1]}],
                 SamplingParams(max_tokens=2, logprobs=0, temperature=1.0, seed=0), use_tqdm=False)
    tdt = DTYPES[spec["dtype"]]
    table = load_file(os.path.join(spec["path"], "model.safetensors"))[
        "model.embed_tokens.weight"].to(tdt)
    params = SamplingParams(n=spec["n"], max_tokens=spec["max_tokens"], temperature=1.0,
                            top_p=1.0, top_k=0, seed=SEED, stop_token_ids=[], ignore_eos=True,
                            logprobs=0, detokenize=False)
    out = {"tokens": [], "embeds": [], "samples": {}}
    last = {}
    for rep in spec["reps"]:
        ids, (head, video, spans, tail) = workload(rep, spec["prompts"], spec["prompt_len"],
                                                   table.shape[1])
        video = torch.from_numpy(video).to(tdt)
        for kind in ("tokens", "embeds"):
            if kind == "tokens":
                prompts = [{"prompt_token_ids": p} for p in ids]
            else:
                prompts = [{"prompt_embeds": torch.cat([
                    table[torch.as_tensor(h)], video[s:e], table[torch.as_tensor(t)]])}
                    for h, (s, e), t in zip(head, spans, tail)]
            c0, t0 = tree_cpu_s(os.getpid()), time.perf_counter()
            res = llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
            wall, cpu = time.perf_counter() - t0, tree_cpu_s(os.getpid()) - c0
            gen = sum(len(o.token_ids) for r in res for o in r.outputs)
            out[kind].append({"rep": rep, "wall_s": wall, "cpu_s": cpu, "generated": gen})
            firsts = [[int(t) for t in o.token_ids[:8]]
                      for r in res for o in sorted(r.outputs, key=lambda o: o.index)]
            out["samples"][f"{kind}-{rep}"] = firsts[:4]
            last[kind] = res
    from longrl_jax.rl.rollout_client import EmbeddingRef
    out["protocol"] = protocol_costs(
        llm, last, {"tokens": ids, "embeds": [[h, EmbeddingRef("video", s, e), t] for h, (s, e), t
                                               in zip(head, spans, tail)]},
        table, video, spec)
    llm.llm_engine.engine_core.shutdown()
    return out


def inprocess(spec: dict, env: dict, log: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = f.name + ".out"
    with open(log, "ab") as lf:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--inprocess", f.name, out],
                       env=dict(os.environ, **env), stdout=lf, stderr=subprocess.STDOUT,
                       check=True, timeout=1800)
    with open(out) as fh:
        res = json.load(fh)
    os.remove(f.name)
    os.remove(out)
    return res


# ---- the server ----------------------------------------------------------------------------------

def run_server(spec: dict, env: dict, log: str) -> dict:
    from longrl_jax.rl.connection import RolloutServerProcess
    from longrl_jax.rl.rollout_client import EmbeddingRef

    out = {"tokens": [], "embeds": [], "samples": {}, "put_s": []}
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--dtype", spec["dtype"]]
    with RolloutServerProcess(spec["path"], env=env, log_path=log, args=args) as server:
        c = server.client
        kw = dict(n=spec["n"], max_tokens=spec["max_tokens"], temperature=1.0, seed=SEED,
                  ignore_eos=True)
        for rep in spec["reps"]:
            ids, (head, video, spans, tail) = workload(rep, spec["prompts"], spec["prompt_len"],
                                                       MODEL["hidden_size"])
            key = f"video-{rep}"
            t0 = time.perf_counter()
            c.put_embeddings(key, video)
            out["put_s"].append(time.perf_counter() - t0)
            for kind in ("tokens", "embeds"):
                if kind == "tokens":
                    prompts = ids
                else:
                    prompts = [[h, EmbeddingRef(key, s, e), t]
                               for h, (s, e), t in zip(head, spans, tail)]
                # this process and its children: the client, the server and its engine
                c0, t0 = tree_cpu_s(os.getpid()), time.perf_counter()
                res = c.generate(prompts, **kw)
                wall = time.perf_counter() - t0
                cpu = tree_cpu_s(os.getpid()) - c0
                gen = sum(len(s.token_ids) for r in res for s in r)
                out[kind].append({"rep": rep, "wall_s": wall, "cpu_s": cpu, "generated": gen})
                out["samples"][f"{kind}-{rep}"] = [s.token_ids[:8] for r in res for s in r][:4]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round (< 4 min)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=4, help="timed reps per round")
    ap.add_argument("--rounds", type=int, default=None,
                    help="server/in-process rounds (3; quick 1)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--log", default=None, help="engine logs (default: in a temp dir)")
    ap.add_argument("--inprocess", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inprocess:
        with open(args.inprocess[0]) as fh:
            res = run_inprocess(json.load(fh))
        with open(args.inprocess[1], "w") as fh:
            json.dump(res, fh)
        return
    reps = args.reps
    rounds = args.rounds or (1 if args.quick else 3)

    tmp = tempfile.TemporaryDirectory(prefix="rollout_tput_")
    path = os.path.join(tmp.name, "qwen2")
    write_model(path, args.dtype)
    log = args.log or os.path.join(tmp.name, "engines.log")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    per_rep = args.prompts * args.n * args.max_tokens
    print(f"model {MODEL}, {args.dtype}; {args.prompts} prompts x {args.prompt_len} tokens, "
          f"n={args.n}, {args.max_tokens} new tokens each = {per_rep} generated per rep; "
          f"{rounds} round(s) of 1 warm-up + {reps} reps", flush=True)
    runs = {"server": [], "inprocess": []}
    for rnd in range(rounds):
        # fresh prompts in every round and repetition (rep -1 - rnd is the round's warm-up)
        rep_ids = [-1 - rnd] + [rnd * reps + i for i in range(reps)]
        spec = dict(path=path, dtype=args.dtype, reps=rep_ids, prompts=args.prompts,
                    prompt_len=args.prompt_len, n=args.n, max_tokens=args.max_tokens)
        for name, fn in (("server", run_server), ("inprocess", inprocess)):
            t0 = time.perf_counter()
            res = fn(spec, env, log)
            runs[name].append(res)
            tp = {k: statistics.median(r["generated"] / r["wall_s"] for r in res[k][1:])
                  for k in ("tokens", "embeds")}
            print(f"round {rnd} {name:<9}: tokens {tp['tokens']:7.1f} tok/s, embeds "
                  f"{tp['embeds']:7.1f} tok/s ({time.perf_counter() - t0:.0f} s with start-up)",
                  flush=True)

    rows = []
    for kind in ("tokens", "embeds"):
        row = {"prompt": kind}
        for name in ("server", "inprocess"):
            timed = [r for res in runs[name] for r in res[kind][1:]]
            assert all(r["generated"] == per_rep for r in timed), timed
            row[name + "_tok_s"] = statistics.median(r["generated"] / r["wall_s"] for r in timed)
            row[name + "_best_tok_s"] = max(r["generated"] / r["wall_s"] for r in timed)
            row[name + "_wall_s"] = statistics.median(r["wall_s"] for r in timed)
            row[name + "_cpu_ms_per_token"] = statistics.median(
                1e3 * r["cpu_s"] / r["generated"] for r in timed)
        row["ratio"] = row["server_tok_s"] / row["inprocess_tok_s"]
        row["ratio_best"] = row["server_best_tok_s"] / row["inprocess_best_tok_s"]
        row["cpu_ratio"] = row["inprocess_cpu_ms_per_token"] / row["server_cpu_ms_per_token"]
        row["same_samples"] = all(runs["server"][i]["samples"] == runs["inprocess"][i]["samples"]
                                  for i in range(rounds))
        rows.append(row)
    put_s = statistics.median(p for res in runs["server"] for p in res["put_s"][1:])
    print(f"\n{per_rep} generated tokens per call; {rounds * reps} calls per engine "
          f"(median, and best in brackets); CPU = ms of CPU time (all processes) per token")
    print(f"{'prompt':<7} {'server tok/s':>16} {'in-proc tok/s':>16} {'ratio':>12} "
          f"{'server CPU':>10} {'in-proc CPU':>11} {'CPU ratio':>9} {'same':>5}")
    for r in rows:
        print(f"{r['prompt']:<7} {r['server_tok_s']:>7.0f} ({r['server_best_tok_s']:>6.0f}) "
              f"{r['inprocess_tok_s']:>7.0f} ({r['inprocess_best_tok_s']:>6.0f}) "
              f"{r['ratio']:>5.3f} ({r['ratio_best']:.3f}) {r['server_cpu_ms_per_token']:>10.3f} "
              f"{r['inprocess_cpu_ms_per_token']:>11.3f} {r['cpu_ratio']:>9.3f} "
              f"{str(r['same_samples']):>5}")
    print("ratio = server / in-process throughput; CPU ratio = in-process / server CPU per "
          "token (>= 1: the server costs no more CPU)")
    proto = runs["inprocess"][-1]["protocol"]
    for kind in ("tokens", "embeds"):
        p = proto[kind]
        total = (p["client_build_ms"] + p["server_ms"] + p["client_parse_ms"]
                 + proto["get_metrics_ms"])
        wall = next(r["inprocess_wall_s"] for r in rows if r["prompt"] == kind)
        print(f"outside vLLM, {kind}: client request {p['client_build_ms']:.1f} ms, server handler "
              f"{p['server_ms']:.1f} ms (max {p['server_ms_max']:.1f}; on torch's default threads "
              f"{p['server_ms_default_threads']:.1f}, "
              f"max {p['server_ms_default_threads_max']:.1f}),"
              f" client reply {p['client_parse_ms']:.1f} ms, engine-thread metrics "
              f"{proto['get_metrics_ms']:.1f} ms = {total:.1f} ms "
              f"({100 * total / 1e3 / wall:.1f}% of the median in-process call); messages "
              f"{p['request_bytes'] / 1e3:.1f} KB / {p['reply_bytes'] / 1e3:.1f} KB")
    rows_sent = args.prompts * (args.prompt_len - HEAD - TAIL)
    print(f"PutEmbeddings of one repetition's video ({rows_sent} rows, float32): "
          f"{put_s * 1e3:.1f} ms (not in the embeds times)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"date": datetime.date.today().isoformat(), "model": MODEL,
                       "dtype": args.dtype, "prompts": args.prompts,
                       "prompt_len": args.prompt_len, "n": args.n, "max_tokens": args.max_tokens,
                       "reps": reps, "rounds": rounds, "rows": rows, "put_embeddings_s": put_s,
                       "runs": runs}, fh, indent=1)
    tmp.cleanup()


if __name__ == "__main__":
    main()
