"""The registry and the public invariance measurement. What every registered
optimizer must do is tests/test_optimizer_contract.py."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rite_optax


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {f"layer_{i}": {"lora_a": jnp.asarray(rng.standard_normal((m, r)), dtype),
                         "lora_b": jnp.asarray(rng.standard_normal((r, n)), dtype)}
          for i, (m, n, r) in enumerate([(16, 12, 4), (10, 14, 2)])}


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match=re.escape(
      "unknown optimizer 'rite'; valid names: adam, adamw, lamb, shampoo, "
      "lora_plus, scaled_gd, scaled_adamw, lora_pro, lora_rite")):
    rite_optax.get_optimizer("rite", 1e-3)


def test_unknown_hyperparameter_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"lora_rite has no hyperparameter beta1; "
                     r"valid: b1, b2, eps, clip_unmagnified_grad"):
    rite_optax.get_optimizer("lora_rite", 1e-3, beta1=0.9)


def test_missing_required_hyperparameter():
  with pytest.raises(ValueError, match="lora_pro needs scale"):
    rite_optax.get_optimizer("lora_pro", 1e-3)


def test_registry_passes_hyperparameters_through():
  params = _params()
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  a = rite_optax.get_optimizer("lora_rite", 0.1, escape=True, b1=0.5)
  b = rite_optax.lora_rite(0.1, escape=True, b1=0.5)
  chex.assert_trees_all_close(a.update(grads, a.init(params), params)[0],
                              b.update(grads, b.init(params), params)[0])


# Measured by invariance_gap, in float64, transform of condition number 1e4.
INVARIANT = {
    "lora_rite": ({}, True),
    "scaled_gd": ({"reg": 0.0, "learning_rate": 0.5}, True),
    "scaled_adamw": ({}, False),
    "lora_plus": ({"learning_rate": 1e-3}, False),
    "adam": ({}, False),
    "lora_pro": ({"scale": 1.0}, False),
    "shampoo": ({}, False),
    "lamb": ({}, False),
}


@pytest.mark.parametrize("name", sorted(INVARIANT))
def test_invariance_gap_classifies_the_methods(name):
  hp, invariant = INVARIANT[name]
  hp = dict(hp)
  with jax.enable_x64(True):
    tx = rite_optax.get_optimizer(name, hp.pop("learning_rate", 1e-2), **hp)
    gap = rite_optax.invariance_gap(tx, _params(jnp.float64), steps=50)
  if invariant:
    assert gap < 1e-8
  else:
    assert gap > 1e-2


def test_invariance_gap_transform_keeps_products_and_conditioning():
  with jax.enable_x64(True):
    params = _params(jnp.float64)
    moved = rite_optax.invariance.transform_factors(params, jax.random.PRNGKey(3),
                                                    cond=1e4)
    for p, q in zip(rite_optax.invariance.lora_products(params),
                    rite_optax.invariance.lora_products(moved)):
      np.testing.assert_allclose(q, p, rtol=1e-9, atol=1e-9)
    s = np.linalg.lstsq(np.asarray(params["layer_0"]["lora_a"]),
                        np.asarray(moved["layer_0"]["lora_a"]), rcond=None)[0]
    assert np.linalg.cond(s) == pytest.approx(1e4, rel=1e-3)


def test_invariance_gap_is_zero_for_a_zero_learning_rate_and_works_on_stacks():
  """Sanity of the measurement itself, on stacked layers (batch axes)."""
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    params = {"lora_a": jnp.asarray(rng.standard_normal((3, 8, 2))),
              "lora_b": jnp.asarray(rng.standard_normal((3, 2, 6)))}
    assert rite_optax.invariance_gap(optax.sgd(0.0), params, steps=3) < 1e-10
    assert rite_optax.invariance_gap(optax.sgd(0.05), params, steps=3) > 1e-3
    assert rite_optax.invariance_gap(rite_optax.lora_rite(0.05), params,
                                     steps=10) < 1e-8


def test_invariance_gap_reports_a_run_that_turns_non_finite_as_nan():
  """A run whose products become NaN is no invariant one: max() over the
  steps would keep the finite gap of the steps before."""
  def nan_after(n):
    def update(updates, count, params=None):
      del params
      scale = jnp.where(count >= n, jnp.nan, -0.05)
      return jax.tree.map(lambda g: scale * g, updates), count + 1
    return optax.GradientTransformation(lambda _: jnp.zeros([], jnp.int32),
                                        update)

  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    params = {"lora_a": jnp.asarray(rng.standard_normal((8, 2))),
              "lora_b": jnp.asarray(rng.standard_normal((2, 6)))}
    assert np.isfinite(rite_optax.invariance_gap(nan_after(10), params,
                                                 steps=3))
    assert np.isnan(rite_optax.invariance_gap(nan_after(2), params, steps=3))

