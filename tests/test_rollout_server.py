"""The rollout server end to end: real vLLM engine, real gRPC, a transformers checkpoint.

The session's server (conftest `rollout_server`, with a token) serves every test; the restart
test runs last and leaves a fresh one (version 0, the initial weights) in its place.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from rollout_fixtures import MAX_LEN, TOKEN
from safetensors.numpy import load_file

from longrl_jax.rl.rollout_client import (
    EmbeddingRef,
    RolloutClient,
    RolloutError,
    StaleWeightsError,
)


@pytest.fixture(scope="module")
def served(rollout_server):
    return rollout_server


@pytest.fixture(scope="module")
def weights(served):
    _, path = served
    return load_file(os.path.join(path, "model.safetensors"))


def _hf_model(path):
    from transformers import Qwen2ForCausalLM
    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


PROMPT = [9, 20, 31, 42, 53, 64, 75, 86]


# ---- parity with transformers and the JAX model ------------------------------------------------

def test_greedy_matches_transformers_and_jax(served):
    server, path = served
    [[s]] = server.client.generate([PROMPT], n=1, max_tokens=12, temperature=0.0, ignore_eos=True)
    # the session's server may have been sent updates by other modules: the same weights
    assert s.weight_version == server.client.info().weight_version
    assert len(s.token_ids) == 12 and s.finish_reason == "length"
    hf = _hf_model(path)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                          min_new_tokens=12, pad_token_id=0)[0, len(PROMPT):].tolist()
        assert s.token_ids == ref
        logits = hf(torch.tensor([PROMPT + s.token_ids])).logits[0, len(PROMPT) - 1:-1]
        ref_lp = torch.log_softmax(logits, -1)[torch.arange(12), torch.tensor(s.token_ids)]
    np.testing.assert_allclose(s.logprobs, ref_lp.numpy(), atol=2e-3)

    import jax.numpy as jnp

    from longrl_jax.models import hf as hf_io
    from longrl_jax.models.qwen2 import token_logprobs
    model = hf_io.load_pretrained(path)
    ids = jnp.asarray([PROMPT + s.token_ids])
    lp, _ = token_logprobs(model.llm(ids[:, :-1]), ids[:, 1:])
    np.testing.assert_allclose(s.logprobs, np.asarray(lp[0, len(PROMPT) - 1:]), atol=2e-3)


def test_sampled_logprobs_match_transformers(served):
    server, path = served
    samples = server.client.generate([PROMPT], n=4, max_tokens=10, temperature=1.0, seed=7,
                                     ignore_eos=True)[0]
    assert len({tuple(s.token_ids) for s in samples}) > 1
    hf = _hf_model(path)
    for s in samples:
        with torch.no_grad():
            logits = hf(torch.tensor([PROMPT + s.token_ids])).logits[0, len(PROMPT) - 1:-1]
        ref = torch.log_softmax(logits, -1)[torch.arange(10), torch.tensor(s.token_ids)]
        np.testing.assert_allclose(s.logprobs, ref.numpy(), atol=2e-3)
    again = server.client.generate([PROMPT], n=4, max_tokens=10, temperature=1.0, seed=7,
                                   ignore_eos=True)[0]
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]  # seeded


def test_seeded_batch_over_one_step_budget(served):
    """Seeded prompts totalling more than one scheduler step's tokens (4096 on CPU): with
    chunked prefill, vLLM rewinds a CPU generator and its engine dies (engine.py
    `platform_scheduler_options`)."""
    client = served[0].client
    rng = random.Random(9)
    prompts = [[rng.randrange(10, 200) for _ in range(900)] for _ in range(6)]
    out = client.generate(prompts, n=2, max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    assert [len(c) for c in out] == [2] * 6
    assert all(len(s.token_ids) == 4 for c in out for s in c)
    assert client.health().ready


def test_prompts_of_one_request_get_their_own_seeds(served):
    """Same prompt twice in one seeded request: different samples (no shared random stream),
    and the first equals that prompt sent alone with the same seed."""
    client = served[0].client
    a, b = client.generate([PROMPT, PROMPT], n=2, max_tokens=8, temperature=1.0, seed=21,
                           ignore_eos=True)
    assert [s.token_ids for s in a] != [s.token_ids for s in b]
    alone = client.generate([PROMPT], n=2, max_tokens=8, temperature=1.0, seed=21,
                            ignore_eos=True)[0]
    assert [s.token_ids for s in alone] == [s.token_ids for s in a]


# ---- prompt embeddings and splicing ------------------------------------------------------------

def test_embedding_rows_equal_token_ids(served, weights):
    client = served[0].client
    table = weights["model.embed_tokens.weight"]
    assert client.put_embeddings("rows-of-prompt", table[PROMPT]) is True
    assert client.put_embeddings("rows-of-prompt", table[PROMPT]) is False  # idempotent
    assert client.has_embeddings(["rows-of-prompt", "nope"]) == [True, False]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3, n=3)):
        by_ids = client.generate([PROMPT], max_tokens=8, ignore_eos=True, **kw)[0]
        by_rows = client.generate([[EmbeddingRef("rows-of-prompt")]], max_tokens=8,
                                  ignore_eos=True, **kw)[0]
        assert [s.token_ids for s in by_rows] == [s.token_ids for s in by_ids]
        np.testing.assert_allclose([s.logprobs for s in by_rows], [s.logprobs for s in by_ids],
                                   atol=1e-5)


def test_spliced_prompt_equals_full_embedding_sequence(served, weights):
    client = served[0].client
    table = weights["model.embed_tokens.weight"]
    video = np.random.default_rng(0).normal(size=(12, 64)).astype(np.float32)
    client.put_embeddings("video-a", video)
    head, tail = [5, 6, 7], [8, 9]
    full = np.concatenate([table[head], video[2:10], table[tail]])
    client.put_embeddings("full-sequence", full)
    spliced = [head, EmbeddingRef("video-a", 2, 10), tail]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=11, n=2)):
        a = client.generate([spliced], max_tokens=8, ignore_eos=True, **kw)[0]
        b = client.generate([["full-sequence"]], max_tokens=8, ignore_eos=True, **kw)[0]
        assert [s.token_ids for s in a] == [s.token_ids for s in b]


def test_splice_layout_segments_round_trip(served, weights):
    """The trainer's SpliceLayout segments, sent by reference, equal the spliced embeddings."""
    from longrl_jax.models.splice import splice_embeddings, splice_layout
    from longrl_jax.rl.rollout_client import spliced_prompt
    client = served[0].client
    table = weights["model.embed_tokens.weight"]
    video = np.random.default_rng(1).normal(size=(3 * 4, 64)).astype(np.float32)
    lay = splice_layout([5, 6, 3, 7, 8], video_token_id=3, frames_per_video=[3],
                        tokens_per_frame=4, separator_id=4)
    client.put_embeddings("video-b", video)
    full = splice_embeddings(table[lay.token_ids], video, lay.video_rows, xp=np)
    client.put_embeddings("video-b-spliced", np.asarray(full, np.float32))
    a = client.generate([spliced_prompt(lay, "video-b")], max_tokens=6, temperature=0.0)[0]
    b = client.generate([["video-b-spliced"]], max_tokens=6, temperature=0.0)[0]
    assert a[0].token_ids == b[0].token_ids


# ---- shared prefill ----------------------------------------------------------------------------

def test_n_samples_share_one_prefill(served):
    client = served[0].client
    rng = random.Random(5)
    T = 600
    computed = {}
    for n in (1, 8):
        prompt = [rng.randrange(10, 200) for _ in range(T)]  # fresh: nothing cached yet
        client.generate([prompt], n=n, max_tokens=4, temperature=1.0, seed=1, ignore_eos=True)
        computed[n] = client.last_computed_prompt_tokens
    block = client.info().block_size
    assert block == 32
    assert computed[1] == T
    # one prefill, plus the last partial cache block once per extra sample (not n * T)
    assert computed[8] == T + 7 * (T % block), computed


# ---- weight updates ----------------------------------------------------------------------------

def _greedy(client):
    return client.generate([PROMPT], max_tokens=10, temperature=0.0, ignore_eos=True)[0][0].token_ids


def test_updated_weights_serve_the_same_logprobs_as_transformers(served, weights):
    """Every tensor of an update reaches the engine, the tied LM head included."""
    server, path = served
    client = server.client
    rng = np.random.default_rng(3)
    changed = {k: (v + rng.normal(size=v.shape).astype(np.float32) * 0.2) for k, v in weights.items()}
    v = client.info().weight_version
    client.update_weights(changed, v + 1)
    try:
        [[s]] = client.generate([PROMPT], max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
        hf = _hf_model(path)
        hf.load_state_dict({k: torch.from_numpy(a) for k, a in changed.items()}, strict=False)
        hf.tie_weights()
        with torch.no_grad():
            logits = hf(torch.tensor([PROMPT + s.token_ids])).logits[0, len(PROMPT) - 1:-1]
        ref = torch.log_softmax(logits, -1)[torch.arange(8), torch.tensor(s.token_ids)]
        np.testing.assert_allclose(s.logprobs, ref.numpy(), atol=2e-3)
    finally:
        client.update_weights(weights, v + 2)


def test_update_weights_changes_and_restores(served, weights):
    client = served[0].client
    before = _greedy(client)
    v0 = client.info().weight_version
    changed = {k: (v * 1.7 if k.endswith("embed_tokens.weight") else v) for k, v in weights.items()}
    for transport in ("shm", "stream"):
        v = client.info().weight_version
        reply = client.update_weights(changed, v + 1, transport=transport)
        assert reply.weight_version == v + 1
        assert _greedy(client) != before
        client.update_weights(weights, v + 2, transport=transport)
        assert _greedy(client) == before
    assert client.info().weight_version == v0 + 4
    with pytest.raises(StaleWeightsError):
        client.generate([PROMPT], max_tokens=2, temperature=0.0, min_weight_version=v0 + 99)


@pytest.mark.parametrize("case", ["shape", "unknown", "dtype", "nan", "missing", "old_version"])
def test_bad_update_is_rejected_and_old_weights_serve(served, weights, case):
    client = served[0].client
    before = _greedy(client)
    v = client.info().weight_version
    bad = dict(weights)
    name = "model.layers.0.mlp.up_proj.weight"
    if case == "shape":
        bad[name] = bad[name][:-1]
    elif case == "unknown":
        bad["model.layers.9.mlp.up_proj.weight"] = bad[name]
    elif case == "dtype":
        bad[name] = bad[name].astype(np.float16)
    elif case == "nan":
        bad[name] = bad[name].copy()
        bad[name][3, 5] = np.nan
    elif case == "missing":
        del bad[name]
    version = v if case == "old_version" else v + 1
    with pytest.raises(RolloutError) as err:
        client.update_weights({k: val * 2 for k, val in bad.items()}, version)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert client.info().weight_version == v
    assert _greedy(client) == before


# ---- bad requests --------------------------------------------------------------------------------

def _code(fn):
    with pytest.raises(RolloutError) as err:
        fn()
    return err.value.code


def test_bad_requests_get_clear_errors(served):
    client = served[0].client
    g = client.generate
    IA = grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: g([["no-such-key"]], max_tokens=2)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: g([[]], max_tokens=2)) == IA
    assert _code(lambda: g([], max_tokens=2)) == IA
    assert _code(lambda: g([[5] * MAX_LEN], max_tokens=2)) == IA
    assert _code(lambda: g([PROMPT], max_tokens=0)) == IA
    assert _code(lambda: g([PROMPT], n=-1, max_tokens=2)) == IA  # 0 is proto3's unset: n=1
    assert _code(lambda: g([PROMPT], max_tokens=2, temperature=-1.0)) == IA
    assert _code(lambda: g([PROMPT], max_tokens=2, temperature=float("nan"))) == IA
    assert _code(lambda: g([PROMPT], max_tokens=2, top_p=1.5)) == IA
    assert _code(lambda: g([PROMPT], n=3, max_tokens=2, temperature=0.0)) == IA
    assert _code(lambda: g([[5, 10 ** 6]], max_tokens=2)) == IA
    assert _code(lambda: g([[EmbeddingRef("video-a", 5, 99)]], max_tokens=2)) == IA
    assert _code(lambda: client.put_embeddings("wrong-width", np.zeros((3, 7), np.float32))) == IA
    nan = np.zeros((3, 64), np.float32)
    nan[1, 1] = np.nan
    assert _code(lambda: client.put_embeddings("nan-rows", nan)) == IA
    with pytest.raises(RolloutError, match="temperature"):
        g([PROMPT], max_tokens=2, temperature=-1.0)


def test_token_is_required_by_every_rpc(served, weights):
    server, _ = served
    v = server.client.info().weight_version
    calls = {
        "Health": lambda c: c.health(),
        "Info": lambda c: c.info(),
        "HasEmbeddings": lambda c: c.has_embeddings(["x"]),
        "PutEmbeddings": lambda c: c.put_embeddings("x", np.zeros((1, 64), np.float32)),
        "Generate": lambda c: c.generate([PROMPT], max_tokens=2),
        "UpdateWeights/shm": lambda c: c.update_weights(weights, v + 1, transport="shm"),
        "UpdateWeights/stream": lambda c: c.update_weights(weights, v + 1, transport="stream"),
        "Shutdown": lambda c: c.shutdown(),
    }
    for token in (None, "wrong", TOKEN + "x", ""):
        with RolloutClient(server.address, token) as c:
            for name, call in calls.items():
                assert _code(lambda call=call: call(c)) == grpc.StatusCode.UNAUTHENTICATED, \
                    (name, token)
    assert server.alive() and server.client.info().weight_version == v   # nothing happened
    assert server.client.has_embeddings(["x"]) == [False]


# ---- start-up errors ---------------------------------------------------------------------------

def _start(args, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this checkout's server
    env = dict(os.environ, PYTHONPATH=repo)
    return subprocess.run([sys.executable, "-m", "rollout_server", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)


def test_startup_errors_exit_with_one_line(tmp_path):
    r = _start(["--model_dir", str(tmp_path / "missing")], tmp_path)
    assert r.returncode == 2 and "not a directory" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    r = _start(["--model_dir", str(tmp_path / "m")], tmp_path)
    assert r.returncode == 2 and "GPT2LMHeadModel is not supported" in r.stderr
    r = _start(["--model_dir", str(tmp_path / "m"), "--host", "0.0.0.0"], tmp_path)
    assert r.returncode == 2 and "refusing to serve without --token-file" in r.stderr


# ---- a SIGKILLed server's leftovers (last: it replaces the shared server) ---------------------------

def _stalled_update(client, weights, started: threading.Event, gate: threading.Event):
    """A streamed UpdateWeights that sends its table and first bytes, then waits on `gate`."""
    from rollout_server.protos import rollout_pb2 as pb
    table, total = [], 0
    for name, a in weights.items():
        table.append(pb.TensorMeta(name=name, dtype="float32", shape=list(a.shape),
                                   offset=total, nbytes=a.nbytes))
        total += a.nbytes

    def chunks():
        yield pb.WeightChunk(version=10 ** 6, tensors=table, total_bytes=total, data=b"\0" * 64)
        started.set()
        gate.wait(120)

    try:
        client._stub.UpdateWeights(chunks(), timeout=120, metadata=client._metadata)
    except grpc.RpcError:
        pass


def _group_pids(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{d}/stat").read() if d.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:
            out.append(int(d))
    return out


def test_sigkilled_server_leaves_no_shm_files_after_restart(served, weights):
    from rollout_server.leftovers import MIN_AGE_S, files_in_use
    server, _ = served
    client = server.client
    want = _greedy(client)
    started, gate = threading.Event(), threading.Event()
    t = threading.Thread(target=_stalled_update, args=(client, weights, started, gate))
    t.start()
    try:
        assert started.wait(60)
        deadline = time.monotonic() + 60
        upd = []
        while not upd and time.monotonic() < deadline:
            upd = [n for n in os.listdir("/dev/shm")
                   if n.startswith(f"rollout-upd-{server.process.pid}-")]
            time.sleep(0.1)
        assert upd, "the server made no file for the streamed update"
        group = files_in_use("/dev/shm", _group_pids(server.process.pid))
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    finally:
        gate.set()
        t.join()
    server._kill()   # what the trainer's restart does first: the engine processes go too
    left = group & set(os.listdir("/dev/shm"))
    assert set(upd) <= left      # nothing cleaned up after the kill ...
    for n in left:               # (as if the kill was over a minute ago)
        p = os.path.join("/dev/shm", n)
        os.utime(p, (time.time() - MIN_AGE_S - 5,) * 2)
    server.restart()
    assert not left & set(os.listdir("/dev/shm"))   # ... and nothing after the next start
    assert client is not server.client and server.client.info().weight_version == 0
    assert _greedy(server.client) == want
