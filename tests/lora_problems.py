"""Small LoRA problems shared by the optimizer tests.

Each adapter ``i`` fits its product ``A_i @ B_i.T`` to a target ``T_i`` with the
loss ``weight * 0.5 * mean((A B^T - T)^2)``; the tree stores the factors in
the Flax NNX layout (``lora_a = A (m, r)``, ``lora_b = B.T (r, n)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
