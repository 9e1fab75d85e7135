"""LoRA-RITE (ALGORITHMS.md 1): invariance, a NumPy reference, and robustness."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_problems as lp
import numpy_reference as ref
import rite_optax

SHAPES = [(12, 9, 3), (8, 10, 2)]


# ----------------------------------------------------------------- invariance
@pytest.mark.parametrize("escape", [False, True])
def test_products_invariant_to_ill_conditioned_factor_transform(escape):
  """(A, B) and (A S, B S^-T), cond(S) = 1e4: identical products for 50 steps."""
  with jax.enable_x64(True):
    errors, moved = lp.factorization_drift(
        rite_optax.lora_rite(0.05, escape=escape))
    assert all(err < 1e-8 for err in errors)
    assert moved > 0.1  # the test can tell: the products really moved


def test_adam_is_not_invariant():
  """The same measurement on Adam shows a large drift (the test can tell)."""
  with jax.enable_x64(True):
    errors, _ = lp.factorization_drift(optax.adam(0.05))
    assert errors[-1] > 1e-2


@pytest.mark.parametrize("cond", [1e2, 1e4])
def test_products_invariant_in_float32(cond):
  """The invariance in float32, to a tolerance set by float32 rounding.

  A factor of the transformed run has condition number ~ cond(S) cond(A), so
  its unmagnified gradient (1.3) carries a relative rounding error of about
  eps32 cond(S) at every step: that is inherent to any orthonormalization,
  Householder QR included. The errors of successive steps are independent
  and add up like a random walk, so after ``steps`` steps the products differ
  by about eps32 cond(S) sqrt(steps) at most. Measured (3 seeds, 50 steps,
  cond 1e1-1e4): 0.3 to 1.9 eps32 cond(S), i.e. 1/4 to 1/20 of this bound;
  Adam's drift is 1e3 to 1e5 times larger.
  """
  steps = 50
  tol = float(jnp.finfo(jnp.float32).eps) * cond * np.sqrt(steps)
  errors, moved = lp.factorization_drift(rite_optax.lora_rite(0.05),
                                         steps=steps, cond=cond)
  assert max(errors) < tol
  assert moved > 0.1
  adam_errors, _ = lp.factorization_drift(optax.adam(0.05), steps=steps,
                                          cond=cond)
  assert max(adam_errors) > 100 * tol


def _drift_from_exact_transform(tx, dtype, exponents, seed=0, steps=50,
                                shape=(12, 9, 3)):
  """Largest relative difference of the products of runs from ``(A, B)`` and
  ``(A S, B S^-T)`` with ``S`` a permutation times ``diag(2^-exponents)``:
  exact in any floating-point format, so both runs start from the same
  product to the last bit."""
  pairs = lp.random_pairs(seed, [shape])
  perm = np.eye(shape[2])[np.random.default_rng(seed).permutation(shape[2])]
  s = perm @ np.diag(2.0 ** -np.asarray(exponents, float))
  transformed = [(a @ s, b @ np.linalg.inv(s).T) for a, b in pairs]
  targets = [jnp.asarray(t, jnp.float32) for t in lp.targets(seed, [shape])]
  loss = lp.tree_loss(targets, [1.0])
  run_1, _ = lp.run(tx, lp.to_tree(pairs, dtype), loss, steps)
  run_2, _ = lp.run(tx, lp.to_tree(transformed, dtype), loss, steps)
  assert np.array_equal(lp.products(lp.to_tree(pairs, dtype))[0],
                        lp.products(lp.to_tree(transformed, dtype))[0])
  moved = lp.relative_error(lp.products(run_1[-1])[0],
                            lp.products(lp.to_tree(pairs, dtype))[0])
  assert moved > 0.1
  return max(lp.relative_error(lp.products(t2)[0], lp.products(t1)[0])
             for t1, t2 in zip(run_1, run_2))


def test_products_invariant_with_bfloat16_params():
  """bfloat16 factors, rescaled by 2^0, 2^-7, 2^-14 (cond(S) = 16384) and
  permuted: a transform bfloat16 represents exactly. The math runs in
  float32, whose rounding differences (eps32 cond, about 1e-3 of a bfloat16
  ulp) can at most flip the rounding of an updated entry to bfloat16 now and
  then, a change of one bfloat16 ulp (2^-8 relative) in one entry. So the
  products must agree to a few ulps: 4 * 2^-8. (Measured: bit-identical
  products over 50 steps. Adam drifts by 1e2 relative.)"""
  exponents = (0, 7, 14)
  tol = 4 * 2.0**-8
  drift = _drift_from_exact_transform(rite_optax.lora_rite(0.05),
                                      jnp.bfloat16, exponents)
  assert drift < tol
  adam = _drift_from_exact_transform(optax.adam(0.05), jnp.bfloat16, exponents)
  assert adam > 100 * tol


# ------------------------------------------------------ the NumPy reference
REFERENCE_CASES = {
    "defaults": dict(lr=0.05),
    "escape": dict(lr=0.05, escape=True),
    "capping_and_decay": dict(lr=0.05, update_capping=0.05, weight_decay=0.1),
    "clipping_active": dict(lr=0.05, clip_unmagnified_grad=0.01),
    "skipping_active": dict(lr=0.05, update_skipping=0.02),
    "no_clip_no_skip": dict(lr=0.02, clip_unmagnified_grad=0.0,
                            update_skipping=0.0, b1=0.5, b2=0.9, eps=1e-4),
}


@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_numpy_reference(case, steps):
  # The second adapter's loss is weighted up so that global clipping and
  # skipping treat the pairs differently.
  weights = [1.0, 40.0]
  with jax.enable_x64(True):
    pairs, got, expected = lp.run_with_reference(
        rite_optax.lora_rite, ref.lora_rite_reference, REFERENCE_CASES[case],
        steps, SHAPES, weights)
    lp.assert_trajectories_match(got, expected)
    # The step did something (a zero update would agree with a zero update).
    moved = lp.relative_error(lp.from_tree(got[-1])[0][0], pairs[0][0])
    assert moved > 1e-4


def test_zero_b_factor_leaves_a_still_on_first_step():
  """ALGORITHMS.md 1.3: with B = 0 (LoRA init), R_B^+ = 0 and A does not move."""
  with jax.enable_x64(True):
    pairs, got, expected = lp.run_with_reference(
        rite_optax.lora_rite, ref.lora_rite_reference, dict(lr=0.05), 3, SHAPES,
        [1.0, 1.0], seed=2, b_zero=True)
    (a1, b1), _ = lp.from_tree(got[0])
    np.testing.assert_array_equal(a1, pairs[0][0])
    assert np.abs(b1).max() > 0
    lp.assert_trajectories_match(got, expected)


# ---------------------------------------------------------- stacked layers
def test_stacked_layers_equal_a_loop_over_layers():
  stacked, looped, grads = lp.stacked_layers(3, layers=4, m=10, n=7, r=3)
  tx = rite_optax.lora_rite(0.1, clip_unmagnified_grad=0.5)
  s_state, l_state = tx.init(stacked), tx.init(looped)
  for s_grads, l_grads in grads:
    s_up, s_state = tx.update(s_grads, s_state, stacked)
    l_up, l_state = tx.update(l_grads, l_state, looped)
    lp.assert_stacked_equals_looped(s_up, l_up, rtol=2e-5, atol=1e-7)
  assert float(jnp.abs(s_up["lora_a"]).max()) > 1e-3


# ------------------------------------------------- clipping and skipping
def _one_update(tx, tree, grads):
  state = tx.init(tree)
  return tx.update(grads, state, tree)


def test_global_clipping_couples_pairs():
  """Clipping uses the norm of every pair: another pair's gradient changes this
  pair's update when clipping is on, and not when it is off."""
  tree = lp.to_tree(lp.random_pairs(4, SHAPES), jnp.float32)
  grads = lp.grads_like(tree, 0, scale=0.01)
  bigger = dict(grads, pair_1=jax.tree.map(lambda g: 3.0 * g, grads["pair_1"]))
  tree_steps = lambda tx, g: lp.run(  # two steps with the same gradients
      tx, tree, lambda p: sum(jnp.vdot(x, y) for x, y in zip(
          jax.tree.leaves(p), jax.tree.leaves(g))), 2)[0][-1]
  on = rite_optax.lora_rite(0.1, clip_unmagnified_grad=1e-3)
  off = rite_optax.lora_rite(0.1, clip_unmagnified_grad=0.0)
  changed = jnp.abs(tree_steps(on, grads)["pair_0"]["lora_a"]
                    - tree_steps(on, bigger)["pair_0"]["lora_a"]).max()
  assert changed > 1e-5
  np.testing.assert_allclose(tree_steps(off, grads)["pair_0"]["lora_a"],
                             tree_steps(off, bigger)["pair_0"]["lora_a"],
                             rtol=1e-6)


@pytest.mark.parametrize("bad", ["large", "nan", "inf"])
def test_skipped_factor_is_as_if_its_gradient_were_zero(bad):
  """Skipping (1.4), and the safe behaviour for non-finite gradients, zero
  only the offending factor's unmagnified gradient: updates and state equal
  those of a zero gradient for that factor, and every other factor is as
  before."""
  tree = lp.to_tree(lp.random_pairs(5, SHAPES), jnp.float32)
  tx = rite_optax.lora_rite(0.1)
  state = tx.init(tree)
  for seed in range(3):  # a few ordinary steps so the moments are not zero
    _, state = tx.update(lp.grads_like(tree, seed, scale=0.01), state, tree)
  grads = lp.grads_like(tree, 10, scale=0.01)
  offending = {"large": 1e4, "nan": jnp.nan, "inf": jnp.inf}[bad]
  bad_grads = jax.tree.map(lambda x: x, grads)
  bad_grads["pair_0"]["lora_a"] = grads["pair_0"]["lora_a"].at[1, 2].set(
      offending) if bad != "large" else grads["pair_0"]["lora_a"] * offending
  zero_grads = jax.tree.map(lambda x: x, grads)
  zero_grads["pair_0"]["lora_a"] = jnp.zeros_like(grads["pair_0"]["lora_a"])
  bad_up, bad_state = jax.jit(tx.update)(bad_grads, state, tree)
  zero_up, zero_state = jax.jit(tx.update)(zero_grads, state, tree)
  chex.assert_trees_all_close(bad_up, zero_up, rtol=1e-6, atol=1e-9)
  # Equal but for the record of which factor was skipped (issue 14).
  assert int(bad_state[0].skipped["pair_0"]["lora_a"]) == 1
  assert int(zero_state[0].total_skipped) == 0
  unrecorded = lambda s: s[0]._replace(skipped=None, total_skipped=None)
  chex.assert_trees_all_close(unrecorded(bad_state), unrecorded(zero_state),
                              rtol=1e-6, atol=1e-9)
  chex.assert_tree_all_finite((bad_up, bad_state))
  # B of the same pair still learns from its own gradient.
  assert float(jnp.abs(bad_up["pair_0"]["lora_b"]).max()) > 0


def test_non_finite_gradients_keep_training_finite():
  tree = lp.to_tree(lp.random_pairs(6, SHAPES), jnp.float32)
  tx = rite_optax.lora_rite(0.1, escape=True)
  state = tx.init(tree)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for i in range(6):
    grads = lp.grads_like(tree, i, scale=0.01)
    if i in (1, 2):
      grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
    updates, state = step(grads, state, tree)
    tree = optax.apply_updates(tree, updates)
    chex.assert_tree_all_finite((tree, state))


def test_first_step_skip_zeroes_only_that_factor():
  tree = lp.to_tree(lp.random_pairs(7, SHAPES), jnp.float32)
  grads = lp.grads_like(tree, 0, scale=0.01)
  grads["pair_0"]["lora_b"] = grads["pair_0"]["lora_b"] * 1e5
  updates, _ = _one_update(rite_optax.lora_rite(0.1), tree, grads)
  assert float(jnp.abs(updates["pair_0"]["lora_b"]).max()) == 0.0
  for name in ("lora_a",):
    assert float(jnp.abs(updates["pair_0"][name]).max()) > 0
  assert float(jnp.abs(updates["pair_1"]["lora_b"]).max()) > 0


# -------------------------------------------- optax and JAX integration
class IntegrationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_variants_agree_and_chain_with_clip(self):
    tree = lp.to_tree(lp.random_pairs(8, SHAPES), jnp.float32)
    grads = lp.grads_like(tree, 0, scale=10.0)
    tx = optax.chain(optax.clip_by_global_norm(1.0), rite_optax.lora_rite(0.1))
    update = self.variant(tx.update)
    updates, state = update(grads, tx.init(tree), tree)
    clipped = optax.clip_by_global_norm(1.0).update(grads, None)[0]
    plain = rite_optax.lora_rite(0.1)
    expected, _ = plain.update(clipped, plain.init(tree), tree)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-8)
    chex.assert_tree_all_finite(state)

  def test_schedule_and_inject_hyperparams(self):
    tree = lp.to_tree(lp.random_pairs(9, SHAPES), jnp.float32)
    grads = lp.grads_like(tree, 0, scale=0.01)
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    base = rite_optax.lora_rite(0.1)
    expected, _ = base.update(grads, base.init(tree), tree)
    with_schedule = rite_optax.lora_rite(schedule)
    got, _ = with_schedule.update(grads, with_schedule.init(tree), tree)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-8)

    injected = optax.inject_hyperparams(rite_optax.lora_rite)(
        learning_rate=0.1, escape=True)
    state = injected.init(tree)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    got, state = jax.jit(injected.update)(grads, state, tree)
    half = rite_optax.lora_rite(0.05, escape=True)
    expected, _ = half.update(grads, half.init(tree), tree)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-8)
    # A traced threshold still disables when 0 (0 disables, 1.4 and 1.5).
    state.hyperparams["update_skipping"] = jnp.asarray(0.0)
    _, _ = jax.jit(injected.update)(grads, state, tree)

  def test_update_without_params_raises(self):
    tree = lp.to_tree(lp.random_pairs(11, SHAPES), jnp.float32)
    tx = rite_optax.lora_rite(0.1)
    with self.assertRaisesRegex(ValueError, "needs params"):
      tx.update(tree, tx.init(tree))


@pytest.mark.parametrize("cond", [1.0, 1e4, 1e7])
def test_gram_qr_is_a_thin_qr(cond):
  """linalg.gram_qr against NumPy's Householder QR, in float64: orthonormal
  columns, the same column space, and ``U R = X`` through ``R^+``, even at a
  condition number where one Gram pass (error eps cond^2) would not do."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.standard_normal((200, 6)))
  x = q @ np.diag(np.geomspace(1.0, 1.0 / cond, 6)) @ np.linalg.qr(
      rng.standard_normal((6, 6)))[0]
  with jax.enable_x64(True):
    u, r_pinv = (np.asarray(v) for v in rite_optax.linalg.gram_qr(
        jnp.asarray(x)))
  assert np.abs(u.T @ u - np.eye(6)).max() < 1e-12
  q_ref, _ = np.linalg.qr(x)
  # Same column space: the projections agree, to what rounding x itself
  # leaves of its smallest direction (eps cond, for Householder QR too).
  assert np.abs(u @ u.T - q_ref @ q_ref.T).max() < 100 * 2.0**-52 * cond
  # x = U R, so x R^+ = U.
  np.testing.assert_allclose(x @ r_pinv, u, atol=1e-12 * cond)


def test_gram_qr_of_a_rank_deficient_factor_is_finite():
  x = np.zeros((50, 4))
  x[:, :2] = np.random.default_rng(1).standard_normal((50, 2))
  with jax.enable_x64(True):
    u, r_pinv = rite_optax.linalg.gram_qr(jnp.asarray(x))
    zero_u, zero_r = rite_optax.linalg.gram_qr(jnp.zeros((50, 4)))
  assert np.isfinite(np.asarray(r_pinv)).all()
  assert not np.asarray(zero_u).any() and not np.asarray(zero_r).any()
  # The kept columns still span x's column space.
  u = np.asarray(u)
  np.testing.assert_allclose(u @ (u.T @ x), x, atol=1e-12)
