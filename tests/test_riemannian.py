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


def _assert_trajectories_match(got, expected, rtol=1e-9, atol=1e-12):
  assert len(got) == len(expected)
  for tree, pairs in zip(got, expected):
    for (a, b), (ra, rb) in zip(lp.from_tree(tree), pairs):
      np.testing.assert_allclose(a, ra, rtol=rtol, atol=atol)
      np.testing.assert_allclose(b, rb, rtol=rtol, atol=atol)


def _run_both(make_tx, reference, hp, steps, seed=1, b_zero=False):
  """Our optimizer and the NumPy reference from the same start, float64."""
  pairs = lp.random_pairs(seed, SHAPES, b_zero=b_zero)
  tgts = lp.targets(seed, SHAPES)
  expected = reference(pairs, lp.numpy_grad_fn(tgts, WEIGHTS), steps, **hp)
  hp = dict(hp)
  tx = make_tx(hp.pop("lr"), **hp)
  got, _ = lp.run(tx, lp.to_tree(pairs),
                  lp.tree_loss([jnp.asarray(t) for t in tgts], WEIGHTS), steps)
  return pairs, got, expected


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
    _assert_trajectories_match(got, expected)
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
    _assert_trajectories_match(got, expected)
    assert _moved(pairs, got[-1]) > 1e-4


@pytest.mark.parametrize("sequential", [False, True])
def test_scaled_adamw_from_lora_init_matches_reference(sequential):
  """B = 0: A's gradient is zero; B's is preconditioned by A (or A's step)."""
  with jax.enable_x64(True):
    pairs, got, expected = _run_both(
        riemannian.scaled_adamw, ref.scaled_adamw_reference,
        dict(lr=0.01, weight_decay=0.5, sequential=sequential), 5, seed=2,
        b_zero=True)
    _assert_trajectories_match(got, expected)
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
def _invariance_errors(tx, steps=50):
  shapes = [(12, 9, 3)]
  pairs = lp.random_pairs(0, shapes)
  s = lp.ill_conditioned(0, 3, cond=1e4)
  assert np.linalg.cond(s) == pytest.approx(1e4, rel=1e-6)
  transformed = [(a @ s, b @ np.linalg.inv(s).T) for a, b in pairs]
  loss = lp.tree_loss([jnp.asarray(t) for t in lp.targets(0, shapes)], [1.0])
  run_1, _ = lp.run(tx, lp.to_tree(pairs), loss, steps)
  run_2, _ = lp.run(tx, lp.to_tree(transformed), loss, steps)
  errors = [lp.relative_error(lp.products(t2)[0], lp.products(t1)[0])
            for t1, t2 in zip(run_1, run_2)]
  moved = lp.relative_error(lp.products(run_1[-1])[0],
                            lp.products(lp.to_tree(pairs))[0])
  return errors, moved


def test_scaled_gd_without_reg_is_transformation_invariant():
  """(A, B) and (A S, B S^-T), cond(S) = 1e4: identical products for 50 steps."""
  with jax.enable_x64(True):
    errors, moved = _invariance_errors(riemannian.scaled_gd(5.0, reg=0.0))
    assert max(errors) < 1e-8
    assert moved > 0.1  # the products really moved
    # The ridge breaks it for such a badly scaled start (the test can tell).
    errors, _ = _invariance_errors(riemannian.scaled_gd(5.0))
    assert errors[-1] > 1e-2


@pytest.mark.parametrize("sequential", [False, True])
def test_scaled_adamw_is_not_transformation_invariant(sequential):
  with jax.enable_x64(True):
    errors, moved = _invariance_errors(
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
  rng = np.random.default_rng(3)
  layers, m, n, r = 4, 10, 7, 3
  a = rng.standard_normal((layers, m, r)).astype(np.float32)
  b = rng.standard_normal((layers, r, n)).astype(np.float32)
  ga = rng.standard_normal((2, layers, m, r)).astype(np.float32) * 0.1
  gb = rng.standard_normal((2, layers, r, n)).astype(np.float32) * 0.1
  tx = riemannian.scaled_adamw(0.1, sequential=True, weight_decay=0.1)
  stacked = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
  looped = {f"layer_{i}": {"lora_a": jnp.asarray(a[i]),
                           "lora_b": jnp.asarray(b[i])} for i in range(layers)}
  s_state, l_state = tx.init(stacked), tx.init(looped)
  update = jax.jit(tx.update)
  for step in range(2):
    s_up, s_state = update({"lora_a": ga[step], "lora_b": gb[step]},
                           s_state, stacked)
    l_up, l_state = update(
        {f"layer_{i}": {"lora_a": ga[step, i], "lora_b": gb[step, i]}
         for i in range(layers)}, l_state, looped)
    for i in range(layers):
      for name in ("lora_a", "lora_b"):
        np.testing.assert_allclose(s_up[name][i], l_up[f"layer_{i}"][name],
                                   rtol=2e-5, atol=1e-7)
  assert float(jnp.abs(s_up["lora_b"]).max()) > 1e-3


# -------------------------------------------- optax and JAX integration
def _grads_like(tree, seed, scale=0.1):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, x.shape, jnp.float32)
      for k, x in zip(keys, leaves)])


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
      update = self.variant(tx.update)
      params, state = lp.to_tree(pairs), tx.init(lp.to_tree(pairs))
      for step in range(2):
        updates, state = update(lp.to_tree(grads), state, params)
        params = optax.apply_updates(params, updates)
        _assert_trajectories_match([params], [expected[step]])
      chex.assert_tree_all_finite(state)

  def test_inject_hyperparams(self):
    tree = lp.to_tree(lp.random_pairs(9, SHAPES), jnp.float32)
    grads = _grads_like(tree, 0)
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
      schedule = optax.linear_schedule(0.1, 0.01, 3)
      loss = lp.tree_loss([jnp.asarray(t) for t in lp.targets(10, SHAPES)],
                          WEIGHTS)
      make = lambda lr: riemannian.scaled_adamw(lr, sequential=True,
                                                weight_decay=0.1)
      scheduled, _ = lp.run(make(schedule), tree, loss, 3)
      injected = optax.inject_hyperparams(riemannian.scaled_adamw)(
          learning_rate=0.1, sequential=True, weight_decay=0.1)
      state, params = injected.init(tree), tree
      for t in range(3):
        state.hyperparams["learning_rate"] = schedule(jnp.asarray(t, jnp.int32))
        updates, state = jax.jit(injected.update)(jax.grad(loss)(params),
                                                  state, params)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(params, scheduled[t], rtol=1e-10,
                                    atol=1e-12)
      constant, _ = lp.run(make(0.1), tree, loss, 3)
      self.assertGreater(lp.relative_error(lp.products(constant[-1])[0],
                                           lp.products(scheduled[-1])[0]), 1e-3)

  def test_bfloat16_params(self):
    tree32 = lp.to_tree(lp.random_pairs(11, SHAPES), jnp.float32)
    tree16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree32)
    rounded = jax.tree.map(lambda x: x.astype(jnp.float32), tree16)
    grads = _grads_like(tree32, 0)
    for tx in (riemannian.scaled_gd(0.1),
               riemannian.scaled_adamw(0.1, sequential=True)):
      state16 = tx.init(tree16)
      for leaf in jax.tree.leaves(state16):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
          self.assertEqual(leaf.dtype, jnp.float32)
      up16, state16 = jax.jit(tx.update)(
          jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads), state16,
          tree16)
      for leaf in jax.tree.leaves(up16):
        self.assertEqual(leaf.dtype, jnp.bfloat16)
      for leaf in jax.tree.leaves(state16):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
          self.assertEqual(leaf.dtype, jnp.float32)
      up32, _ = jax.jit(tx.update)(grads, tx.init(rounded), rounded)
      chex.assert_trees_all_close(
          jax.tree.map(lambda x: x.astype(jnp.float32), up16), up32,
          rtol=3e-2, atol=1e-3)
      chex.assert_tree_all_finite(state16)
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
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 6))
  y = jnp.sin(x[:, :5] * 2.0)
  optimizer = nnx.Optimizer(model, riemannian.scaled_adamw(0.01),
                            wrt=nnx.LoRAParam)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda model: jnp.mean((model(x) - y) ** 2),
        argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(40)]
  assert losses[-1] < 0.8 * losses[0]
