"""TrainCheckpointer: bit-exact resume, retention, sharded restore, a save killed mid-write."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import grain.python as gp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from longrl_jax.checkpoint import TrainCheckpointer, rng_from_json, rng_to_json
from longrl_jax.models import VLM, ModelConfig
from longrl_jax.parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MLP(nnx.Module):

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x_bd):
        return self.fc2(nnx.gelu(self.fc1(x_bd)))


def _mse_step(model, opt, x_bd, y_bo):
    grads = nnx.grad(lambda m: jnp.mean((m(x_bd) - y_bo) ** 2))(model)
    opt.update(model, grads)


# Donating like a real trainer: an async save must not read buffers a later step reuses.
train_step = nnx.jit(_mse_step, donate_argnums=(0, 1))


def _batch(i):
    rs = np.random.RandomState(i)
    return jnp.asarray(rs.randn(8, 4), jnp.float32), jnp.asarray(rs.randn(8, 2), jnp.float32)


def _new(seed):
    model = MLP(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)


def _host(node, kind):
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(node, kind)))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _loader():
    sampler = gp.IndexSampler(20, shuffle=True, seed=3, num_epochs=1,
                              shard_options=gp.NoSharding())
    return gp.DataLoader(data_source=gp.RangeDataSource(0, 20, 1), sampler=sampler,
                         worker_count=0)


def test_resume_is_bit_identical_to_uninterrupted(tmp_path):
    model, opt = _new(0)
    data = iter(_loader())
    seen = [next(data) for _ in range(2)]
    for i in range(2):
        train_step(model, opt, *_batch(i))
    params_2, opt_2 = _host(model, nnx.Param), _host(opt, nnx.OptState)
    key = jax.random.split(jax.random.key(5))[1]
    extra = {"data": data.get_state(), "rng": rng_to_json(key), "stage": "rl", "seen": seen,
             "counters": {"samples": 16}}

    with TrainCheckpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(2, model=model, optimizer=opt, extra=extra)
        train_step(model, opt, *_batch(2))  # runs while the save may still be writing
        ckpt.wait()
    expected = _host(model, nnx.Param), _host(opt, nnx.OptState)
    expected_next = next(data)

    model_b, opt_b = _new(1)
    with TrainCheckpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        restored = ckpt.restore(model=model_b, optimizer=opt_b)
    _assert_trees_equal(_host(model_b, nnx.Param), params_2)
    _assert_trees_equal(_host(opt_b, nnx.OptState), opt_2)
    assert int(opt_b.step[...]) == 2
    assert restored["data"] == extra["data"] and isinstance(restored["data"], bytes)
    assert restored["stage"] == "rl" and restored["counters"] == {"samples": 16}
    assert restored["seen"] == [int(s) for s in seen]
    assert jax.random.key_impl(rng_from_json(restored["rng"])) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(rng_from_json(restored["rng"])),
                                  jax.random.key_data(key))

    train_step(model_b, opt_b, *_batch(2))
    _assert_trees_equal((_host(model_b, nnx.Param), _host(opt_b, nnx.OptState)), expected)
    data_b = iter(_loader())
    data_b.set_state(restored["data"])
    assert next(data_b) == expected_next


def test_params_only_restore_and_missing_optimizer(tmp_path):
    model, opt = _new(0)
    train_step(model, opt, *_batch(0))
    with TrainCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, model=model, extra={"stage": "sft"})
        model_b, opt_b = _new(1)
        assert ckpt.restore(1, model=model_b) == {"stage": "sft"}
        _assert_trees_equal(_host(model_b, nnx.Param), _host(model, nnx.Param))
        with pytest.raises(KeyError, match="opt_state"):
            ckpt.restore(1, model=model_b, optimizer=opt_b)


def test_keeps_last_n_and_interval(tmp_path):
    model, opt = _new(0)
    with TrainCheckpointer(tmp_path / "keep", max_to_keep=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, model=model, optimizer=opt, extra={"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
        assert sorted(os.listdir(tmp_path / "keep")) == ["4", "5"]
        assert ckpt.restore(4, model=model)["step"] == 4
    with TrainCheckpointer(tmp_path / "every2", save_interval_steps=2) as ckpt:
        saved = [ckpt.save(s, model=model, extra={}) for s in range(5)]
        assert saved == [True, False, True, False, True]
        assert ckpt.save(5, model=model, extra={}, force=True)
        assert not ckpt.save(4, model=model, extra={}, force=True)  # already saved
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4, 5]  # max_to_keep=3


def test_bad_extra_fails_at_the_call(tmp_path):
    model, _ = _new(0)
    with TrainCheckpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError):
            ckpt.save(1, model=model, extra={"x": object()})


def test_rng_json_round_trip():
    for key in (jax.random.key(7), jax.random.split(jax.random.key(1), 3),
                jax.random.key(2, impl="rbg")):
        obj = json.loads(json.dumps(rng_to_json(key)))
        back = rng_from_json(obj)
        assert back.shape == key.shape and back.dtype == key.dtype
        np.testing.assert_array_equal(jax.random.key_data(back), jax.random.key_data(key))
        draw = jax.vmap(lambda k: jax.random.uniform(k, (4,)))
        np.testing.assert_array_equal(draw(back.reshape(-1)), draw(key.reshape(-1)))


# ------------------------------------------------------------------------------------------------
# Sharded restore.

def _vlm(mesh, seed):
    cfg = ModelConfig.tiny(vocab_size=128)
    model = mesh_lib.shard_model(VLM(cfg, rngs=nnx.Rngs(seed)), mesh)
    return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)


def _shardings(node, kind):
    return {path: v[...].sharding for path, v in nnx.to_flat_state(nnx.state(node, kind))}


def _fill(opt, seed):
    """Distinct values in every optimizer leaf, in place and in its shards (a training step on
    the sharded VLM would cost a long compile on two cores)."""
    rs = np.random.RandomState(seed)
    for _, var in nnx.to_flat_state(nnx.state(opt, nnx.OptState)):
        value = rs.randint(1, 100, var.shape) if jnp.issubdtype(var.dtype, jnp.integer) \
            else rs.randn(*var.shape)
        var[...] = jax.device_put(value.astype(var.dtype), var[...].sharding)


def test_restore_into_a_differently_sharded_model(tmp_path):
    assert jax.device_count() == 8
    model, opt = _vlm(mesh_lib.make_mesh({"fsdp": 2, "tensor": 4}), seed=0)
    _fill(opt, seed=0)
    saved = _host(model, nnx.Param), _host(opt, nnx.OptState)
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, model=model, optimizer=opt, extra={})
        ckpt.wait()

    model_b, opt_b = _vlm(mesh_lib.make_mesh({"fsdp": 8}), seed=1)
    before = _shardings(model_b, nnx.Param), _shardings(opt_b, nnx.OptState)
    assert any(any(a is not None for a in s.spec) for s in before[0].values()), "nothing sharded"
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.restore(model=model_b, optimizer=opt_b)
    assert (_shardings(model_b, nnx.Param), _shardings(opt_b, nnx.OptState)) == before
    _assert_trees_equal((_host(model_b, nnx.Param), _host(opt_b, nnx.OptState)), saved)


def test_a_finished_stage_loads_in_the_run_param_dtype_and_shards(tmp_path):
    """`main.load_final` (a re-run skipping a finished stage) keeps a bfloat16 run bfloat16: it
    once loaded float32, and a resumed bf16 run silently trained on in float32."""
    from types import SimpleNamespace

    import ml_collections

    from longrl_jax import checkpoint, main
    mesh = mesh_lib.make_mesh({"fsdp": 2, "sequence": 4})
    cfg = ModelConfig.tiny(vocab_size=128)

    def make(seed):
        return mesh_lib.create_sharded(
            lambda: VLM(cfg, rngs=nnx.Rngs(seed), param_dtype=jnp.bfloat16), mesh)
    finished = make(0)
    saved = _host(finished, nnx.Param)
    checkpoint.save_params(finished, str(tmp_path / "params" / "sft"))
    model = make(1)
    before = _shardings(model, nnx.Param)
    ctx = SimpleNamespace(
        model=model, mesh=mesh, rules=mesh_lib.DEFAULT_RULES,
        config=ml_collections.ConfigDict({"model": {"param_dtype": "bfloat16"}}),
        path=lambda *parts: str(tmp_path.joinpath(*parts)))
    main.load_final(ctx, "sft")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("bfloat16")}
    assert _shardings(model, nnx.Param) == before
    _assert_trees_equal(_host(model, nnx.Param), saved)


# ------------------------------------------------------------------------------------------------
# A save killed mid-write.

CHILD = textwrap.dedent("""
    import os, signal, sys
    import jax
    from flax import nnx
    from orbax.checkpoint._src.path import atomicity
    from longrl_jax.checkpoint import TrainCheckpointer

    # The fault, injected where it always lands mid-save: step 2's files are written, then the
    # process is killed before orbax commits them (its atomic rename of the temporary
    # directory). A timed kill would race the write on a fast machine.
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == "2":
            print("killed before committing 2", sorted(os.listdir(sys.argv[1])), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return await commit(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize

    model = nnx.Linear(256, 256, rngs=nnx.Rngs(0))
    ckpt = TrainCheckpointer(sys.argv[1], async_save=True)
    ckpt.save(1, model=model, extra={"step": 1})
    ckpt.wait()
    model.kernel[...] = model.kernel[...] + 1.0
    ckpt.save(2, model=model, extra={"step": 2})
    ckpt.wait()
    print("step 2 committed: the fault was not injected", flush=True)
""")


def _run_child(script: str, directory) -> subprocess.CompletedProcess:
    """`script` in a fresh CPU process, with the checkpoint directory as its argument."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-c", script, str(directory)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_sigkill_during_async_save_resumes_from_last_finished_step(tmp_path):
    directory = tmp_path / "ckpt"
    proc = _run_child(CHILD, directory)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "killed before committing 2" in proc.stdout
    left = sorted(os.listdir(directory))
    assert "2" not in left and any(n.startswith("2.") for n in left), left

    model = nnx.Linear(256, 256, rngs=nnx.Rngs(1))
    with TrainCheckpointer(directory) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.restore(model=model) == {"step": 1}
        np.testing.assert_array_equal(
            np.asarray(model.kernel[...]),
            np.asarray(nnx.Linear(256, 256, rngs=nnx.Rngs(0)).kernel[...]))
        ckpt.save(2, model=model, extra={"step": 2})
        ckpt.wait()
        assert ckpt.latest_step() == 2
    assert sorted(os.listdir(directory)) == ["1", "2"]


# ------------------------------------------------------------------------------------------------
# A newest checkpoint that rotted.

def _truncate_arrays(step_dir):
    """Cuts every array data file of a saved step to half its length (a disk that lost the
    end of a write)."""
    cut = 0
    for root, _, files in os.walk(os.path.join(step_dir, "params")):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if size > 1024:
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                cut += 1
    assert cut, "no array data found to corrupt: test is blind"


def test_a_corrupt_newest_step_falls_back_to_the_previous_one(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    with TrainCheckpointer(directory, async_save=False) as ckpt:
        for step in (1, 2, 3):
            model = nnx.Linear(256, 256, rngs=nnx.Rngs(step))
            ckpt.save(step, model=model, extra={"step": step})
    _truncate_arrays(os.path.join(directory, "3"))

    model = nnx.Linear(256, 256, rngs=nnx.Rngs(9))
    with TrainCheckpointer(directory) as ckpt, caplog.at_level("WARNING"):
        assert ckpt.restore(model=model) == {"step": 2}
        assert ckpt.all_steps() == [1, 2]
    np.testing.assert_array_equal(np.asarray(model.kernel[...]),
                                  np.asarray(nnx.Linear(256, 256, rngs=nnx.Rngs(2)).kernel[...]))
    assert any("step 3" in r.getMessage() and "3.corrupt" in r.getMessage()
               for r in caplog.records)
    assert sorted(os.listdir(directory)) == ["1", "2", "3.corrupt"]   # kept for inspection
    with TrainCheckpointer(directory, async_save=False) as ckpt:     # step 3 is saved anew
        ckpt.save(3, model=model, extra={"step": 3})
        assert ckpt.all_steps() == [1, 2, 3]


def test_when_no_step_reads_back_the_error_is_raised(tmp_path):
    directory = str(tmp_path / "ckpt")
    with TrainCheckpointer(directory, async_save=False) as ckpt:
        ckpt.save(1, model=nnx.Linear(256, 256, rngs=nnx.Rngs(1)), extra={"step": 1})
    _truncate_arrays(os.path.join(directory, "1"))
    model = nnx.Linear(256, 256, rngs=nnx.Rngs(9))
    before = np.asarray(model.kernel[...]).copy()
    # orbax raises a bare Exception (from tensorstore's ValueError): match its message
    with TrainCheckpointer(directory) as ckpt, \
            pytest.raises(Exception, match="error while reading"):  # noqa: B017
        ckpt.restore(model=model)
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), before)   # nothing loaded


# ------------------------------------------------------------------------------------------------
# A save into a full disk.

FULL_DISK_CHILD = textwrap.dedent("""
    import resource, signal, sys
    from flax import nnx
    from longrl_jax.checkpoint import CheckpointError, TrainCheckpointer

    ckpt = TrainCheckpointer(sys.argv[1], async_save=True)
    ckpt.save(1, model=nnx.Linear(256, 256, rngs=nnx.Rngs(1)), extra={"step": 1})
    ckpt.wait()
    # From here no file may grow past 4 KB: the write fails as on a full filesystem (EFBIG
    # rather than ENOSPC; the signal the kernel also sends is ignored, as a trainer would).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        ckpt.save(2, model=nnx.Linear(256, 256, rngs=nnx.Rngs(2)), extra={"step": 2})
        ckpt.wait()
    except CheckpointError as e:
        print("CheckpointError:", e, flush=True)
        sys.exit(3)
    print("saved step 2: the disk was not full", flush=True)
""")


def test_a_save_into_a_full_disk_stops_cleanly_and_keeps_the_previous_step(tmp_path):
    directory = tmp_path / "ckpt"
    proc = _run_child(FULL_DISK_CHILD, directory)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert "saving" in line and str(directory) in line and "step, 1, is intact" in line, line
    model = nnx.Linear(256, 256, rngs=nnx.Rngs(9))
    with TrainCheckpointer(str(directory)) as ckpt:
        assert ckpt.restore(model=model) == {"step": 1}
    np.testing.assert_array_equal(np.asarray(model.kernel[...]),
                                  np.asarray(nnx.Linear(256, 256, rngs=nnx.Rngs(1)).kernel[...]))


def test_run_outputs_are_replaced_whole(tmp_path):
    """eval_summary.json and the export directory are written beside and renamed in: a reader
    (or a kill) sees the old version or the new one, never half of one."""
    from longrl_jax.main import write_dir, write_json
    path = str(tmp_path / "eval_summary.json")
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.load(open(path)) == {"a": 2} and os.listdir(tmp_path) == ["eval_summary.json"]

    export = str(tmp_path / "export")

    def fill(version):
        def write(d):
            os.makedirs(d)
            open(os.path.join(d, "config.json"), "w").write(str(version))
        return write
    write_dir(export, fill(1))
    with pytest.raises(RuntimeError):
        write_dir(export, lambda d: (fill(2)(d), (_ for _ in ()).throw(RuntimeError("killed"))))
    assert open(os.path.join(export, "config.json")).read() == "1"   # the old one, whole
    write_dir(export, fill(3))
    assert open(os.path.join(export, "config.json")).read() == "3"
    assert sorted(os.listdir(tmp_path)) == ["eval_summary.json", "export"]   # swept
