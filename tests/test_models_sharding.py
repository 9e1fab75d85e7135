"""Logical-axis sharding of the models on a (data, fsdp, tensor) mesh."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from rite_optax.models import inject_lora
from rite_optax.models import gemma as gemma_lib
from rite_optax.models import gemma_loader
from rite_optax.models import sharding


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated CPU devices of conftest.py")
  return sharding.make_mesh(data=2, fsdp=2, tensor=2)


def _spec(variable):
  return variable[...].sharding.spec


def test_make_mesh(mesh):
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3


def test_parameters_follow_the_rules(mesh):
  model = gemma_lib.Gemma(gemma_lib.tiny_gemma2(), rngs=nnx.Rngs(0))
  inject_lora(model, 4, 8.0, gemma_lib.lora_targets(), nnx.Rngs(1))
  sharding.shard_model(model, mesh)
  layer = model.layers[1]
  assert _spec(model.embedder.embedding) == P("tensor", "fsdp")
  assert _spec(layer.attn.q.base.kernel) == P("fsdp", "tensor")
  assert _spec(layer.attn.k.base.kernel) == P("fsdp", "tensor")  # kv_heads
  assert _spec(layer.attn.o.base.kernel) == P("tensor", "fsdp")
  assert _spec(layer.mlp.gate.base.kernel) == P("fsdp", "tensor")
  assert _spec(layer.mlp.down.base.kernel) == P("tensor", "fsdp")
  # The adapters follow their base kernel's long axes: lora_a is 'embed'.
  assert _spec(layer.attn.q.lora_a) == P("fsdp", None)
  assert _spec(layer.attn.q.lora_b) == P(None, "tensor")
  assert _spec(layer.mlp.down.lora_a) == P("tensor", None)
  assert _spec(layer.mlp.down.lora_b) == P(None, "fsdp")
  for norm in (model.final_norm, layer.pre_attention_norm,
               layer.post_ffw_norm):
    assert norm.scale[...].sharding.is_fully_replicated
  # Really split: a (64, 64) q kernel holds (32, 32) per device.
  shard = layer.attn.q.base.kernel[...].addressable_shards[0]
  assert shard.data.shape == (32, 32)


@pytest.mark.parametrize("config", [gemma_lib.tiny(), gemma_lib.tiny_gemma2()],
                         ids=["gemma", "gemma2"])
def test_sharded_forward_equals_unsharded(mesh, config):
  model = gemma_lib.Gemma(config, rngs=nnx.Rngs(0))
  inject_lora(model, 4, 8.0, gemma_lib.lora_targets(), nnx.Rngs(1))
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "lora_b"):
      module.lora_b[...] = 0.05 * jnp.ones(module.lora_b.shape)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 12), 0, 256)
  mask = jnp.arange(12)[None] >= jnp.array([[0], [2], [0], [5]])
  forward = nnx.jit(lambda m, t, a: m(t, attention_mask=a))
  expected = forward(model, tokens, mask)
  sharding.shard_model(model, mesh)
  inputs = jax.device_put((tokens, mask), sharding.batch_sharding(mesh))
  logits = forward(model, *inputs)
  assert len(logits.sharding.device_set) == 8
  chex.assert_trees_all_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_indivisible_axes_are_replicated(mesh):
  # vocab 257 and a single kv head of 16 on tensor=2 (16 divides; 257 not).
  config = gemma_lib.tiny(vocab_size=257)
  abstract = nnx.eval_shape(lambda: gemma_lib.Gemma(config, rngs=nnx.Rngs(0)))
  shardings = sharding.model_shardings(abstract, mesh)
  assert shardings["embedder"]["embedding"].get_value().spec == P(None, "fsdp")
  assert shardings["layers"][0]["attn"]["k"]["kernel"].get_value().spec == P(
      "fsdp", "tensor")
  three = sharding.make_mesh(data=1, fsdp=2, tensor=3,
                             devices=jax.devices()[:6])
  shardings = sharding.model_shardings(abstract, three)
  # heads 4 * 16 = 64 and mlp 128 do not split in 3: replicated there.
  assert shardings["layers"][0]["attn"]["q"]["kernel"].get_value().spec == P(
      "fsdp", None)
  assert shardings["layers"][0]["mlp"]["down"]["kernel"].get_value().spec == P(
      None, "fsdp")


def test_shardings_of_a_large_abstract_model():
  # A mesh and a 2B-parameter model that are never materialised.
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  config = gemma_lib.gemma_2b(num_layers=2)
  abstract = nnx.eval_shape(lambda: gemma_lib.Gemma(config, rngs=nnx.Rngs(0)))
  shardings = sharding.model_shardings(nnx.state(abstract), mesh)
  layer = shardings["layers"][1]
  assert layer["attn"]["q"]["kernel"].get_value().spec == P("fsdp", "tensor")
  assert layer["attn"]["k"]["kernel"].get_value().spec == P("fsdp", "tensor")
  assert shardings["embedder"]["embedding"].get_value().spec == P(
      "tensor", "fsdp")
  # The tree has the state's structure, for jax.jit(out_shardings=...).
  assert (jax.tree.structure(shardings)
          == jax.tree.structure(nnx.state(abstract)))


def test_custom_rules():
  mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
  config = gemma_lib.tiny()
  abstract = nnx.eval_shape(lambda: gemma_lib.Gemma(config, rngs=nnx.Rngs(0)))
  rules = dict(sharding.LOGICAL_RULES)
  rules.update(embed=None, mlp="fsdp", heads="fsdp")
  shardings = sharding.model_shardings(abstract, mesh, tuple(rules.items()))
  assert shardings["layers"][0]["mlp"]["up"]["kernel"].get_value().spec == P(
      None, "fsdp")
  assert shardings["layers"][0]["attn"]["o"]["kernel"].get_value().spec == P(
      "fsdp", None)
  assert shardings["final_norm"]["scale"].get_value().is_fully_replicated


def test_loading_onto_a_mesh(mesh):
  config = gemma_lib.tiny()
  model = gemma_lib.Gemma(config, rngs=nnx.Rngs(0))
  params = gemma_loader.params_from_gemma_checkpoint(
      gemma_loader.gemma_checkpoint_params(model), config)
  loaded = gemma_loader.model_from_params(config, params, mesh)
  assert _spec(loaded.layers[0].mlp.up.kernel) == P("fsdp", "tensor")
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(loaded)),
                              nnx.to_pure_dict(nnx.state(model)))
