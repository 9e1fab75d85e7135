"""LoRA+ (ALGORITHMS.md 4): Adam(W) with the output-side factor's rate scaled."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_problems as lp
import numpy_reference as ref
from rite_optax import pairs as pairs_lib
from rite_optax.lora_plus import factor_sides
from rite_optax.lora_plus import lora_plus

SHAPES = [(12, 9, 3), (8, 10, 2)]
WEIGHTS = [1.0, 40.0]


# ------------------------------------------------------ the NumPy reference
CASES = {
    "defaults": dict(lr=0.01),
    "ratio_decay_betas": dict(lr=0.01, lr_ratio=4.0, weight_decay=0.1, b1=0.5,
                              b2=0.9, eps=1e-4),
    "ratio_one_is_adamw": dict(lr=0.01, lr_ratio=1.0, weight_decay=0.3),
}


@pytest.mark.parametrize("b_zero", [False, True])
@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference(case, steps, b_zero):
  with jax.enable_x64(True):
    pairs, got, expected = lp.run_with_reference(
        lora_plus, ref.lora_plus_reference, CASES[case], steps, SHAPES, WEIGHTS,
        b_zero=b_zero)
    lp.assert_trajectories_match(got, expected)
    # The step did something (a zero update would agree with a zero update).
    (_, b_end), _ = lp.from_tree(got[-1])
    assert np.abs(b_end - pairs[0][1]).max() > 1e-3


def test_output_side_moves_lr_ratio_times_faster_on_first_step():
  """First Adam step ~ -lr sign(g): B's entries move ~16x as far as A's."""
  tree = lp.to_tree(lp.random_pairs(2, SHAPES), jnp.float32)
  grads = jax.tree.map(lambda x: jnp.where(x > 0, 1.0, -1.0), tree)
  tx = lora_plus(1e-3)
  updates, _ = jax.jit(tx.update)(grads, tx.init(tree), tree)
  for pair in updates.values():
    np.testing.assert_allclose(jnp.abs(pair["lora_a"]), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(jnp.abs(pair["lora_b"]), 16e-3, rtol=1e-5)


def test_not_transformation_invariant():
  """(A, B) and (A S, B S^-T), cond(S) = 1e4, drift apart (as Adam's do)."""
  with jax.enable_x64(True):
    errors, moved = lp.factorization_drift(lora_plus(0.05))
    assert errors[-1] > 1e-2
    assert moved > 0.1


# ------------------------------------------------ sides come from the pairing
def _adam_reference_updates(tree, grads, lr, in_names, out_names, ratio=16.0):
  adam = optax.adam(lr)
  plain, _ = adam.update(grads, adam.init(tree), tree)
  return {k: {**{n: plain[k][n] for n in in_names},
              **{n: ratio * plain[k][n] for n in out_names}} for k in plain}


def test_peft_layout():
  """PEFT: lora_A (r, in) is the input side, lora_B (out, r) the output side."""
  rng = np.random.default_rng(3)
  tree = {"q": {"lora_A": jnp.asarray(rng.standard_normal((3, 7)), jnp.float32),
                "lora_B": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}}
  grads = jax.tree.map(lambda x: jnp.sin(5.0 * x), tree)
  tx = lora_plus(1e-2)
  got, _ = tx.update(grads, tx.init(tree), tree)
  expected = _adam_reference_updates(tree, grads, 1e-2, ["lora_A"], ["lora_B"])
  chex.assert_trees_all_close(got, expected, rtol=1e-6)
  assert factor_sides(tree) == {"q": {"lora_A": "in", "lora_B": "out"}}


def test_pair_spec_names_the_sides():
  """Names the automatic rules do not know, described with a pair_spec."""
  def spec(path, leaf):
    name = path[-1].key
    return pairs_lib.FactorSpec(path[0].key, "in" if name == "down" else "out",
                                rank_axis=1 if name == "down" else 0)

  rng = np.random.default_rng(4)
  tree = {"mlp": {"down": jnp.asarray(rng.standard_normal((7, 3)), jnp.float32),
                  "up": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)}}
  grads = jax.tree.map(lambda x: jnp.cos(5.0 * x), tree)
  tx = lora_plus(1e-2, lr_ratio=8.0, pair_spec=spec)
  got, _ = tx.update(grads, tx.init(tree), tree)
  expected = _adam_reference_updates(tree, grads, 1e-2, ["down"], ["up"],
                                     ratio=8.0)
  chex.assert_trees_all_close(got, expected, rtol=1e-6)
  with pytest.raises(ValueError, match=r"params\['mlp'\]\['down'\]"):
    lora_plus(1e-2).init(tree)  # without the spec nothing is recognised


def test_non_lora_leaf_raises_with_its_path():
  tree = dict(lp.to_tree(lp.random_pairs(5, SHAPES), jnp.float32),
              bias=jnp.zeros(3))
  with pytest.raises(ValueError, match=r"params\['bias'\]"):
    lora_plus(0.1).init(tree)


# -------------------------------------------- optax and JAX integration
class IntegrationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_variants_match_reference(self):
    """tx.update itself, jitted or not, against the reference with fixed
    gradients."""
    with jax.enable_x64(True):
      pairs = lp.random_pairs(8, SHAPES)
      grads = [(np.sin(3.0 * a), np.cos(2.0 * b)) for a, b in pairs]
      expected = ref.lora_plus_reference(pairs, lambda _: grads, 2, lr=0.1,
                                         weight_decay=0.1)
      tx = lora_plus(0.1, weight_decay=0.1)
      got, state = lp.run_with_grads(self.variant(tx.update), tx, pairs, grads,
                                     2)
      lp.assert_trajectories_match(got, expected)
      chex.assert_tree_all_finite(state)

  def test_schedule_and_inject_hyperparams(self):
    """A schedule equals injecting its value each step; lr_ratio can be
    injected too."""
    with jax.enable_x64(True):
      tree = lp.to_tree(lp.random_pairs(9, SHAPES))
      loss = lp.tree_loss([jnp.asarray(t) for t in lp.targets(9, SHAPES)],
                          WEIGHTS)
      scheduled, injected, constant = lp.schedule_runs(lora_plus, tree, loss,
                                                       weight_decay=0.1)
      for got, expected in zip(injected, scheduled, strict=True):
        chex.assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)
      self.assertGreater(lp.relative_error(lp.products(constant[-1])[0],
                                           lp.products(scheduled[-1])[0]), 1e-3)

      # Injected lr_ratio: one first step, against a fresh lora_plus.
      injected = optax.inject_hyperparams(lora_plus)(learning_rate=0.1,
                                                     weight_decay=0.1)
      update = jax.jit(injected.update)
      grads = lp.grads_like(tree, 1, dtype=jnp.float32)
      state = injected.init(tree)
      state.hyperparams["lr_ratio"] = jnp.asarray(2.0)
      got, _ = update(grads, state, tree)
      plain = lora_plus(0.1, lr_ratio=2.0, weight_decay=0.1)
      expected, _ = jax.jit(plain.update)(grads, plain.init(tree), tree)
      chex.assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)
      default, _ = jax.jit(injected.update)(grads, injected.init(tree), tree)
      self.assertGreater(float(jnp.abs(default["pair_0"]["lora_b"]
                                       - got["pair_0"]["lora_b"]).max()), 1e-2)

  def test_bfloat16_params(self):
    tree32 = lp.to_tree(lp.random_pairs(10, SHAPES), jnp.float32)
    up32 = lp.check_bfloat16_step(lora_plus(0.01, weight_decay=0.1), tree32,
                                  lp.grads_like(tree32, 0), atol=1e-4)
    self.assertGreater(float(jnp.abs(up32["pair_0"]["lora_b"]).max()), 0.1)


def test_nnx_optimizer_train_step_reduces_loss():
  """LoRA+ as the tx of nnx.Optimizer over nnx.LoRAParam, in nnx.jit."""
  from flax import nnx

  model = nnx.LoRALinear(6, 5, lora_rank=3, rngs=nnx.Rngs(0))
  losses, base_unchanged = lp.nnx_train(model, lora_plus(0.003), 40)
  assert losses[-1] < 0.8 * losses[0]
  assert base_unchanged
