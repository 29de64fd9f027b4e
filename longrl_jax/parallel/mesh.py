"""The device mesh ('data', 'fsdp', 'sequence', 'tensor') and logical-axis sharding of parameters.

Parameters carry logical axis names (`models/layers.py`); a rules table maps each name to mesh
axes (or None = replicated), MaxText-style. Rules live in the config; `DEFAULT_RULES` is the
default table. A dimension that the mapped mesh axes do not divide is replicated rather than
rejected (a 2-kv-head model on a 4-way tensor axis still runs), and one mesh axis is never used
twice in one parameter.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "sequence", "tensor")

Rules = Sequence[tuple[str, Any]]  # (logical name, mesh axis | tuple of mesh axes | None)

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("frames", ("data", "fsdp", "sequence")),
    ("seq", "sequence"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),  # ZeRO-3 over the sequence axis too
    ("embed_in", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("vision_embed", ("fsdp", "sequence")),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_merged", ("fsdp", "sequence")),
    # Activations [B, T, D] between layers and at the splice (MaxText's activation_* rules):
    # T over 'sequence', D whole, so no layer boundary gathers the sequence.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
)

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


def mesh_shape(sizes: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to 'the rest of the devices'; checks the product."""
    if isinstance(sizes, Mapping):
        unknown = set(sizes) - set(AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {AXES}")
        sizes = [sizes.get(a, 1) for a in AXES]
    sizes = list(sizes)
    if len(sizes) != len(AXES):
        raise ValueError(f"mesh needs {len(AXES)} sizes {AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes {sizes} do not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{num_devices} are available")
    return tuple(sizes)


def make_mesh(sizes: Mapping[str, int] | Sequence[int] = (1, -1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all), axes in `AXES` order, GSPMD ('Auto') axis types."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        # Keep the longest prefix of mesh axes whose product divides the dimension.
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    # Trailing Nones trimmed: jit outputs come back that way, and P('x', None) != P('x') as a
    # jit cache key, so untrimmed inputs compile every step function twice.
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(logical_axes, shape, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def variable_sharding(v: nnx.Variable, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The NamedSharding of one variable from its `logical_axes` metadata."""
    axes = tuple(v.get_metadata("logical_axes", None) or ())
    # Stacked (scanned) layers carry their per-layer axes: the extra leading dims are layers.
    axes = ("layers",) * (len(v.shape) - len(axes)) + axes
    return named_sharding(axes, v.shape, mesh, rules)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """A NamedSharding for every variable of `state`."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Moves every parameter of `model` onto `mesh` according to its logical axes (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v[...], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, jax.device_put(values, shardings))
    return model


def create_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Builds `ctor()` with every parameter created directly in its shard (never whole on one
    device), as needed for a model larger than one device's memory."""
    graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(ctor()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_sharded(ctor: Callable[..., Any], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                     *args) -> Any:
    """`ctor(*args)` evaluated abstractly (`nnx.eval_shape`): every variable of the graph node it
    returns is a `jax.ShapeDtypeStruct` carrying the NamedSharding its logical axes give it, as
    `create_sharded` would place it. Nothing is allocated: for compiling (never running) a step
    of a model larger than the host (`jitted.lower(...)`). `args` may be abstract modules (an
    optimizer built over an abstract model)."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor, *args))
    shardings = state_shardings(state, mesh, rules)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state,
        shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def batch_axes(mesh: Mesh, batch: int, rules: Rules = DEFAULT_RULES,
               leading: str = "batch") -> tuple[str, ...] | None:
    """The mesh axes a batch dimension of size `batch` is split over: the `leading` rule's axes
    (longest prefix that divides it), or None. Every batch placement derives from this."""
    spec = logical_to_spec((leading,), (batch,), mesh, rules)
    if not spec or spec[0] is None:
        return None
    return (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])


def activation_spec(mesh: Mesh, shape: Sequence[int], rules: Rules = DEFAULT_RULES
                    ) -> PartitionSpec:
    """Where a [B, T, D] activation lives (the `activation_*` rules): the spec the splice
    produces and every layer boundary is constrained to."""
    return logical_to_spec(ACTIVATION, shape, mesh, rules)


def batch_degree(mesh: Mesh, rules: Rules = DEFAULT_RULES, leading: str = "batch") -> int:
    """How many ways the `leading` rule splits a batch that every axis divides: sequences per
    step of one-per-device micro-batches."""
    target = dict(rules).get(leading) or ()
    axes = (target,) if isinstance(target, str) else tuple(target)
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = DEFAULT_RULES,
                   leading: str = "batch") -> NamedSharding:
    """Sharding of a [B, ...] input: B over the `leading` rule's axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, shape[0], rules, leading)))
