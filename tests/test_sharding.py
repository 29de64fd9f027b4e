"""Sharded forwards on 8 fake CPU devices equal the single-device forward (fsdp, tensor, both)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import rel_err

from longrl_jax.models import VLM, ModelConfig, hf
from longrl_jax.models.config import LLMConfig, VisionConfig
from longrl_jax.parallel import mesh as mesh_lib

MESHES = {"fsdp8": {"fsdp": 8}, "tensor8": {"tensor": 8}, "fsdp2_tensor4": {"fsdp": 2, "tensor": 4},
          "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}


def _cfg():
    # 8 query / 4 kv heads: tensor=8 must replicate the kv heads (4 does not divide by 8).
    llm = LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=8, num_kv_heads=4, head_dim=8, tie_word_embeddings=False)
    return ModelConfig(llm=llm).with_vision(VisionConfig(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=16,
        patch_size=4))


@pytest.fixture(scope="module")
def reference():
    assert jax.device_count() == 8, "conftest must set 8 fake devices before jax loads"
    model = VLM(_cfg(), rngs=nnx.Rngs(7))
    _perturb(model)
    return model


def _perturb(model):
    key = jax.random.key(1)
    for _path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, sub = jax.random.split(key)
        var[...] = var[...] + 0.05 * jax.random.normal(sub, var.shape)


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_forward_equals_single_device(reference, name):
    mesh = mesh_lib.make_mesh(MESHES[name])
    sharded = VLM(_cfg(), rngs=nnx.Rngs(7))
    nnx.update(sharded, jax.tree.map(np.asarray, nnx.state(reference)))
    mesh_lib.shard_model(sharded, mesh)
    specs = {k: v[...].sharding.spec for k, v in nnx.to_flat_state(nnx.state(sharded))}
    assert any(any(a is not None for a in s) for s in specs.values()), "nothing was sharded"

    ids = np.random.RandomState(0).randint(0, 128, (8, 24))
    frames = np.random.RandomState(1).randn(8, 16, 16, 3).astype(np.float32)
    ref_logits = reference.llm(jnp.asarray(ids))
    ref_video = reference.encode_video(jnp.asarray(frames))

    @nnx.jit
    def fwd(model, ids, frames):
        return model.llm(ids), model.encode_video(frames)

    ids_s = jax.device_put(ids, mesh_lib.batch_sharding(mesh, ids.shape))
    frames_s = jax.device_put(frames, mesh_lib.batch_sharding(mesh, frames.shape, leading="frames"))
    logits, video = fwd(sharded, ids_s, frames_s)
    assert rel_err(logits, ref_logits) < 1e-5
    assert rel_err(video, ref_video) < 1e-5


def test_create_sharded_places_params_in_shards():
    mesh = mesh_lib.make_mesh({"fsdp": 2, "tensor": 4})
    model = mesh_lib.create_sharded(lambda: VLM(_cfg(), rngs=nnx.Rngs(0)), mesh)
    q = model.llm.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (32, 2, 8)
    # Same values as an eager init (the jitted sampler may differ in the last ulp).
    ref = VLM(_cfg(), rngs=nnx.Rngs(0))
    assert rel_err(q, ref.llm.layers[0].self_attn.q_proj.kernel[...]) < 1e-6


def test_load_pretrained_onto_mesh(tmp_path):
    from hf_fixtures import qwen2_hf
    qwen2_hf(heads=8, kv=2, hidden=64, inter=96).save_pretrained(tmp_path)
    mesh = mesh_lib.make_mesh({"fsdp": 4, "tensor": 2})
    model = hf.load_pretrained(str(tmp_path), mesh=mesh)
    k = model.llm.layers[0].self_attn.k_proj.kernel[...]
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    plain = hf.load_pretrained(str(tmp_path))
    ids = jnp.asarray(np.arange(40).reshape(2, 20) % 97)
    assert rel_err(nnx.jit(lambda m, x: m.llm(x))(model, ids), plain.llm(ids)) < 1e-5
