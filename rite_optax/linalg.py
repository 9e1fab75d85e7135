"""Small dense kernels on the ``r x r`` matrices of LoRA optimizers.

Each works on one matrix; callers vmap over stacked layers. The ``r x r``
problems are tiny (r <= 256), so the cost of everything here is ``O(r^3)``,
negligible next to the ``O((m + n) r^2)`` products with the factors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sym(x: jax.Array) -> jax.Array:
  """``(X + X.T) / 2``."""
  return (x + jnp.swapaxes(x, -1, -2)) / 2


def thin_qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``x (rows, r) = U R`` with ``U (rows, r)`` orthonormal, ``R (r, r)``."""
  return jnp.linalg.qr(x, mode="reduced")


def pinv(x: jax.Array) -> jax.Array:
  """Moore-Penrose pseudo-inverse of a small square matrix.

  Through the SVD (``jnp.linalg.pinv``), so that a zero or rank-deficient
  ``R`` (a zero-initialised LoRA factor) gives a zero / truncated inverse
  rather than inf.
  """
  return jnp.linalg.pinv(x)


def inverse_sqrt_psd(v: jax.Array, shift: jax.Array,
                     eps: jax.Array) -> jax.Array:
  """``sym(Q diag(1 / (sqrt(w + shift) + eps)) Q.T)`` for ``v = Q diag(w) Q.T``.

  ``v`` is symmetric positive semi-definite by construction; eigenvalues a
  rounding error below zero are clipped to zero before the square root.
  """
  w, q = jnp.linalg.eigh(v)
  inv_root = 1.0 / (jnp.sqrt(jnp.maximum(w + shift, 0.0)) + eps)
  return sym((q * inv_root) @ q.T)


def escape_mass(v_old: jax.Array, v_new: jax.Array) -> jax.Array:
  """Second-moment mass lost by a basis change (ALGORITHMS.md 1.7).

  ``max(0, min(max(eig(v_old) - eig(v_new)), trace(v_old) - trace(v_new)))``
  with both spectra sorted ascending.
  """
  lost = jnp.max(jnp.linalg.eigvalsh(v_old) - jnp.linalg.eigvalsh(v_new))
  lost = jnp.minimum(lost, jnp.trace(v_old) - jnp.trace(v_new))
  return jnp.maximum(lost, 0.0)
