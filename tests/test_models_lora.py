"""LoRA injection, freezing and merging on a small NNX model."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import rite_optax
from rite_optax.models import FROZEN, TRAINABLE, LoRADense, inject_lora, merge_lora


class Block(nnx.Module):
  def __init__(self, rngs, dtype=jnp.float32):
    self.q = nnx.Linear(8, 12, use_bias=False, param_dtype=dtype, rngs=rngs)
    self.o = nnx.Linear(12, 8, use_bias=False, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return x + self.o(jnp.tanh(self.q(x)))


class Model(nnx.Module):
  def __init__(self, rngs, dtype=jnp.float32):
    self.layers = nnx.List([Block(rngs, dtype) for _ in range(3)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def _model():
  return Model(nnx.Rngs(0))


def test_injection_wraps_matching_layers_and_starts_at_the_base_model():
  model = _model()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  base = model(x)
  wrapped = inject_lora(model, rank=2, alpha=4.0, targets=r"/q$",
                        rngs=nnx.Rngs(1))
  assert wrapped == ["layers/0/q", "layers/1/q", "layers/2/q"]
  assert isinstance(model.layers[1].q, LoRADense)
  assert isinstance(model.layers[1].o, nnx.Linear)
  chex.assert_trees_all_equal(model(x), base)  # B = 0: exactly the base
  pairs = rite_optax.find_pairs(nnx.state(model, TRAINABLE)).pairs
  assert [p.name for p in pairs] == [f"params['layers'][{i}]['q']" for i in range(3)]
  assert model.layers[0].q.scale == 2.0


@jax.enable_x64(True)
def test_merge_equals_the_adapted_model():
  # float64: float32 rounding of W + s A B^T against x W + s (x A) B^T is of
  # the order of the tolerance itself (1.5e-6 measured on one entry), and
  # the test is about the merge, not about float32.
  model = Model(nnx.Rngs(0), jnp.float64)
  inject_lora(model, 2, 4.0, [r"/q$", r"/o$"], nnx.Rngs(1))
  for layer in model.layers:
    for proj in (layer.q, layer.o):
      proj.lora_b[...] = 0.3 * jax.random.normal(
          jax.random.PRNGKey(2), proj.lora_b.shape, proj.lora_b.dtype)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8), jnp.float64)
  adapted = model(x)
  assert float(jnp.abs(adapted - Model(nnx.Rngs(0), jnp.float64)(x)).max()
               ) > 1e-3
  assert len(merge_lora(model)) == 6
  assert not nnx.state(model, TRAINABLE)  # no adapters left
  chex.assert_trees_all_close(model(x), adapted, rtol=1e-5, atol=1e-6)


def test_training_moves_only_the_factors():
  model = _model()
  inject_lora(model, 2, 2.0, r"/q$", nnx.Rngs(1))
  frozen_before = nnx.clone(nnx.state(model, FROZEN))
  optimizer = nnx.Optimizer(model, rite_optax.lora_rite(0.05), wrt=TRAINABLE)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 8))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - 1.0) ** 2),
        argnums=nnx.DiffState(0, TRAINABLE))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < losses[0]
  chex.assert_trees_all_equal(nnx.as_pure(frozen_before),
                              nnx.as_pure(nnx.state(model, FROZEN)))


def test_no_match_names_the_linear_layers():
  with pytest.raises(ValueError, match=r"no nnx.Linear matches \['mlp'\]; the "
                     r"model's linear layers are: layers/0/o, layers/0/q, layers/1/o"):
    inject_lora(_model(), 2, 2.0, "mlp", nnx.Rngs(1))


def test_factors_inherit_the_base_logical_axes():
  with nnx.use_eager_sharding(False):
    layer = nnx.Linear(8, 12, use_bias=False, rngs=nnx.Rngs(0),
                       kernel_init=nnx.with_partitioning(
                           nnx.initializers.lecun_normal(), ("embed", "mlp")))
  adapted = LoRADense(layer, 2, 2.0, rngs=nnx.Rngs(1))
  assert adapted.lora_a.get_metadata()["out_sharding"] == ("embed", None)
  assert adapted.lora_b.get_metadata()["out_sharding"] == (None, "mlp")
