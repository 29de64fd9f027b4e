import jax
import pytest
from jax.sharding import PartitionSpec as P

from longrl_jax.parallel import mesh as mesh_lib


def test_mesh_shape_resolves_the_rest():
    assert mesh_lib.mesh_shape({"fsdp": -1, "tensor": 2}, 8) == (1, 4, 1, 2)
    assert mesh_lib.mesh_shape((2, 1, -1, 1), 8) == (2, 1, 4, 1)
    mesh = mesh_lib.make_mesh({"sequence": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "sequence": jax.device_count(), "tensor": 1}


@pytest.mark.parametrize("sizes,match", [
    ({"fsdp": 3}, "needs 3 devices"), ({"fsdp": -1, "tensor": -1}, "at most one"),
    ({"fsdp": 3, "tensor": -1}, "do not divide"), ({"model": 2}, "unknown mesh axes"),
    ({"fsdp": 0}, "positive"),
])
def test_bad_mesh_sizes_are_named(sizes, match):
    with pytest.raises(ValueError, match=match):
        mesh_lib.mesh_shape(sizes, 8)


def test_logical_rules_respect_divisibility_and_reuse():
    mesh = mesh_lib.make_mesh({"fsdp": 2, "tensor": 4})
    spec = mesh_lib.logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh)
    assert spec == P("fsdp", "tensor")
    # 2 kv heads do not divide by 4: replicated, not an error.
    assert mesh_lib.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == \
        P("fsdp")
    # one mesh axis is never used twice in a parameter
    rules = (("a", "tensor"), ("b", "tensor"))
    assert mesh_lib.logical_to_spec(("a", "b"), (8, 8), mesh, rules) == P("tensor")
    # a multi-axis rule keeps the prefix that divides
    rules = (("batch", ("fsdp", "tensor")),)
    assert mesh_lib.logical_to_spec(("batch",), (8,), mesh, rules) == P(("fsdp", "tensor"))
    assert mesh_lib.logical_to_spec(("batch",), (6,), mesh, rules) == P("fsdp")
