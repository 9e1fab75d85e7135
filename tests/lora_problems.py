"""Small LoRA problems shared by the optimizer tests.

Each adapter ``i`` fits its product ``A_i @ B_i.T`` to a target ``T_i`` with the
loss ``weight * 0.5 * mean((A B^T - T)^2)``; the tree stores the factors in
the Flax NNX layout (``lora_a = A (m, r)``, ``lora_b = B.T (r, n)``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


def random_pairs(seed, shapes, b_zero=False):
  """``[(A, B)]`` float64 NumPy factors for ``shapes = [(m, n, r), ...]``."""
  rng = np.random.default_rng(seed)
  out = []
  for m, n, r in shapes:
    a = rng.standard_normal((m, r))
    b = np.zeros((n, r)) if b_zero else rng.standard_normal((n, r))
    out.append((a, b))
  return out


def targets(seed, shapes):
  rng = np.random.default_rng(seed + 1000)
  return [rng.standard_normal((m, n)) for m, n, _ in shapes]


def ill_conditioned(seed, r, cond=1e4):
  """A random ``r x r`` matrix with condition number ``cond``."""
  rng = np.random.default_rng(seed + 2000)
  u, _ = np.linalg.qr(rng.standard_normal((r, r)))
  v, _ = np.linalg.qr(rng.standard_normal((r, r)))
  return u @ np.diag(np.logspace(0, -np.log10(cond), r)) @ v.T


def numpy_grad_fn(targets_, weights):
  """Closed-form gradients for the NumPy references."""
  def grad_fn(pairs):
    out = []
    for (a, b), t, w in zip(pairs, targets_, weights):
      resid = w * (a @ b.T - t) / t.size
      out.append((resid @ b, resid.T @ a))
    return out
  return grad_fn


def to_tree(pairs, dtype=None):
  tree = {f"pair_{i}": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b.T)}
          for i, (a, b) in enumerate(pairs)}
  if dtype is not None:
    tree = jax.tree.map(lambda x: x.astype(dtype), tree)
  return tree


def from_tree(tree):
  return [(np.asarray(tree[k]["lora_a"], np.float64),
           np.asarray(tree[k]["lora_b"], np.float64).T)
          for k in sorted(tree, key=lambda s: int(s.split("_")[1]))]


def tree_loss(targets_, weights):
  def loss(tree):
    total = 0.0
    for i, (t, w) in enumerate(zip(targets_, weights)):
      p = tree[f"pair_{i}"]
      prod = p["lora_a"].astype(t.dtype) @ p["lora_b"].astype(t.dtype)
      total = total + w * 0.5 * jnp.mean((prod - t) ** 2)
    return total
  return loss


def run(tx, tree, loss, steps, jit=True):
  """``steps`` steps of ``tx`` on ``loss``; returns the list of trees after each."""
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  state = tx.init(tree)
  out = []
  for _ in range(steps):
    tree, state = step(tree, state)
    out.append(tree)
  return out, state


def products(tree):
  return [a @ b.T for a, b in from_tree(tree)]


def relative_error(x, y):
  return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def run_with_reference(make_tx, reference, hp, steps, shapes, weights, seed=1,
                       b_zero=False):
  """``make_tx(lr, **rest)`` and the NumPy ``reference(..., lr=lr, **rest)``,
  ``hp = dict(lr=lr, **rest)``, for ``steps`` steps from the same start.

  Returns the start ``pairs``, our trees after each step, and the reference's
  pairs after each step. Call in float64 (``jax.enable_x64``).
  """
  pairs = random_pairs(seed, shapes, b_zero=b_zero)
  tgts = targets(seed, shapes)
  expected = reference(pairs, numpy_grad_fn(tgts, weights), steps, **hp)
  hp = dict(hp)
  tx = make_tx(hp.pop("lr"), **hp)
  got, _ = run(tx, to_tree(pairs),
               tree_loss([jnp.asarray(t) for t in tgts], weights), steps)
  return pairs, got, expected


def run_with_grads(update, tx, pairs, grads, steps):
  """``steps`` steps of ``update`` (``tx.update``, or a transform of it) with
  the same gradients ``grads``, pairs like ``pairs``, at every step.

  Returns the trees after each step and the last state.
  """
  params, state = to_tree(pairs), tx.init(to_tree(pairs))
  out = []
  for _ in range(steps):
    updates, state = update(to_tree(grads), state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out, state


def assert_trajectories_match(got, expected, rtol=1e-9, atol=1e-12):
  """Trees after each step ``got`` equal the reference's pairs ``expected``."""
  assert len(got) == len(expected)
  for tree, pairs in zip(got, expected):
    for (a, b), (ra, rb) in zip(from_tree(tree), pairs):
      np.testing.assert_allclose(a, ra, rtol=rtol, atol=atol)
      np.testing.assert_allclose(b, rb, rtol=rtol, atol=atol)


def schedule_runs(factory, tree, loss, steps=3, **kwargs):
  """``factory(learning_rate, **kwargs)`` for ``steps`` steps on ``loss``
  three ways: with a linear schedule 0.1 -> 0.01, with the schedule's value
  injected before each step (``optax.inject_hyperparams``), and at the
  constant rate 0.1 (so a test can tell the schedule is used).

  Returns the three lists of trees after each step.
  """
  schedule = optax.linear_schedule(0.1, 0.01, steps)
  scheduled, _ = run(factory(schedule, **kwargs), tree, loss, steps)
  injected = optax.inject_hyperparams(factory)(learning_rate=0.1, **kwargs)
  update = jax.jit(injected.update)
  state, params, by_injection = injected.init(tree), tree, []
  for t in range(steps):
    # The schedule's own value at an int32 count (float32 in optax).
    state.hyperparams["learning_rate"] = schedule(jnp.asarray(t, jnp.int32))
    updates, state = update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    by_injection.append(params)
  constant, _ = run(factory(0.1, **kwargs), tree, loss, steps)
  return scheduled, by_injection, constant


def _float_dtypes(tree):
  return {leaf.dtype for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)}


def check_bfloat16_step(tx, tree32, grads, atol):
  """One jitted step of ``tx`` on ``tree32`` and ``grads`` rounded to
  bfloat16: the state stays float32 and finite, the updates are bfloat16 and
  equal, to bfloat16 rounding (rtol 3e-2, ``atol``), those of the float32
  step on the rounded params. Returns the float32 step's updates."""
  tree16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree32)
  rounded = jax.tree.map(lambda x: x.astype(jnp.float32), tree16)
  update = jax.jit(tx.update)
  state16 = tx.init(tree16)
  assert _float_dtypes(state16) <= {jnp.dtype(jnp.float32)}
  up16, state16 = update(jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads),
                         state16, tree16)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(up16))
  assert _float_dtypes(state16) <= {jnp.dtype(jnp.float32)}
  chex.assert_tree_all_finite(state16)
  up32, _ = update(grads, tx.init(rounded), rounded)
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(jnp.float32), up16), up32, rtol=3e-2,
      atol=atol)
  return up32


def grads_like(tree, seed, scale=0.1, dtype=None):
  """Random normal gradients ``scale * N(0, 1)`` shaped like ``tree``, in
  ``dtype`` (each leaf's own dtype when None)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, x.shape, dtype or x.dtype)
      for k, x in zip(keys, leaves)])


def factorization_drift(tx, seed=0, shape=(12, 9, 3), steps=50, cond=1e4):
  """``tx`` from (A, B) and from (A S, B S^-T), cond(S) = ``cond``, on one
  adapter: the same product, factored differently.

  Returns the relative difference of the two runs' products after each step,
  and how far the first run's product moved from its start. Call in float64
  (``jax.enable_x64``).
  """
  pairs = random_pairs(seed, [shape])
  s = ill_conditioned(seed, shape[2], cond=cond)
  assert np.linalg.cond(s) == pytest.approx(cond, rel=1e-6)
  transformed = [(a @ s, b @ np.linalg.inv(s).T) for a, b in pairs]
  loss = tree_loss([jnp.asarray(t) for t in targets(seed, [shape])], [1.0])
  run_1, _ = run(tx, to_tree(pairs), loss, steps)
  run_2, _ = run(tx, to_tree(transformed), loss, steps)
  errors = [relative_error(products(t2)[0], products(t1)[0])
            for t1, t2 in zip(run_1, run_2)]
  moved = relative_error(products(run_1[-1])[0], products(to_tree(pairs))[0])
  return errors, moved


def stacked_layers(seed, layers, m, n, r, steps=2):
  """Float32 factors of ``layers`` adapters, and gradients for ``steps``
  steps, as two trees: one stacked (a leading layer axis) and one with an
  entry ``layer_i`` per layer.

  Returns ``(stacked, looped, grads)``, ``grads`` a list of
  ``(stacked grads, looped grads)``, one per step.
  """
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((layers, m, r)).astype(np.float32)
  b = rng.standard_normal((layers, r, n)).astype(np.float32)
  ga = rng.standard_normal((steps, layers, m, r)).astype(np.float32) * 0.1
  gb = rng.standard_normal((steps, layers, r, n)).astype(np.float32) * 0.1
  unstack = lambda x, y: {f"layer_{i}": {"lora_a": jnp.asarray(x[i]),
                                         "lora_b": jnp.asarray(y[i])}
                          for i in range(layers)}
  stacked = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
  grads = [({"lora_a": jnp.asarray(ga[t]), "lora_b": jnp.asarray(gb[t])},
            unstack(ga[t], gb[t])) for t in range(steps)]
  return stacked, unstack(a, b), grads


def assert_stacked_equals_looped(stacked, looped, rtol, atol):
  """Each layer ``i`` of the stacked tree equals the looped ``layer_i``."""
  for i in range(len(looped)):
    for name in stacked:
      np.testing.assert_allclose(stacked[name][i], looped[f"layer_{i}"][name],
                                 rtol=rtol, atol=atol)


def nnx_mlp(seed=0):
  """Two Flax ``nnx.LoRALinear`` layers, 6 -> 16 -> 5, rank 4, Flax's LoRA
  init (``lora_b = 0``)."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.LoRALinear(6, 16, lora_rank=4, rngs=rngs)
      self.l2 = nnx.LoRALinear(16, 5, lora_rank=4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.gelu(self.l1(x)))

  return Model(nnx.Rngs(seed))


def nnx_train(model, tx, steps):
  """``steps`` steps of ``tx`` as the tx of ``nnx.Optimizer`` over
  ``nnx.LoRAParam``, in ``nnx.jit``, fitting ``sin(2 x[:, :5])`` with
  ``model`` (6 inputs, 5 outputs).

  Returns the loss at each step, and whether the frozen base parameters stayed
  bit-equal.
  """
  from flax import nnx

  x = jax.random.normal(jax.random.PRNGKey(1), (64, 6))
  y = jnp.sin(x[:, :5] * 2.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
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

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]
  before = nnx.as_pure(base_before)
  after = nnx.as_pure(nnx.state(model, frozen))
  unchanged = (jax.tree.structure(before) == jax.tree.structure(after)
               and all(np.array_equal(p, q) for p, q in
                       zip(jax.tree.leaves(before), jax.tree.leaves(after))))
  return losses, unchanged
