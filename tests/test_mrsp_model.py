"""MR-SP wired into the model: stage 1 (sharded video encoding) and stage 2 (the Qwen2 forward,
loss gradient and response log-probs with SP on) equal the single-device computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longrl_jax.models import VLM, ModelConfig
from longrl_jax.models.splice import splice_layout
from longrl_jax.parallel import logprobs, video_encoding
from longrl_jax.parallel import mesh as mesh_lib
from longrl_jax.parallel import sequence as S

V_TOKEN, SEP = 3, 4


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.tiny(vocab_size=96).replace(video_token_id=V_TOKEN, separator_token_id=SEP)
    m = VLM(cfg, rngs=nnx.Rngs(0))
    key = jax.random.key(3)
    for _, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):  # move off init values
        key, sub = jax.random.split(key)
        var[...] = var[...] + 0.05 * jax.random.normal(sub, var.shape)
    return m


@pytest.mark.parametrize("sizes", [{"sequence": 8}, {"data": 2, "fsdp": 4},
                                   {"fsdp": 2, "sequence": 2, "tensor": 2}])
@pytest.mark.parametrize("num_frames", [13, 16])
def test_stage1_sharded_encoding_equals_unsharded(model, sizes, num_frames):
    mesh = mesh_lib.make_mesh(sizes)
    frames = jnp.asarray(np.random.RandomState(num_frames).uniform(
        -1, 1, (num_frames, 32, 32, 3)).astype(np.float32))
    ref = model.encode_video(frames)
    out = video_encoding.encode_video_sharded(model, frames, mesh=mesh, frames_per_chunk=1)
    assert out.shape == ref.shape  # padded for the devices, unpadded after: nothing dropped
    assert _rel(out, ref) < 1e-5


def _spliced(model, num_frames=9, seed=0):
    """A spliced prompt: text, a video, text, then a response, as the trainer builds it."""
    rs = np.random.RandomState(seed)
    frames = jnp.asarray(rs.uniform(-1, 1, (num_frames, 32, 32, 3)).astype(np.float32))
    prompt = [1, 7, 8, V_TOKEN, 9, 10]
    response = list(rs.randint(11, 96, 6))
    lay = splice_layout(prompt + response, video_token_id=V_TOKEN, frames_per_video=[num_frames],
                        tokens_per_frame=model.cfg.tokens_per_frame, separator_id=SEP)
    video_embeds = model.encode_video(frames).reshape(-1, 64)
    embeds = model.splice(jnp.asarray(lay.token_ids)[None], jnp.asarray(lay.video_rows)[None],
                          video_embeds)
    embeds = jnp.concatenate([embeds, embeds[:, ::-1] * 0.5])  # batch 2, different contents
    t = lay.length
    resp_pos = np.stack([np.arange(t - 6, t)] * 2)
    targets = np.stack([lay.token_ids[t - 6:]] * 2)
    return embeds, resp_pos, targets


@pytest.mark.parametrize("strategy,sp,layout", [
    ("all_gather_kv", 8, "contiguous"), ("ulysses", 4, "contiguous"), ("ring", 8, "zigzag"),
    ("ring", 2, "contiguous")])
def test_stage2_forward_loss_grad_and_response_logprobs(model, strategy, sp, layout):
    embeds, resp_pos, targets = _spliced(model)
    b, t = embeds.shape[:2]
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 96, (b, t)))

    def loss_dense(llm):
        lp = jax.nn.log_softmax(llm(inputs_embeds_btd=embeds)[:, :-1], -1)
        return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))

    ref_loss, ref_grads = nnx.value_and_grad(loss_dense)(model.llm)
    ref_logits = model.llm(inputs_embeds_btd=embeds)

    mesh = mesh_lib.make_mesh({"sequence": sp, "fsdp": -1})
    llm = nnx.clone(model.llm)
    S.use_sequence_parallel(llm, mesh, strategy, layout=layout, block_q=8, block_k=8)
    nxt = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), ids.dtype)], 1)
    seq = S.pad_and_shard(embeds, nxt, mesh=mesh, layout=layout)
    e, n = seq.arrays
    predicts = jnp.asarray(seq.index < t - 1)[None]

    @nnx.jit
    def logits_sp(llm):
        return llm(inputs_embeds_btd=e, positions_bt=seq.positions, attention_mask_bt=seq.valid)

    assert _rel(seq.unshard(logits_sp(llm)), ref_logits) < 1e-4

    def loss_sp(llm):
        logits = llm(inputs_embeds_btd=e, positions_bt=seq.positions, attention_mask_bt=seq.valid)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), n[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(predicts, lp, 0)) / (b * (t - 1))

    loss, grads = nnx.jit(nnx.value_and_grad(loss_sp))(llm)
    assert abs(float(loss - ref_loss)) < 1e-5
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert _rel(g, r) < 1e-4

    lp, ent = nnx.jit(lambda llm: logprobs.response_logprobs(llm, seq, resp_pos, targets,
                                                            mesh=mesh))(llm)
    lp_ref, ent_ref = logprobs.full_logprobs(model.llm, embeds, resp_pos, targets)
    assert lp.shape == (b, 6)
    assert float(jnp.abs(lp - lp_ref).max()) < 1e-4
    assert float(jnp.abs(ent - ent_ref).max()) < 1e-4


def test_response_logprobs_never_projects_the_whole_sequence(model):
    """The compiled prefill has no [B, T, V] tensor: only [B, R, V]."""
    embeds, resp_pos, targets = _spliced(model, num_frames=20)
    mesh = mesh_lib.make_mesh({"sequence": 8})
    llm = nnx.clone(model.llm)
    S.use_sequence_parallel(llm, mesh, "all_gather_kv")
    seq = S.pad_and_shard(embeds, mesh=mesh)
    graphdef, state = nnx.split(llm)

    def f(state):
        return logprobs.response_logprobs(nnx.merge(graphdef, state), seq, resp_pos, targets,
                                         mesh=mesh)

    hlo = jax.jit(f).lower(state).as_text()
    t_pad, v = seq.arrays[0].shape[1], model.cfg.llm.vocab_size
    assert f"{t_pad}x{v}" not in hlo and f"{t_pad // 8}x{v}" not in hlo
    assert f"2x6x{v}" in hlo


def test_scanned_rematerialised_layers_with_sp_match(model):
    """The memory configuration (stacked layers in one scan, remat, ring SP) computes the same
    loss gradient as the plain unsharded model."""
    embeds, resp_pos, targets = _spliced(model, num_frames=6)
    b, t = embeds.shape[:2]
    scanned = VLM(model.cfg, rngs=nnx.Rngs(0), scan_layers=True, remat=True).llm
    plain = model.llm
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(l) for l in plain.layers])
    nnx.update(scanned.layers, stacked)
    for name in ("embed_tokens", "norm"):
        nnx.update(getattr(scanned, name), nnx.state(getattr(plain, name)))

    def loss(llm, **kw):
        lp, _ = logprobs.full_logprobs(llm, embeds, resp_pos, targets, **kw)
        return -jnp.sum(lp)

    ref_loss, ref_grads = nnx.value_and_grad(loss)(plain)
    mesh = mesh_lib.make_mesh({"sequence": 4, "fsdp": -1})
    S.use_sequence_parallel(scanned, mesh, "ring", layout="zigzag", block_q=8, block_k=8)
    seq = S.pad_and_shard(embeds, mesh=mesh, layout="zigzag")

    def loss_sp(llm):
        lp, _ = logprobs.response_logprobs(llm, seq, resp_pos, targets, mesh=mesh)
        return -jnp.sum(lp)

    sp_loss, sp_grads = nnx.jit(nnx.value_and_grad(loss_sp))(scanned)
    assert abs(float(sp_loss - ref_loss)) < 1e-4 * abs(float(ref_loss))
    n = model.cfg.llm.num_layers
    g_layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[ref_grads.layers[i] for i in range(n)])
    for a, r in zip(jax.tree.leaves(sp_grads.layers), jax.tree.leaves(g_layers)):
        assert _rel(a, r) < 1e-4
    assert _rel(sp_grads.embed_tokens.embedding[...], ref_grads.embed_tokens.embedding[...]) < 1e-4
