"""Orbax checkpoints: model parameters alone, and the full training state for resuming.

A params directory (`save_params` / `load_params`) holds `model_config.json` (the ModelConfig,
and whether the layers are stacked for a scan) and `params/` (an orbax StandardCheckpointer tree
of the NNX parameters): what export, evaluation and the next stage start from.

`TrainCheckpointer` keeps numbered steps of what a trainer needs to continue exactly where it
stopped: parameters, optimizer state, and a JSON dict (data iterator state, RNG keys, stage,
counters). `rng_to_json` / `rng_from_json` put typed PRNG keys into that dict.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from longrl_jax.models import VLM, ModelConfig

log = logging.getLogger(__name__)


def save_params(model: VLM, directory: str) -> None:
    """Every process calls it (orbax writes each process's shards); process 0 writes the
    config."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(directory, "model_config.json"), "w") as f:
            json.dump({"model": model.cfg.to_dict(), "scan_layers": model.llm.scan_layers}, f,
                      indent=2)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, "params"), nnx.to_pure_dict(nnx.state(model, nnx.Param)),
              force=True)
    ckpt.wait_until_finished()


def is_params_dir(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "model_config.json")) and \
        os.path.isdir(os.path.join(directory, "params"))


def load_params(directory: str, *, param_dtype=jnp.float32, mesh=None, rules=None) -> VLM:
    """The model saved by `save_params`; with `mesh`, restored directly into its shards."""
    directory = os.path.abspath(directory)
    with open(os.path.join(directory, "model_config.json")) as f:
        meta = json.load(f)
    cfg = ModelConfig.from_dict(meta["model"])
    abstract = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                          scan_layers=meta.get("scan_layers", False)))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    if mesh is not None:
        from longrl_jax.parallel import mesh as mesh_lib
        shardings = nnx.to_pure_dict(mesh_lib.state_shardings(nnx.state(abstract, nnx.Param), mesh,
                                                              rules or mesh_lib.DEFAULT_RULES))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              target, shardings)
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# Training state.

_PARAMS, _OPT, _EXTRA = "params", "opt_state", "extra"
_BYTES = "__bytes_b64__"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); the message names the step,
    the cause and the newest step left intact."""


class TrainCheckpointer:
    """Numbered checkpoints of (params, optimizer state, JSON extra), on orbax CheckpointManager.

With several processes every process saves and restores together (orbax's multi-process
checkpoints: each writes its own shards, process 0 the metadata and `extra`, which must be the
same on every process: the data iterator's state is, since every process draws the same global
examples).

    Restores go *in place* into a model and optimizer that already exist where training runs:
    the restore target is the current arrays' shapes, dtypes and shardings, so a sharded model is
    read directly into its shards, whatever the mesh was when the step was saved.

    Crash safety is orbax's: a step is written under `<step>.orbax-checkpoint-tmp` and renamed to
    `<step>` only when complete, so a step killed mid-write is invisible to `latest_step()` and
    the next save of that step replaces the leftover.

    Only `nnx.Param` variables of the model are kept (not RNG streams or other state: put those
    in `extra`). The optimizer is an `nnx.Optimizer`; its `nnx.OptState` variables (step counter
    and the optax state) are kept.
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer | None = None,
             extra: dict | None = None, force: bool = False) -> bool:
        """Starts saving `step` (in the background if async). False when nothing is saved: the
        interval skips the step (unless `force`), or the step is already saved (a final
        `force=True` save that lands on an interval step keeps the first).

        `extra` must be JSON-able once bytes values are base64-encoded (they come back as
        bytes); tuples come back as lists and dict keys as strings. It is checked here, not in
        the background thread, so a bad value fails at the call.
        """
        extra = _encode(dict(extra or {}))
        json.dumps(extra)
        if step in self._manager.all_steps():
            return False
        items = {_PARAMS: ocp.args.StandardSave(_params(model)), _EXTRA: ocp.args.JsonSave(extra)}
        if optimizer is not None:
            items[_OPT] = ocp.args.StandardSave(_opt_state(optimizer))
        try:
            return self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 -- this one's or the previous async save's failure
            raise self._failed(e, step) from e

    def latest_step(self) -> int | None:
        """The newest step (one this manager is still writing counts; `wait()` finishes it)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, step: int | None = None, *, model: nnx.Module,
                optimizer: nnx.Optimizer | None = None) -> dict:
        """Loads `step` (default: the newest that reads back whole) into `model` / `optimizer`;
        returns the extra dict.

        Without `step`, a newest step that cannot be read (truncated or corrupt files) is moved
        aside to `<step>.corrupt` with a warning naming it, and the previous kept step is tried;
        nothing is loaded until a step reads back whole, and if none does the last error is
        raised (a run never silently starts over)."""
        self.wait()
        if step is not None:
            return self._restore(step, model, optimizer)
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for k, candidate in enumerate(steps):
            try:
                return self._restore(candidate, model, optimizer)
            except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many kinds
                if k == len(steps) - 1:
                    raise
                aside = self._move_aside(candidate)
                log.warning("checkpoint step %d in %s cannot be read (%s: %s); moved to %s, "
                            "trying step %d", candidate, self.directory, type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "", aside,
                            steps[k + 1])
        raise AssertionError("unreachable")

    def _move_aside(self, step: int) -> str:
        dest, n = os.path.join(self.directory, f"{step}.corrupt"), 1
        while os.path.exists(dest):
            n += 1
            dest = os.path.join(self.directory, f"{step}.corrupt{n}")
        os.rename(os.path.join(self.directory, str(step)), dest)
        self._manager.reload()
        return dest

    def _restore(self, step: int, model, optimizer) -> dict:
        items = {_PARAMS: ocp.args.StandardRestore(_target(_params(model))),
                 _EXTRA: ocp.args.JsonRestore()}
        if optimizer is not None:
            items[_OPT] = ocp.args.StandardRestore(_target(_opt_state(optimizer)))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        _update(model, nnx.Param, restored[_PARAMS])
        if optimizer is not None:
            _update(optimizer, nnx.OptState, restored[_OPT])
        return _decode(restored[_EXTRA])

    def wait(self) -> None:
        """Blocks until a background save is finalised (and raises its error, if any, as a
        `CheckpointError`)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(e) from e

    def _failed(self, error: Exception, step: int | None = None) -> CheckpointError:
        done = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointError(
            f"saving {what} to {self.directory} failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300] if str(error) else ''}); the newest complete "
            f"step, {done[-1] if done else 'none'}, is intact")

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoints(directory: str, stage_cfg, model, opt, data_iter, *, stage: str = ""
                     ) -> tuple[TrainCheckpointer, int]:
    """(checkpointer, first step) of a training stage: model, optimizer and data iterator are
    restored in place from the newest checkpoint in `directory`, if there is one."""
    ckpt = TrainCheckpointer(directory, max_to_keep=stage_cfg.keep_checkpoints,
                             save_interval_steps=stage_cfg.checkpoint_every)
    if ckpt.latest_step() is None:
        return ckpt, 0
    extra = ckpt.restore(model=model, optimizer=opt)
    data_iter.set_state(extra["data_state"])
    log.info("%s: resumed at step %d", stage or directory, extra["step"])
    return ckpt, extra["step"]


def _params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _opt_state(optimizer: nnx.Optimizer) -> dict:
    return nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState))


def _target(tree: dict) -> dict:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _update(node: nnx.Module | nnx.Optimizer, kind: type, pure: dict) -> None:
    state = nnx.state(node, kind)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(node, state)


def _encode(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {_BYTES: base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_BYTES}:
            return base64.b64decode(obj[_BYTES])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def rng_to_json(key: jax.Array) -> dict:
    """A typed PRNG key (any shape, any impl) as JSON: {"impl": name, "data": nested lists}."""
    return {"impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.random.key_data(key)).tolist()}


def rng_from_json(obj: dict) -> jax.Array:
    """The key `rng_to_json` wrote, bit for bit."""
    return jax.random.wrap_key_data(np.asarray(obj["data"], np.uint32), impl=obj["impl"])
