"""Micro-batches change memory, not numbers: the RL update and the SFT step over n micro-batches
(gradients accumulated, one optimizer step) leave the same parameters as the whole mini-batch at
once, for uneven response lengths and every loss aggregation; log-probs taken in micro-batches
equal the unbatched ones. 8 fake devices, float32, tiny model."""

import types

import jax
import numpy as np
import optax
import pytest
from batch_fixtures import SEP_ID, VIDEO_ID, toy_batch
from flax import nnx

from configs import demo
from longrl_jax import batch as batch_lib
from longrl_jax import build
from longrl_jax.grad_accumulation import num_micro_batches
from longrl_jax.optim import trainable_filter
from longrl_jax.rl import trainer as rl_trainer
from longrl_jax.sft import trainer as sft_trainer

MESH = dict(data=1, fsdp=2, sequence=1, tensor=4)     # 2-way batch parallel: 8 rows = 4 x 2


def MESH_OBJ():
    from longrl_jax.parallel import mesh as mesh_lib
    return mesh_lib.make_mesh(MESH)
ROWS = 8


def _setup(loss_agg="token-mean"):
    config = demo.get_config("quick")
    config.mesh.update(MESH)
    config.rl.loss_agg = loss_agg
    config.rl.kl_coef = 0.05
    model, mesh = build.build_model(config, video_token_id=VIDEO_ID, separator_token_id=SEP_ID)
    return config, model, mesh


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    batch = toy_batch((1, 8, 3, 5, 2, 7, 4, 6), seed=seed, row_scale=0.5,   # uneven lengths
                      num_videos=3)
    batch = batch_lib.in_layout(batch, MESH_OBJ(), "contiguous")
    shape = batch.targets.shape
    rl = dict(adv=rng.standard_normal(shape[0]).astype(np.float32),
              old_logp=-rng.random(shape).astype(np.float32),
              ref_logp=-rng.random(shape).astype(np.float32))
    return batch, rl


def _optimizer(model):
    """The trainers' clipping with plain SGD: AdamW's first step is ~lr * sign(g), which
    turns summation-order noise in near-zero gradient entries into visible differences
    (measured: one of 4,096 entries off by 1.2e-6 with AdamW); SGD shows the step itself."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    return nnx.Optimizer(model, tx, wrt=trainable_filter("llm"))


def _params(model):
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _close(a, b, tol):
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=tol)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean",
                                      "seq-mean-token-sum-norm"])
def test_rl_update_in_micro_batches_equals_whole_minibatch(loss_agg):
    config, model0, mesh = _setup(loss_agg)
    batch, rl = _batch()
    table = batch_lib.place_table(batch.video_table, mesh)
    rows = dict(batch.row_arrays(), **rl)
    results = {}
    for per_device in (4, 2, 1):            # 1, 2 and 4 micro-batches of the 8 rows
        n = num_micro_batches(ROWS, per_device, mesh)
        model = build.copy_model(model0)
        opt = _optimizer(model)
        update = rl_trainer.make_update_fn(mesh, config.rl)
        micro = batch_lib.place_micro_batches(rows, n, mesh, zero=("mask", "adv"))
        m = jax.device_get(update(model, opt, micro, table))
        results[n] = (_params(model), m)
    assert sorted(results) == [1, 2, 4]
    whole_params, whole_m = results[1]
    assert not all(np.allclose(a, b) for a, b in zip(whole_params, _params(model0)))
    for n in (2, 4):
        params, m = results[n]
        _close(params, whole_params, 1e-6)
        for k in whole_m:
            np.testing.assert_allclose(m[k], whole_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_uneven_last_micro_batch_adds_nothing():
    """3 micro-batches of 8 rows: the padded rows of the last one change nothing."""
    config, model0, mesh = _setup()
    batch, rl = _batch(1)
    table = batch_lib.place_table(batch.video_table, mesh)
    rows = dict(batch.row_arrays(), **rl)
    out = []
    for n in (1, 3):
        model = build.copy_model(model0)
        opt = _optimizer(model)
        micro = batch_lib.place_micro_batches(rows, n, mesh, zero=("mask", "adv"))
        rl_trainer.make_update_fn(mesh, config.rl)(model, opt, micro, table)
        out.append(_params(model))
    _close(out[1], out[0], 1e-6)


def test_sft_step_in_micro_batches_equals_whole_batch():
    config, model0, mesh = _setup()
    batch, _ = _batch(2)
    shared = {"video_table": batch_lib.place_table(batch.video_table, mesh)}
    out = {}
    for n in (1, 2, 4):
        model = build.copy_model(model0)
        opt = _optimizer(model)
        micro = batch_lib.place_micro_batches(batch.row_arrays(), n, mesh)
        m = jax.device_get(sft_trainer.make_step(mesh)(model, opt, micro, shared))
        out[n] = (_params(model), m)
    for n in (2, 4):
        _close(out[n][0], out[1][0], 1e-6)
        for k in out[1][1]:
            np.testing.assert_allclose(out[n][1][k], out[1][1][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("minibatch,on_host", [(8, False), (4, True)])
def test_logprobs_in_micro_batches_equal_unbatched(minibatch, on_host):
    """Through the trainer's mini-batches of whole groups (each with its own video table) and
    micro-batches of 1 and 3 sequences per device: the log-probs of the whole batch at once."""
    config, model, mesh = _setup()
    batch, _ = _batch(3)
    logprob_fn = rl_trainer.make_logprob_fn(mesh)
    whole, _ = jax.device_get(logprob_fn(model, batch_lib.place_batch(batch, mesh)))
    config.rl.minibatch_size = minibatch
    config.rl.video_on_host = on_host        # the tables wait in pinned host memory
    group_ids = np.arange(ROWS) % 4          # groups of 2, interleaved
    for per_device in (1, 3):
        config.rl.logprob_micro_batch_size = per_device
        ctx = types.SimpleNamespace(mesh=mesh, rules=build.rules(config), config=config,
                                    model=model)
        video = rl_trainer.StepVideo(ctx, batch, group_ids, step=0)
        assert len(video.parts) == ROWS // minibatch
        assert video.tables[0].sharding.memory_kind == ("pinned_host" if on_host else "device")
        (got,) = rl_trainer.logprobs_in_micro_batches(logprob_fn, [model], video)
        assert got.shape == whole.shape
        np.testing.assert_allclose(got * batch.mask, whole * batch.mask, rtol=0, atol=1e-6)


def test_reference_keeps_its_own_buffers_through_a_donated_update():
    """`RefModel` (in pinned host memory here) scores like the policy it copied, and the
    policy's donated update neither deletes nor changes it."""
    config, model, mesh = _setup()
    batch, rl = _batch(4)
    ref = rl_trainer.RefModel(model, on_host=True)
    logprob_fn = rl_trainer.make_logprob_fn(mesh)
    placed = batch_lib.place_batch(batch, mesh)
    before, _ = jax.device_get(logprob_fn(model, placed))
    opt = _optimizer(model)
    micro = batch_lib.place_micro_batches(dict(batch.row_arrays(), **rl), 1, mesh,
                                          zero=("mask", "adv"))
    rl_trainer.make_update_fn(mesh, config.rl)(model, opt, micro, placed["video_table"])
    after, _ = jax.device_get(logprob_fn(model, placed))
    with ref.on_device() as ref_model:
        got, _ = jax.device_get(logprob_fn(ref_model, placed))
    mask = batch.mask > 0
    assert np.abs(after - before)[mask].max() > 1e-4          # the policy moved
    np.testing.assert_array_equal(got[mask], before[mask])     # the reference did not
