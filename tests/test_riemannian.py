"""Riemannian preconditioned LoRA (ALGORITHMS.md 2): scaled GD and scaled AdamW."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_problems as lp
import numpy_reference as ref
from rite_optax import riemannian

SHAPES = [(12, 9, 3), (8, 10, 2)]
WEIGHTS = [1.0, 40.0]


def _run_both(make_tx, reference, hp, steps, seed=1, b_zero=False):
  """Our optimizer and the NumPy reference from the same start, float64."""
  return lp.run_with_reference(make_tx, reference, hp, steps, SHAPES, WEIGHTS,
                               seed=seed, b_zero=b_zero)


def _moved(pairs, tree):
  """How far every factor moved: the smallest relative change."""
  return min(lp.relative_error(x, x0) for (a, b), (a0, b0) in
             zip(lp.from_tree(tree), pairs) for x, x0 in ((a, a0), (b, b0))
             if np.linalg.norm(x0) > 0)


# ------------------------------------------------------ the NumPy reference
GD_CASES = {
    "defaults": dict(lr=0.5),
    "reg_and_decay": dict(lr=0.5, reg=0.3, weight_decay=0.1),
    "no_reg": dict(lr=0.5, reg=0.0),
}


@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("case", sorted(GD_CASES))
def test_scaled_gd_matches_numpy_reference(case, steps):
  with jax.enable_x64(True):
    pairs, got, expected = _run_both(riemannian.scaled_gd,
                                     ref.scaled_gd_reference,
                                     GD_CASES[case], steps)
    lp.assert_trajectories_match(got, expected)
    assert _moved(pairs, got[-1]) > 1e-4  # a zero update would not match


ADAMW_CASES = {
    "defaults": dict(lr=0.01),
    "correct_bias": dict(lr=0.01, correct_bias=True),
    "sequential": dict(lr=0.01, sequential=True),
    "sequential_bias_decay": dict(lr=0.02, sequential=True, correct_bias=True,
                                  weight_decay=0.5, reg=0.1),
    "other_betas": dict(lr=0.01, b1=0.5, b2=0.9, eps=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("case", sorted(ADAMW_CASES))
def test_scaled_adamw_matches_numpy_reference(case, steps):
  with jax.enable_x64(True):
    pairs, got, expected = _run_both(riemannian.scaled_adamw,
                                     ref.scaled_adamw_reference,
                                     ADAMW_CASES[case], steps)
    lp.assert_trajectories_match(got, expected)
    assert _moved(pairs, got[-1]) > 1e-4


@pytest.mark.parametrize("sequential", [False, True])
def test_scaled_adamw_from_lora_init_matches_reference(sequential):
  """B = 0: A's gradient is zero; B's is preconditioned by A (or A's step)."""
  with jax.enable_x64(True):
    pairs, got, expected = _run_both(
        riemannian.scaled_adamw, ref.scaled_adamw_reference,
        dict(lr=0.01, weight_decay=0.5, sequential=sequential), 5, seed=2,
        b_zero=True)
    lp.assert_trajectories_match(got, expected)
    (a1, b1), _ = lp.from_tree(got[0])
    assert np.abs(b1).max() > 1e-3
    # Weight decay alone moves A on the first step.
    np.testing.assert_allclose(a1, (1 - 0.01 * 0.5) * pairs[0][0], rtol=1e-12)


def test_sequential_differs_from_simultaneous():
  """The option changes B's step (so the tests above can tell them apart)."""
  with jax.enable_x64(True):
    _, seq, _ = _run_both(riemannian.scaled_adamw, ref.scaled_adamw_reference,
                          dict(lr=0.05, sequential=True), 1)
    _, sim, _ = _run_both(riemannian.scaled_adamw, ref.scaled_adamw_reference,
                          dict(lr=0.05), 1)
    (a_seq, b_seq), _ = lp.from_tree(seq[0])
    (a_sim, b_sim), _ = lp.from_tree(sim[0])
    np.testing.assert_array_equal(a_seq, a_sim)
    assert lp.relative_error(b_seq, b_sim) > 1e-4


# ----------------------------------------------------------------- invariance
def test_scaled_gd_without_reg_is_transformation_invariant():
  """(A, B) and (A S, B S^-T), cond(S) = 1e4: identical products for 50 steps."""
  with jax.enable_x64(True):
    errors, moved = lp.factorization_drift(riemannian.scaled_gd(5.0, reg=0.0))
    assert all(err < 1e-8 for err in errors)
    assert moved > 0.1  # the products really moved
    # The ridge breaks it for such a badly scaled start (the test can tell).
    errors, _ = lp.factorization_drift(riemannian.scaled_gd(5.0))
    assert errors[-1] > 1e-2


@pytest.mark.parametrize("sequential", [False, True])
def test_scaled_adamw_is_not_transformation_invariant(sequential):
  with jax.enable_x64(True):
    errors, moved = lp.factorization_drift(
        riemannian.scaled_adamw(0.05, reg=0.0, sequential=sequential))
    assert errors[-1] > 1e-2
    assert moved > 0.1


# ------------------------------------------------------------ preconditioner
def test_preconditioner_is_stateless_and_uses_the_other_gram():
  with jax.enable_x64(True):
    pairs = lp.random_pairs(3, SHAPES)
    tree = lp.to_tree(pairs)
    grads = jax.tree.map(lambda x: jnp.sin(3.0 * x), tree)
    tx = riemannian.scale_by_riemannian_preconditioner(reg=0.2)
    state = tx.init(tree)
    assert state == optax.EmptyState()
    scaled, _ = jax.jit(tx.update)(grads, state, tree)
    for i, ((a, b), (ga, gb)) in enumerate(zip(pairs, lp.from_tree(grads))):
      inv_b = np.linalg.inv(b.T @ b + 0.2 * np.eye(b.shape[1]))
      inv_a = np.linalg.inv(a.T @ a + 0.2 * np.eye(a.shape[1]))
      got = scaled[f"pair_{i}"]
      np.testing.assert_allclose(got["lora_a"], ga @ inv_b, rtol=1e-12)
      np.testing.assert_allclose(got["lora_b"], (gb @ inv_a).T, rtol=1e-12)


def test_stacked_layers_equal_a_loop_over_layers():
  stacked, looped, grads = lp.stacked_layers(3, layers=4, m=10, n=7, r=3)
  tx = riemannian.scaled_adamw(0.1, sequential=True, weight_decay=0.1)
  s_state, l_state = tx.init(stacked), tx.init(looped)
  update = jax.jit(tx.update)
  for s_grads, l_grads in grads:
    s_up, s_state = update(s_grads, s_state, stacked)
    l_up, l_state = update(l_grads, l_state, looped)
    lp.assert_stacked_equals_looped(s_up, l_up, rtol=2e-5, atol=1e-7)
  assert float(jnp.abs(s_up["lora_b"]).max()) > 1e-3


# -------------------------------------------- optax and JAX integration
class IntegrationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_variants_match_reference(self):
    """tx.update itself, jitted or not, against the reference with fixed
    gradients."""
    with jax.enable_x64(True):
      pairs = lp.random_pairs(8, SHAPES)
      grads = [(np.sin(3.0 * a), np.cos(2.0 * b)) for a, b in pairs]
      expected = ref.scaled_adamw_reference(
          pairs, lambda _: grads, 2, lr=0.1, sequential=True, weight_decay=0.1)
      tx = riemannian.scaled_adamw(0.1, sequential=True, weight_decay=0.1)
      got, state = lp.run_with_grads(self.variant(tx.update), tx, pairs, grads,
                                     2)
      lp.assert_trajectories_match(got, expected)
      chex.assert_tree_all_finite(state)

  def test_inject_hyperparams(self):
    tree = lp.to_tree(lp.random_pairs(9, SHAPES), jnp.float32)
    grads = lp.grads_like(tree, 0)
    for make in (riemannian.scaled_gd, riemannian.scaled_adamw):
      kwargs = {"sequential": True} if make is riemannian.scaled_adamw else {}
      injected = optax.inject_hyperparams(make)(learning_rate=0.1, **kwargs)
      update = jax.jit(injected.update)
      state = injected.init(tree)
      at_init, _ = update(grads, state, tree)
      state.hyperparams["learning_rate"] = jnp.asarray(0.05)
      got, state = update(grads, state, tree)
      half = make(0.05, **kwargs)
      expected, _ = jax.jit(half.update)(grads, half.init(tree), tree)
      chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-8)
      # The injected rate was used (the comparison above can fail).
      self.assertGreater(float(jnp.abs(got["pair_0"]["lora_a"]
                                       - at_init["pair_0"]["lora_a"]).max()),
                         1e-4)
      # A traced reg of 0 is fine for full-rank factors.
      state.hyperparams["reg"] = jnp.asarray(0.0)
      got, _ = update(grads, state, tree)
      chex.assert_tree_all_finite(got)

  def test_sequential_schedule_is_evaluated_at_each_step(self):
    """A schedule gives the same steps as injecting its value at each step,
    both in the learning rate and inside B's sequential preconditioner."""
    with jax.enable_x64(True):
      tree = lp.to_tree(lp.random_pairs(10, SHAPES))
      loss = lp.tree_loss([jnp.asarray(t) for t in lp.targets(10, SHAPES)],
                          WEIGHTS)
      scheduled, injected, constant = lp.schedule_runs(
          riemannian.scaled_adamw, tree, loss, sequential=True,
          weight_decay=0.1)
      for got, expected in zip(injected, scheduled, strict=True):
        chex.assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)
      self.assertGreater(lp.relative_error(lp.products(constant[-1])[0],
                                           lp.products(scheduled[-1])[0]), 1e-3)

  def test_bfloat16_params(self):
    tree32 = lp.to_tree(lp.random_pairs(11, SHAPES), jnp.float32)
    for tx in (riemannian.scaled_gd(0.1),
               riemannian.scaled_adamw(0.1, sequential=True)):
      up32 = lp.check_bfloat16_step(tx, tree32, lp.grads_like(tree32, 0),
                                    atol=1e-3)
      self.assertGreater(float(jnp.abs(up32["pair_0"]["lora_a"]).max()), 1e-3)

  def test_update_without_params_raises(self):
    tree = lp.to_tree(lp.random_pairs(12, SHAPES), jnp.float32)
    for tx in (riemannian.scaled_gd(0.1), riemannian.scaled_adamw(0.1)):
      with self.assertRaisesRegex(ValueError, "needs params"):
        tx.update(tree, tx.init(tree))

  def test_non_lora_leaf_raises_with_its_path(self):
    tree = dict(lp.to_tree(lp.random_pairs(13, SHAPES), jnp.float32),
                bias=jnp.zeros(3))
    with self.assertRaisesRegex(ValueError, r"params\['bias'\]"):
      riemannian.scaled_adamw(0.1).init(tree)


def test_nnx_optimizer_train_step_reduces_loss():
  """Scaled AdamW as the tx of nnx.Optimizer over nnx.LoRAParam, in nnx.jit."""
  from flax import nnx

  model = nnx.LoRALinear(6, 5, lora_rank=3, rngs=nnx.Rngs(0))
  losses, base_unchanged = lp.nnx_train(model, riemannian.scaled_adamw(0.01),
                                        40)
  assert losses[-1] < 0.8 * losses[0]
  assert base_unchanged
