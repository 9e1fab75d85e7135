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


def solve_sylvester_sym(p: jax.Array, q: jax.Array, c: jax.Array,
                        rcond: float | None = None) -> jax.Array:
  """Solve ``P X + X Q = C`` for symmetric (positive semi-definite) ``P, Q``.

  ``P (p, p)``, ``Q (q, q)``, ``C (p, q)``. Through the eigendecompositions
  ``P = Up diag(a) Up.T`` and ``Q = Uq diag(b) Uq.T``, in which the operator
  ``X -> P X + X Q`` is diagonal with eigenvalues ``a_i + b_j``:
  ``X = Up ((Up.T C Uq) / (a_i + b_j)) Uq.T``. Only orthogonal transforms and
  one elementwise division, so it is backward stable (no Kronecker system,
  no Schur form needed for symmetric inputs).

  A singular operator, ``a_i + b_j == 0`` (e.g. ``P = B.T B = 0`` next to a
  rank-deficient ``Q``, or ``P = Q = 0``), has those components dropped:
  every ``|a_i + b_j| <= rcond * max |a_k + b_l|`` gives 0 in ``X``
  (``rcond`` defaults to ``max(p, q) * eps`` of the compute dtype, the
  rounding level of the eigenvalues). The result is then the Moore-Penrose,
  minimum-norm least-squares solution, as ``pinv`` would give for a
  singular matrix, and never inf or NaN. Where ``P`` or ``Q`` is definite
  (a zero-initialised LoRA factor next to a full-rank one) nothing is
  dropped and the solution is exact.

  Computed in ``float32`` or wider (``promote_types(dtype, float32)``).
  Cost: two ``eigh`` and four products, ``O(p^3 + q^3 + p q (p + q))``.
  """
  dtype = jnp.promote_types(jnp.result_type(p, q, c), jnp.float32)
  p, q, c = (jnp.asarray(x, dtype) for x in (p, q, c))
  a, basis_p = jnp.linalg.eigh(sym(p))
  b, basis_q = jnp.linalg.eigh(sym(q))
  denom = a[:, None] + b[None, :]
  if rcond is None:
    rcond = max(p.shape[-1], q.shape[-1]) * float(jnp.finfo(dtype).eps)
  scale = jnp.max(jnp.abs(denom))
  keep = jnp.abs(denom) > rcond * scale
  coeff = basis_p.T @ c @ basis_q
  solution = jnp.where(keep, coeff / jnp.where(keep, denom, 1.0), 0.0)
  return basis_p @ solution @ basis_q.T


def pinv_psd(x: jax.Array, rtol: float | None = None) -> jax.Array:
  """Pseudo-inverse of a symmetric positive semi-definite matrix, via ``eigh``.

  Equal to :func:`pinv` on such matrices (their singular values are their
  eigenvalues), with the same cutoff: eigenvalues ``<= rtol * max |w|`` are
  dropped, ``rtol`` defaulting to ``jnp.linalg.pinv``'s ``10 * n * eps``.
  Cheaper than the SVD; a zero matrix gives zero.
  """
  w, q = jnp.linalg.eigh(sym(x))
  if rtol is None:
    rtol = 10 * x.shape[-1] * float(jnp.finfo(w.dtype).eps)
  keep = w > rtol * jnp.max(jnp.abs(w))
  inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
  return sym((q * inv) @ q.T)
