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
  shapes = [(12, 9, 3)]
  with jax.enable_x64(True):
    pairs = lp.random_pairs(0, shapes)
    s = lp.ill_conditioned(0, 3, cond=1e4)
    assert np.linalg.cond(s) == pytest.approx(1e4, rel=1e-6)
    transformed = [(a @ s, b @ np.linalg.inv(s).T) for a, b in pairs]
    loss = lp.tree_loss([jnp.asarray(t) for t in lp.targets(0, shapes)], [1.0])
    tx = rite_optax.lora_rite(0.05, escape=escape)
    run_1, _ = lp.run(tx, lp.to_tree(pairs), loss, 50)
    run_2, _ = lp.run(tx, lp.to_tree(transformed), loss, 50)
    for tree_1, tree_2 in zip(run_1, run_2):
      err = lp.relative_error(lp.products(tree_2)[0], lp.products(tree_1)[0])
      assert err < 1e-8
    # The test can tell: the products really moved.
    start = lp.products(lp.to_tree(pairs))[0]
    assert lp.relative_error(lp.products(run_1[-1])[0], start) > 0.1


def test_adam_is_not_invariant():
  """The same measurement on Adam shows a large drift (the test can tell)."""
  shapes = [(12, 9, 3)]
  with jax.enable_x64(True):
    pairs = lp.random_pairs(0, shapes)
    s = lp.ill_conditioned(0, 3, cond=1e4)
    transformed = [(a @ s, b @ np.linalg.inv(s).T) for a, b in pairs]
    loss = lp.tree_loss([jnp.asarray(t) for t in lp.targets(0, shapes)], [1.0])
    tx = optax.adam(0.05)
    run_1, _ = lp.run(tx, lp.to_tree(pairs), loss, 50)
    run_2, _ = lp.run(tx, lp.to_tree(transformed), loss, 50)
    err = lp.relative_error(lp.products(run_2[-1])[0], lp.products(run_1[-1])[0])
    assert err > 1e-2


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
  hp = dict(REFERENCE_CASES[case])
  # The second adapter's loss is weighted up so that global clipping and
  # skipping treat the pairs differently.
  weights = [1.0, 40.0]
  with jax.enable_x64(True):
    pairs = lp.random_pairs(1, SHAPES)
    tgts = lp.targets(1, SHAPES)
    expected = ref.lora_rite_reference(
        pairs, lp.numpy_grad_fn(tgts, weights), steps, **hp)
    tx = rite_optax.lora_rite(hp.pop("lr"), **hp)
    got, _ = lp.run(tx, lp.to_tree(pairs),
                    lp.tree_loss([jnp.asarray(t) for t in tgts], weights), steps)
    for t in range(steps):
      for (a, b), (ra, rb) in zip(lp.from_tree(got[t]), expected[t]):
        np.testing.assert_allclose(a, ra, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b, rb, rtol=1e-9, atol=1e-12)
    # The step did something (a zero update would agree with a zero update).
    moved = lp.relative_error(lp.from_tree(got[-1])[0][0], pairs[0][0])
    assert moved > 1e-4


def test_zero_b_factor_leaves_a_still_on_first_step():
  """ALGORITHMS.md 1.3: with B = 0 (LoRA init), R_B^+ = 0 and A does not move."""
  with jax.enable_x64(True):
    pairs = lp.random_pairs(2, SHAPES, b_zero=True)
    tgts = lp.targets(2, SHAPES)
    tx = rite_optax.lora_rite(0.05)
    got, _ = lp.run(tx, lp.to_tree(pairs),
                    lp.tree_loss([jnp.asarray(t) for t in tgts], [1.0, 1.0]), 3)
    expected = ref.lora_rite_reference(pairs, lp.numpy_grad_fn(tgts, [1, 1]), 3,
                                       lr=0.05)
    (a1, b1), _ = lp.from_tree(got[0])
    np.testing.assert_array_equal(a1, pairs[0][0])
    assert np.abs(b1).max() > 0
    for (a, b), (ra, rb) in zip(lp.from_tree(got[2]), expected[2]):
      np.testing.assert_allclose(a, ra, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(b, rb, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------- stacked layers
def test_stacked_layers_equal_a_loop_over_layers():
  rng = np.random.default_rng(3)
  layers, m, n, r = 4, 10, 7, 3
  a = rng.standard_normal((layers, m, r)).astype(np.float32)
  b = rng.standard_normal((layers, r, n)).astype(np.float32)
  ga = rng.standard_normal((2, layers, m, r)).astype(np.float32) * 0.1
  gb = rng.standard_normal((2, layers, r, n)).astype(np.float32) * 0.1
  tx = rite_optax.lora_rite(0.1, clip_unmagnified_grad=0.5)
  stacked = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
  looped = {f"layer_{i}": {"lora_a": jnp.asarray(a[i]), "lora_b": jnp.asarray(b[i])}
            for i in range(layers)}
  s_state, l_state = tx.init(stacked), tx.init(looped)
  for step in range(2):
    s_up, s_state = tx.update({"lora_a": ga[step], "lora_b": gb[step]}, s_state,
                              stacked)
    l_up, l_state = tx.update(
        {f"layer_{i}": {"lora_a": ga[step, i], "lora_b": gb[step, i]}
         for i in range(layers)}, l_state, looped)
    for i in range(layers):
      np.testing.assert_allclose(s_up["lora_a"][i], l_up[f"layer_{i}"]["lora_a"],
                                 rtol=2e-5, atol=1e-7)
      np.testing.assert_allclose(s_up["lora_b"][i], l_up[f"layer_{i}"]["lora_b"],
                                 rtol=2e-5, atol=1e-7)
  assert float(jnp.abs(s_up["lora_a"]).max()) > 1e-3


# ------------------------------------------------- clipping and skipping
def _one_update(tx, tree, grads):
  state = tx.init(tree)
  return tx.update(grads, state, tree)


def _grads_like(tree, seed, scale=0.01):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_global_clipping_couples_pairs():
  """Clipping uses the norm of every pair: another pair's gradient changes this
  pair's update when clipping is on, and not when it is off."""
  tree = lp.to_tree(lp.random_pairs(4, SHAPES), jnp.float32)
  grads = _grads_like(tree, 0)
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
    _, state = tx.update(_grads_like(tree, seed), state, tree)
  grads = _grads_like(tree, 10)
  offending = {"large": 1e4, "nan": jnp.nan, "inf": jnp.inf}[bad]
  bad_grads = jax.tree.map(lambda x: x, grads)
  bad_grads["pair_0"]["lora_a"] = grads["pair_0"]["lora_a"].at[1, 2].set(
      offending) if bad != "large" else grads["pair_0"]["lora_a"] * offending
  zero_grads = jax.tree.map(lambda x: x, grads)
  zero_grads["pair_0"]["lora_a"] = jnp.zeros_like(grads["pair_0"]["lora_a"])
  bad_up, bad_state = jax.jit(tx.update)(bad_grads, state, tree)
  zero_up, zero_state = jax.jit(tx.update)(zero_grads, state, tree)
  chex.assert_trees_all_close(bad_up, zero_up, rtol=1e-6, atol=1e-9)
  chex.assert_trees_all_close(bad_state, zero_state, rtol=1e-6, atol=1e-9)
  chex.assert_tree_all_finite((bad_up, bad_state))
  # B of the same pair still learns from its own gradient.
  assert float(jnp.abs(bad_up["pair_0"]["lora_b"]).max()) > 0


def test_non_finite_gradients_keep_training_finite():
  tree = lp.to_tree(lp.random_pairs(6, SHAPES), jnp.float32)
  tx = rite_optax.lora_rite(0.1, escape=True)
  state = tx.init(tree)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for i in range(6):
    grads = _grads_like(tree, i)
    if i in (1, 2):
      grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
    updates, state = step(grads, state, tree)
    tree = optax.apply_updates(tree, updates)
    chex.assert_tree_all_finite((tree, state))


def test_first_step_skip_zeroes_only_that_factor():
  tree = lp.to_tree(lp.random_pairs(7, SHAPES), jnp.float32)
  grads = _grads_like(tree, 0)
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
    grads = _grads_like(tree, 0, scale=10.0)
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
    grads = _grads_like(tree, 0)
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

  def test_bfloat16_params(self):
    tree32 = lp.to_tree(lp.random_pairs(10, SHAPES), jnp.float32)
    tree16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree32)
    grads = _grads_like(tree32, 0)
    tx = rite_optax.lora_rite(0.1)
    state16 = tx.init(tree16)
    for leaf in jax.tree.leaves(state16[0]):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        self.assertEqual(leaf.dtype, jnp.float32)
    up16, state16 = jax.jit(tx.update)(
        jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads), state16, tree16)
    for leaf in jax.tree.leaves(up16):
      self.assertEqual(leaf.dtype, jnp.bfloat16)
    rounded = jax.tree.map(lambda x: x.astype(jnp.float32), tree16)
    up32, _ = tx.update(grads, tx.init(rounded), rounded)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), up16),
                                up32, rtol=3e-2, atol=1e-3)
    chex.assert_tree_all_finite(state16)

  def test_update_without_params_raises(self):
    tree = lp.to_tree(lp.random_pairs(11, SHAPES), jnp.float32)
    tx = rite_optax.lora_rite(0.1)
    with self.assertRaisesRegex(ValueError, "needs params"):
      tx.update(tree, tx.init(tree))


def test_nnx_optimizer_train_step_reduces_loss():
  """LoRA-RITE as the tx of nnx.Optimizer over nnx.LoRAParam, in nnx.jit."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.LoRALinear(6, 16, lora_rank=4, rngs=rngs)
      self.l2 = nnx.LoRALinear(16, 5, lora_rank=4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.gelu(self.l1(x)))

  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 6))
  y = jnp.sin(x[:, :5] * 2.0)
  optimizer = nnx.Optimizer(model, rite_optax.lora_rite(0.02), wrt=nnx.LoRAParam)
  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  base_before = nnx.clone(nnx.state(model, frozen))

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(
        0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(60)]
  assert losses[-1] < 0.7 * losses[0]
  chex.assert_trees_all_equal(nnx.as_pure(base_before),
                              nnx.as_pure(nnx.state(model, frozen)))
