"""Measuring transformation invariance of any optax optimizer on LoRA pairs.

Two factorizations of the same adapters, ``(A, B)`` and ``(A S, B S^-T)``
with ``S`` a random ``r x r`` matrix of a chosen condition number, have the
same products ``A @ B.T``. An optimizer is transformation invariant if, fed
the gradients of a loss of the products alone, it keeps the products equal
at every step (ALGORITHMS.md 1, "The defining property").
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rite_optax import pairs as pairs_lib


def ill_conditioned_matrix(key: jax.Array, r: int, cond: float,
                           dtype: Any = jnp.float32) -> jax.Array:
  """``U diag(s) V^T`` with orthogonal ``U, V`` and ``s`` from 1 to ``1/cond``."""
  ku, kv = jax.random.split(key)
  u, _ = jnp.linalg.qr(jax.random.normal(ku, (r, r), dtype))
  v, _ = jnp.linalg.qr(jax.random.normal(kv, (r, r), dtype))
  s = jnp.logspace(0.0, -np.log10(cond), r, dtype=dtype)
  return (u * s) @ v.T


def transform_factors(params: Any, key: jax.Array, cond: float = 1e4,
                      pair_spec: Optional[pairs_lib.SpecFn] = None) -> Any:
  """``(A S, B S^-T)`` for every pair (and stacked layer), ``cond(S) = cond``."""
  found = pairs_lib.find_pairs(params, pair_spec)
  keys = jax.random.split(key, max(len(found.pairs), 1))
  out = []
  for k, (a, b) in zip(keys, found.split(params)):
    # QR and inverse in float32 or wider: jnp.linalg has no bfloat16 kernels.
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    s = jax.vmap(lambda kk: ill_conditioned_matrix(kk, a.shape[-1], cond,
                                                   dtype))(
        jax.random.split(k, a.shape[0]))
    s_inv_t = jnp.swapaxes(jnp.linalg.inv(s), -1, -2)
    out.append((a @ s, b @ s_inv_t))
  return found.merge(params, out, [x.dtype for x in jax.tree.leaves(params)])


def lora_products(params: Any,
                  pair_spec: Optional[pairs_lib.SpecFn] = None) -> list[jax.Array]:
  """``A @ B.T`` per pair, ``(num_batch, m, n)``, in float32 or wider."""
  found = pairs_lib.find_pairs(params, pair_spec)
  wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return [wide(a) @ jnp.swapaxes(wide(b), -1, -2)
          for a, b in found.split(params)]


def product_loss(params: Any, key: jax.Array,
                 pair_spec: Optional[pairs_lib.SpecFn] = None) -> Callable:
  """A loss of the products alone: ``sum_i 0.5 mean((A_i B_i^T - T_i)^2)``."""
  targets = [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(
      jax.random.split(key, len(lora_products(params, pair_spec))),
      lora_products(params, pair_spec))]

  def loss(tree):
    return sum(0.5 * jnp.mean((p - t) ** 2)
               for p, t in zip(lora_products(tree, pair_spec), targets))
  return loss


def invariance_gap(optimizer: optax.GradientTransformation, params: Any,
                   loss_fn: Optional[Callable[[Any], jax.Array]] = None, *,
                   steps: int = 50, cond: float = 1e4, seed: int = 0,
                   pair_spec: Optional[pairs_lib.SpecFn] = None) -> float:
  """Relative drift between the products of two equivalent factorizations.

  Runs ``optimizer`` for ``steps`` steps from ``params`` and from
  ``transform_factors(params, cond=cond)``, on ``loss_fn`` (default: a random
  :func:`product_loss`; any loss must depend on the products only), and
  returns the largest, over steps, of
  ``||P_1 - P_2||_F / ||P_1||_F`` with ``P`` all the pairs' products
  together. About ``1e-15 * cond`` for an invariant optimizer in float64;
  of order ``1e-2`` or more for one that is not. NaN once either run's
  products are not finite (a run that diverged is not invariant).

  The transform is computed in float32 or wider (bfloat16 params included)
  and each transformed factor rounded to its parameter's dtype; the products
  are formed and compared in float32 or wider. So for bfloat16 params the
  gap is measured in float32, and includes the bfloat16 rounding of the
  transformed start (about ``2^-8`` relative): a floor, not drift.
  """
  key_s, key_loss = jax.random.split(jax.random.PRNGKey(seed))
  if loss_fn is None:
    loss_fn = product_loss(params, key_loss, pair_spec)

  @jax.jit
  def step(tree, state):
    grads = jax.grad(loss_fn)(tree)
    updates, state = optimizer.update(grads, state, tree)
    return optax.apply_updates(tree, updates), state

  def flat_products(tree):
    return jnp.concatenate([p.ravel() for p in lora_products(tree, pair_spec)])

  trees = [params, transform_factors(params, key_s, cond, pair_spec)]
  states = [optimizer.init(t) for t in trees]
  gap = 0.0
  for _ in range(steps):
    for i in range(2):
      trees[i], states[i] = step(trees[i], states[i])
    p1, p2 = flat_products(trees[0]), flat_products(trees[1])
    if not bool(jnp.all(jnp.isfinite(p1)) & jnp.all(jnp.isfinite(p2))):
      return float("nan")  # max() over the steps would hide it
    gap = max(gap, float(jnp.linalg.norm(p1 - p2) / jnp.linalg.norm(p1)))
  return gap
