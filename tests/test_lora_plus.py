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
  hp = dict(CASES[case])
  with jax.enable_x64(True):
    pairs = lp.random_pairs(1, SHAPES, b_zero=b_zero)
    tgts = lp.targets(1, SHAPES)
    expected = ref.lora_plus_reference(pairs, lp.numpy_grad_fn(tgts, WEIGHTS),
                                       steps, **hp)
    tx = lora_plus(hp.pop("lr"), **hp)
    got, _ = lp.run(tx, lp.to_tree(pairs),
                    lp.tree_loss([jnp.asarray(t) for t in tgts], WEIGHTS), steps)
    for t in range(steps):
      for (a, b), (ra, rb) in zip(lp.from_tree(got[t]), expected[t]):
        np.testing.assert_allclose(a, ra, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b, rb, rtol=1e-9, atol=1e-12)
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
  shapes = [(12, 9, 3)]
  with jax.enable_x64(True):
    pairs = lp.random_pairs(0, shapes)
    s = lp.ill_conditioned(0, 3, cond=1e4)
    transformed = [(a @ s, b @ np.linalg.inv(s).T) for a, b in pairs]
    loss = lp.tree_loss([jnp.asarray(t) for t in lp.targets(0, shapes)], [1.0])
    tx = lora_plus(0.05)
    run_1, _ = lp.run(tx, lp.to_tree(pairs), loss, 50)
    run_2, _ = lp.run(tx, lp.to_tree(transformed), loss, 50)
    err = lp.relative_error(lp.products(run_2[-1])[0], lp.products(run_1[-1])[0])
    assert err > 1e-2
    start = lp.products(lp.to_tree(pairs))[0]
    assert lp.relative_error(lp.products(run_1[-1])[0], start) > 0.1


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
      expected = ref.lora_plus_reference(pairs, lambda _: grads, 2, lr=0.1,
                                         weight_decay=0.1)
      tx = lora_plus(0.1, weight_decay=0.1)
      update = self.variant(tx.update)
      params, state = lp.to_tree(pairs), tx.init(lp.to_tree(pairs))
      for step in range(2):
        updates, state = update(lp.to_tree(grads), state, params)
        params = optax.apply_updates(params, updates)
        for (a, b), (ra, rb) in zip(lp.from_tree(params), expected[step]):
          np.testing.assert_allclose(a, ra, rtol=1e-9, atol=1e-12)
          np.testing.assert_allclose(b, rb, rtol=1e-9, atol=1e-12)
      chex.assert_tree_all_finite(state)

  def test_schedule_and_inject_hyperparams(self):
    """A schedule equals injecting its value each step; lr_ratio can be
    injected too."""
    with jax.enable_x64(True):
      tree = lp.to_tree(lp.random_pairs(9, SHAPES))
      schedule = optax.linear_schedule(0.1, 0.01, 3)
      loss = lp.tree_loss([jnp.asarray(t) for t in lp.targets(9, SHAPES)],
                          WEIGHTS)
      scheduled, _ = lp.run(lora_plus(schedule, weight_decay=0.1), tree, loss,
                            3)
      injected = optax.inject_hyperparams(lora_plus)(learning_rate=0.1,
                                                     weight_decay=0.1)
      update = jax.jit(injected.update)
      state, params = injected.init(tree), tree
      for t in range(3):
        # The schedule's own value at an int32 count (float32 in optax).
        state.hyperparams["learning_rate"] = schedule(jnp.asarray(t, jnp.int32))
        updates, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(params, scheduled[t], rtol=1e-10,
                                    atol=1e-12)
      constant, _ = lp.run(lora_plus(0.1, weight_decay=0.1), tree, loss, 3)
      self.assertGreater(lp.relative_error(lp.products(constant[-1])[0],
                                           lp.products(scheduled[-1])[0]), 1e-3)

      # Injected lr_ratio: one first step, against a fresh lora_plus.
      grads = _grads_like(tree, 1)
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
    tree16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree32)
    rounded = jax.tree.map(lambda x: x.astype(jnp.float32), tree16)
    grads = _grads_like(tree32, 0)
    tx = lora_plus(0.01, weight_decay=0.1)
    state16 = tx.init(tree16)
    for leaf in jax.tree.leaves(state16):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        self.assertEqual(leaf.dtype, jnp.float32)
    update = jax.jit(tx.update)
    up16, state16 = update(jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads),
                           state16, tree16)
    for leaf in jax.tree.leaves(up16):
      self.assertEqual(leaf.dtype, jnp.bfloat16)
    for leaf in jax.tree.leaves(state16):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        self.assertEqual(leaf.dtype, jnp.float32)
    up32, _ = update(grads, tx.init(rounded), rounded)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), up16), up32,
        rtol=3e-2, atol=1e-4)
    self.assertGreater(float(jnp.abs(up32["pair_0"]["lora_b"]).max()), 0.1)


def test_nnx_optimizer_train_step_reduces_loss():
  """LoRA+ as the tx of nnx.Optimizer over nnx.LoRAParam, in nnx.jit."""
  from flax import nnx

  model = nnx.LoRALinear(6, 5, lora_rank=3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 6))
  y = jnp.sin(x[:, :5] * 2.0)
  optimizer = nnx.Optimizer(model, lora_plus(0.003), wrt=nnx.LoRAParam)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda model: jnp.mean((model(x) - y) ** 2),
        argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(40)]
  assert losses[-1] < 0.8 * losses[0]
