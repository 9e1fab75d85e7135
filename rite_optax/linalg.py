"""Small dense kernels on the ``r x r`` matrices of LoRA optimizers.

Each works on one matrix; callers vmap over stacked layers (LoRA-RITE over
every alike factor of a tree at once). The ``r x r``
problems are tiny (r <= 256), so the cost of everything here is ``O(r^3)``,
negligible next to the ``O((m + n) r^2)`` products with the factors.

The two ``gram_*_pass`` kernels are the small halves of a thin QR computed
from Gram matrices (:func:`gram_qr` puts them together): the factor is only
ever touched by matrix products that reduce to ``r x r``, so a factor
sharded along its rows needs no gathering, only ``r x r`` all-reduces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


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
  return escape_mass_from_spectra(
      jnp.linalg.eigvalsh(v_old), jnp.linalg.eigvalsh(v_new),
      jnp.trace(v_old), jnp.trace(v_new))


def escape_mass_from_spectra(eig_old: jax.Array, eig_new: jax.Array,
                             trace_old: jax.Array,
                             trace_new: jax.Array) -> jax.Array:
  """:func:`escape_mass` from the two spectra (any order) and traces."""
  lost = jnp.max(jnp.sort(eig_old) - jnp.sort(eig_new))
  lost = jnp.minimum(lost, trace_old - trace_new)
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


def gram_first_pass(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First pass of the Gram-based thin QR of ``X (rows, r)``, from ``X.T X``.

  With ``gram = V diag(w) V.T`` and ``s = sqrt(w + shift)``, returns
  ``m = V diag(1 / s)`` and ``r = diag(s) V.T`` (``m r = I``), so that
  ``U1 = X m`` has orthonormal columns up to ``eps cond(X)^2`` and
  ``X = U1 r``. ``shift = r eps max(w)`` (shifted CholeskyQR, Fukaya et al.
  2020) keeps ``1 / s`` bounded where rounding has made the Gram singular or
  indefinite; the second pass corrects what it perturbs. A zero ``gram`` (a
  zero factor) gives zeros.
  """
  w, v = jnp.linalg.eigh(sym(gram))
  w = jnp.maximum(w, 0.0)
  top = jnp.max(w)
  nonzero = top > 0
  s = jnp.sqrt(w + gram.shape[-1] * _eps(w.dtype) * top)
  s = jnp.where(nonzero, s, 1.0)
  m = jnp.where(nonzero, v / s, 0.0)
  r = jnp.where(nonzero, s[:, None] * v.T, 0.0)
  return m, r


def gram_second_pass(gram: jax.Array, r_first: jax.Array,
                     rtol: float | None = None) -> jax.Array:
  """Second pass: ``m2`` with ``U = U1 m2`` orthonormal to rounding.

  ``gram = U1.T U1`` of the first pass's ``U1`` (close to the identity),
  ``r_first`` its ``r``. With ``gram = V2 diag(s2^2) V2.T``,
  ``m2 = V2 diag(1 / s2)`` (CholeskyQR2, with ``eigh`` so that it cannot
  break down). Then ``X = U R`` with ``R = diag(s2) V2.T r_first``, and the
  columns of ``U`` whose row of ``R`` has norm ``<= rtol * max`` are dropped
  (zero in ``m2``): that is ``pinv``'s cutoff, ``rtol`` defaulting to
  ``jnp.linalg.pinv``'s ``10 r eps``, so a rank-deficient or zero factor gets
  a truncated or zero ``R^+ = m1 m2`` rather than inf.
  """
  w, v = jnp.linalg.eigh(sym(gram))
  s = jnp.sqrt(jnp.maximum(w, 0.0))
  if rtol is None:
    rtol = 10 * gram.shape[-1] * _eps(w.dtype)
  row_norms = s * jnp.linalg.norm(r_first.T @ v, axis=0)
  keep = row_norms > rtol * jnp.max(row_norms)
  return jnp.where(keep, v / jnp.where(keep, s, 1.0), 0.0)


def gram_qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Thin QR of ``x (rows, r)`` from Gram matrices: ``(U, R^+)``.

  ``U = x R^+`` has orthonormal columns spanning those of ``x`` (as
  accurate as Householder QR for ``cond(x)`` up to about ``1 / eps``), and
  ``R^+`` is the pseudo-inverse of an ``R`` with ``x = U R`` (rows of ``R``
  below ``pinv``'s cutoff dropped, see :func:`gram_second_pass`). ``U`` is
  ``Q`` of a QR up to a rotation, which is all a basis needs to be. Cost:
  three products of ``x``'s size with ``r x r`` (``6 rows r^2`` flops), two
  ``r x r`` ``eigh``.
  """
  m1, r1 = gram_first_pass(x.T @ x)
  u1 = x @ m1
  m2 = gram_second_pass(u1.T @ u1, r1)
  return u1 @ m2, m1 @ m2
