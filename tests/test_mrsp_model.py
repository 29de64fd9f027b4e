"""MR-SP wired into the model: stage 1 (sharded video encoding) and stage 2 (the Qwen2 forward,
loss gradient and response log-probs with SP on) equal the single-device computation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from longrl_jax import batch as batch_lib
from longrl_jax import build
from longrl_jax import prompts as prompts_lib
from longrl_jax.models import VLM, ModelConfig
from longrl_jax.models.splice import splice_embeddings, splice_layout
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


def _prompt(model, num_frames, seed, key):
    """A prompt with a video: text, the video's rows, text (as `RunContext.prompts` makes)."""
    rs = np.random.RandomState(seed)
    frames = jnp.asarray(rs.uniform(-1, 1, (num_frames, 32, 32, 3)).astype(np.float32))
    ids = [1, 7, 8, V_TOKEN, 9, 10]
    lay = splice_layout(ids, video_token_id=V_TOKEN, frames_per_video=[num_frames],
                        tokens_per_frame=model.cfg.tokens_per_frame, separator_id=SEP)
    rows = np.asarray(model.encode_video(frames)).reshape(-1, model.cfg.llm.hidden_size)
    return prompts_lib.Prompt(None, np.array(ids), lay, key, rows)


def _batch(model, mesh, layout, num_frames=9, response_len=6):
    """Two sequences of the same length (two videos, a response of `response_len` tokens each),
    as the trainer builds them, and the unsharded reference inputs: spliced embeddings [B, t, D]
    (t the real length), response positions and targets [B, R]."""
    rs = np.random.RandomState(0)
    prompts = [_prompt(model, num_frames, seed, f"v{seed}") for seed in (0, 1)]
    responses = [rs.randint(11, 96, response_len).astype(np.int32) for _ in prompts]
    batch = batch_lib.build_batch(prompts, responses, response_len=response_len,
                                  length_multiple=batch_lib.length_multiple(mesh, layout))
    t = int(batch.valid.sum(1).max())
    embeds = model.splice(jnp.asarray(batch.token_ids), jnp.asarray(batch.video_rows),
                          jnp.asarray(batch.video_table))[:, :t]
    placed = batch_lib.place_batch(batch, mesh, layout=layout)
    return batch, placed, embeds, batch.rows + 1, batch.targets


@pytest.mark.parametrize("strategy,sp,layout", [
    ("all_gather_kv", 8, "contiguous"), ("ulysses", 4, "contiguous"), ("ring", 8, "zigzag"),
    ("ring", 2, "contiguous")])
def test_stage2_forward_loss_grad_and_response_logprobs(model, strategy, sp, layout):
    mesh = mesh_lib.make_mesh({"sequence": sp, "fsdp": -1})
    batch, placed, embeds, resp_pos, targets = _batch(model, mesh, layout)
    b, t = embeds.shape[:2]
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 96, (b, t)))

    def loss_dense(llm):
        lp = jax.nn.log_softmax(llm(inputs_embeds_btd=embeds)[:, :-1], -1)
        return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))

    ref_loss, ref_grads = nnx.value_and_grad(loss_dense)(model.llm)
    ref_logits = model.llm(inputs_embeds_btd=embeds)

    vlm = nnx.clone(model)
    S.use_sequence_parallel(vlm.llm, mesh, strategy, layout=layout, block_q=8, block_k=8)
    tp = batch.token_ids.shape[1]
    index = S.layout_index(tp, sp, layout)  # the placed order
    unshard = lambda x: jnp.take(x, jnp.asarray(S.inverse_index(index)[:t]), axis=1)  # noqa: E731
    # the trainers' splice: each device splices its own shard of the split video table
    e = nnx.jit(lambda m: logprobs.embed_inputs(m, placed, mesh=mesh))(vlm)
    assert e.sharding.spec[1] == "sequence"
    nxt = jnp.asarray(np.pad(np.asarray(ids[:, 1:]), ((0, 0), (0, tp - t + 1)))[:, index])
    predicts = jnp.asarray(index < t - 1)[None]
    pos, valid = placed["positions"], placed["valid"]

    @nnx.jit
    def logits_sp(llm):
        return llm(inputs_embeds_btd=e, positions_bt=pos, attention_mask_bt=valid)

    assert _rel(unshard(logits_sp(vlm.llm)), ref_logits) < 1e-4

    def loss_sp(llm):
        logits = llm(inputs_embeds_btd=e, positions_bt=pos, attention_mask_bt=valid)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nxt[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(predicts, lp, 0)) / (b * (t - 1))

    loss, grads = nnx.jit(nnx.value_and_grad(loss_sp))(vlm.llm)
    assert abs(float(loss - ref_loss)) < 1e-5
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert _rel(g, r) < 1e-4

    lp, ent = nnx.jit(lambda m: logprobs.batch_logprobs(m, placed, mesh=mesh))(vlm)
    lp_ref, ent_ref = logprobs.full_logprobs(model.llm, embeds, resp_pos, targets)
    assert lp.shape == (b, 6)
    assert float(jnp.abs(lp - lp_ref).max()) < 1e-4
    assert float(jnp.abs(ent - ent_ref).max()) < 1e-4


def test_batch_logprobs_never_projects_the_whole_sequence(model):
    """The compiled prefill has no [B, T, V] tensor: only [B, R, V]."""
    mesh = mesh_lib.make_mesh({"sequence": 8})
    _, placed, _, _, _ = _batch(model, mesh, "contiguous", num_frames=20)
    vlm = nnx.clone(model)
    S.use_sequence_parallel(vlm.llm, mesh, "all_gather_kv")
    graphdef, state = nnx.split(vlm)

    def f(state):
        return logprobs.batch_logprobs(nnx.merge(graphdef, state), placed, mesh=mesh)

    hlo = jax.jit(f).lower(state).as_text()
    t_pad, v = placed["token_ids"].shape[1], model.cfg.llm.vocab_size
    assert f"{t_pad}x{v}" not in hlo and f"{t_pad // 8}x{v}" not in hlo
    assert f"2x6x{v}" in hlo


def test_scanned_rematerialised_layers_with_sp_match(model):
    """The memory configuration (stacked layers in one scan, remat, ring SP) computes the same
    loss gradient as the plain unsharded model."""
    mesh = mesh_lib.make_mesh({"sequence": 4, "fsdp": -1})
    batch, placed, _, resp_pos, targets = _batch(model, mesh, "zigzag", num_frames=6)
    scanned = VLM(model.cfg, rngs=nnx.Rngs(0), scan_layers=True, remat=True)
    plain = model.llm
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(l) for l in plain.layers])
    nnx.update(scanned.llm.layers, stacked)
    for name in ("embed_tokens", "norm"):
        nnx.update(getattr(scanned.llm, name), nnx.state(getattr(plain, name)))
    t = int(batch.valid.sum(1).max())
    host = [jnp.asarray(a) for a in (batch.token_ids, batch.video_rows, batch.video_table)]

    def loss(llm, **kw):  # the splice inside, as in the trainer: the embedding gets its gradient
        embeds = splice_embeddings(llm.embed(host[0]), host[2], host[1], xp=jnp)[:, :t]
        lp, _ = logprobs.full_logprobs(llm, embeds, resp_pos, targets, **kw)
        return -jnp.sum(lp)

    ref_loss, ref_grads = nnx.value_and_grad(loss)(plain)
    S.use_sequence_parallel(scanned.llm, mesh, "ring", layout="zigzag", block_q=8, block_k=8)

    def loss_sp(m):
        lp, _ = logprobs.batch_logprobs(m, placed, mesh=mesh)
        return -jnp.sum(lp)

    sp_loss, grads = nnx.jit(nnx.value_and_grad(loss_sp))(scanned)
    sp_grads = grads.llm
    assert abs(float(sp_loss - ref_loss)) < 1e-4 * abs(float(ref_loss))
    n = model.cfg.llm.num_layers
    g_layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[ref_grads.layers[i] for i in range(n)])
    for a, r in zip(jax.tree.leaves(sp_grads.layers), jax.tree.leaves(g_layers)):
        assert _rel(a, r) < 1e-4
    assert _rel(sp_grads.embed_tokens.embedding[...], ref_grads.embed_tokens.embedding[...]) < 1e-4


# ------------------------------------------------ the trainers' path: layouts agree exactly
def _uneven_batch(model):
    """Four sequences over two videos of different lengths, responses of uneven length (the
    padded response slots and the padded tail of T exercise the masks)."""
    rs = np.random.RandomState(7)
    a, b = _prompt(model, 9, 2, "a"), _prompt(model, 5, 3, "b")
    prompts = [a, b, a, b]
    responses = [rs.randint(11, 96, n).astype(np.int32) for n in (6, 2, 5, 1)]
    return prompts, responses, rs.uniform(0.5, 1.5, (4, 6)).astype(np.float32)


def _trainer_logprobs(model, mesh, strategy, layout, prompts, responses, weights):
    """What a trainer step does: install the configured attention, build and place the batch in
    the configured layout, `batch_logprobs`, and the gradient of a loss over the log-probs."""
    config = ml_collections.ConfigDict(dict(sp=dict(strategy=strategy, layout=layout),
                                            model=dict(attention="dense")))
    vlm = nnx.clone(model)
    build.install_attention(vlm.llm, mesh, config)
    batch = batch_lib.build_batch(prompts, responses, response_len=6,
                                  length_multiple=batch_lib.length_multiple(mesh, layout))
    placed = batch_lib.place_batch(batch, mesh, layout=layout)
    w = jnp.asarray(weights)

    def loss(m):
        logp, ent = logprobs.batch_logprobs(m, placed, mesh=mesh)
        return -jnp.sum(logp * w * placed["mask"]) / jnp.sum(placed["mask"]), (logp, ent)

    grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.PathContains("llm")),
                                 has_aux=True)
    (_, (logp, ent)), grads = nnx.jit(grad_fn)(vlm)
    return placed, logp, ent, grads


@pytest.fixture(scope="module")
def sp_off(model):
    """The reference: no sequence axis (the layout asked for must not matter there)."""
    prompts, responses, weights = _uneven_batch(model)
    mesh = mesh_lib.make_mesh({"fsdp": -1})
    out = _trainer_logprobs(model, mesh, "ring", "zigzag", prompts, responses, weights)
    contiguous = batch_lib.place_batch(
        batch_lib.build_batch(prompts, responses, response_len=6), mesh, layout="contiguous")
    for name, a in out[0].items():  # zigzag without a sequence axis: nothing reordered
        np.testing.assert_array_equal(np.asarray(a), np.asarray(contiguous[name]))
    return out[1:]


@pytest.mark.parametrize("strategy,sp", [("ring", 2), ("ring", 4), ("all_gather_kv", 2),
                                         ("all_gather_kv", 4), ("ulysses", 4)])
def test_zigzag_contiguous_and_sp_off_give_the_same_logprobs_and_gradients(model, sp_off,
                                                                            strategy, sp):
    """Through `place_batch` + `batch_logprobs` as the trainers call them: both layouts equal
    the run without sequence parallelism, log-probs and the gradient of a loss over them."""
    prompts, responses, weights = _uneven_batch(model)
    mesh = mesh_lib.make_mesh({"sequence": sp, "fsdp": -1})
    lp_ref, ent_ref, g_ref = jax.device_get(sp_off)  # on another mesh: compare on the host
    mask = np.asarray(batch_lib.build_batch(prompts, responses, response_len=6).mask)
    assert (mask.sum(1) == [6, 2, 5, 1]).all()
    for layout in ("zigzag", "contiguous"):
        placed, lp, ent, grads = _trainer_logprobs(model, mesh, strategy, layout, prompts,
                                                   responses, weights)
        assert placed["token_ids"].sharding.spec[1] == "sequence"
        lp, ent, grads = jax.device_get((lp, ent, grads))
        lp_err = float(np.abs((lp - lp_ref) * mask).max())
        ent_err = float(np.abs((ent - ent_ref) * mask).max())
        g_err = max(_rel(g, r) for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)))
        print(f"{strategy} sp={sp} {layout}: logp {lp_err:.2e} entropy {ent_err:.2e} "
              f"grad (rel) {g_err:.2e}")
        assert lp_err < 1e-5 and ent_err < 1e-5
        assert g_err < 1e-5


def test_place_batch_zigzag_keeps_positions_and_finds_the_response_rows(model):
    prompts, responses, _ = _uneven_batch(model)
    mesh = mesh_lib.make_mesh({"sequence": 4, "fsdp": -1})
    assert batch_lib.length_multiple(mesh, "zigzag") == 64
    assert batch_lib.length_multiple(mesh, "zigzag", floor=12) == 24
    batch = batch_lib.build_batch(prompts, responses, response_len=6)
    placed = batch_lib.place_batch(batch, mesh, layout="zigzag")
    index = S.layout_index(batch.token_ids.shape[1], 4, "zigzag")
    for name in ("token_ids", "positions", "valid"):
        np.testing.assert_array_equal(np.asarray(placed[name]), getattr(batch, name)[:, index])
    # video rows index their shard's table, which holds exactly the original rows they name
    split = batch_lib.in_layout(batch, mesh, "zigzag")
    np.testing.assert_array_equal(
        batch_lib.original_video_rows(np.asarray(placed["video_rows"]), split.table_index),
        batch.video_rows[:, index])
    table, tindex = np.asarray(placed["video_table"]), split.table_index
    assert table.shape[0] == 4 and placed["video_table"].sharding.spec[0] == "sequence"
    for s in range(4):
        used = tindex[s] >= 0
        np.testing.assert_array_equal(table[s][used], batch.video_table[tindex[s][used]])
        assert (table[s][~used] == 0).all()
    np.testing.assert_array_equal(np.asarray(placed["positions"])[0], index)  # RoPE: original
    np.testing.assert_array_equal(index[np.asarray(placed["rows"])], batch.rows)
    for name in ("targets", "mask"):
        np.testing.assert_array_equal(np.asarray(placed[name]), getattr(batch, name))
    odd = batch_lib.build_batch(prompts, responses, response_len=6, length_multiple=12)
    with pytest.raises(ValueError, match="multiple of 2\\*sp"):
        batch_lib.place_batch(odd, mesh, layout="zigzag")
