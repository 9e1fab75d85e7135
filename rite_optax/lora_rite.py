"""LoRA-RITE: robust, transformation-invariant adaptive preconditioning.

Yen, Si, Hsieh, Zhou, Dhillon, Kumar. "LoRA Done RITE: Robust Invariant
Transformation Equilibration for LoRA Optimization", ICLR 2025.

The update of ``A @ B.T`` does not depend on how the factors are scaled or
rotated: starting from ``(A S, B S^-T)`` for any invertible ``S`` gives the same
products at every step. Each factor's gradient is taken in the orthonormal
basis of the other factor (the "unmagnified" gradient), preconditioned there
by an ``r x r`` second moment, and carried back. The exact algorithm is
ALGORITHMS.md section 1; comments cite its steps.

How it is computed, and why:

* Every operation on a factor-sized array is a product with an ``r x r``
  matrix, or a product that reduces to one (a Gram matrix ``X.T Y``); the
  thin QR of 1.2 comes from Gram matrices (:func:`rite_optax.linalg.gram_qr`).
  Factors sharded along their rows are therefore never gathered: the only
  collectives are ``r x r`` all-reduces.
* Those products run per leaf, in the factor's own memory layout (Flax's
  ``lora_b (r, out)`` is not transposed). The ``r x r`` work of all alike
  pairs of the tree (same rank and dtype) runs as one batch: one ``eigh``
  call per kind for the whole tree, not one per layer and projection.
* The state is Adam's size (:class:`ScaleByLoraRiteState`).
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rite_optax import fused as fused_lib
from rite_optax import linalg
from rite_optax import pairs as pairs_lib


class ScaleByLoraRiteState(NamedTuple):
  """State of :func:`scale_by_lora_rite`: the size of Adam's.

  Every field has the params' tree. For a pair ``(A, B)``, ALGORITHMS.md 1
  keeps A's moments ``M_A (m, r)`` and ``V_A (r, r)`` in the orthonormal
  basis ``U_B`` of the other factor. With ``V_A = Q diag(w) Q.T`` they are
  stored as

  * ``mu`` at A's leaf: ``M_A Q diag(w)^-1/2`` (whitened first moment;
    zero in directions where ``w = 0``, where ``M_A`` is zero too), and
  * ``basis`` at B's leaf: ``U_B Q diag(w)^1/2``, B's basis rotated to the
    eigenvectors of ``V_A`` and scaled by the roots of its eigenvalues,

  (and the same with A and B swapped). Then ``basis[B] basis[B].T`` is ``V_A``
  written in B's row space, and in a new basis ``U_B'``, with
  ``C = U_B'.T basis[B]``, the transported moments of 1.6 are
  ``V_A' = C C.T`` and ``M_A' = mu[A] C.T``. Rotating ``U_B`` is free (any
  orthonormal basis serves, 1.6 transports between them), so ``V_A``'s
  ``r^2`` numbers need no array of their own: the state is two factor-sized
  arrays per factor and a count, as Adam's.

  Attributes:
    count: number of steps taken, ``int32``.
    mu: whitened first moments, each factor's own shape.
    basis: previous bases scaled by the partner's second moment, each
      factor's own shape (zeros at init, as ``U_old``).
    skipped: ``int32 (*batch,)`` per factor: 1 where the last update skipped
      that factor (1.4, or a non-finite gradient), else 0. Its sum is the
      ``skipped_factors`` of :func:`skip_metrics`.
    total_skipped: ``int32``, factors skipped over all updates (each stacked
      layer counts once), as ``optax.apply_if_finite``'s ``total_notfinite``.
    nu: with ``escape=True`` only (else ``None``): the eigenvalues ``w`` of
      each factor's second moment, ``(*batch, r)``, for 1.7.
    escape_mass: with ``escape=True`` only: ``(*batch,)`` (``rho_A``).
  """

  count: jax.Array
  mu: optax.Updates
  basis: optax.Updates
  skipped: optax.Updates
  total_skipped: jax.Array
  nu: Optional[optax.Updates] = None
  escape_mass: Optional[optax.Updates] = None


def bias_corrected_decay(beta: jax.Array, t: jax.Array) -> jax.Array:
  """``beta (1 - beta^t) / (1 - beta^(t+1))`` (Adafactor sec. 7.1); 0 at t=0."""
  return beta * (1 - beta**t) / (1 - beta**(t + 1))


_gram = pairs_lib.factor_gram
_times = pairs_lib.factor_times


def _nan_to_zero(x: jax.Array) -> jax.Array:
  return jnp.where(jnp.isfinite(x), x, 0.0)


# ------------------------------------------------ r x r math of one factor


def _revealed_spectrum(w: jax.Array, rtol: float
                       ) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues of a second moment with a rank-revealing cutoff.

  ``w`` (from ``eigh``) -> ``(w', present)``: ``present`` marks the
  eigenvalues above ``rtol * max(w)``, the others (and rounding errors below
  zero) are 0 in ``w'``. With ``rtol = 0`` every direction is present
  (ALGORITHMS.md 1.9 exactly). See "Rank-deficient gradients" there.
  """
  w = jnp.maximum(w, 0.0)
  if rtol == 0:
    return w, jnp.ones(w.shape, bool)
  present = w > rtol * jnp.max(w)
  return jnp.where(present, w, 0.0), present


def _second_pass(gram_u1, cross, m1, r1, *, factor_rtol):
  """1.2's second pass and 1.6's basis change, for one factor.

  ``gram_u1 = U1.T U1``, ``cross = U1.T basis_old`` for the first pass's
  ``U1 = X m1``. Returns ``m2`` (``U = U1 m2``), ``R^+ = m1 m2`` and the basis
  change ``C = U.T basis_old = m2.T cross``, which transports the *other*
  factor's moments. Rows of ``R`` at or below ``factor_rtol`` times the
  largest are dropped (:func:`rite_optax.linalg.gram_second_pass`).
  """
  m2 = linalg.gram_second_pass(gram_u1, r1, factor_rtol)
  return m2, linalg.matmul(m1, m2), linalg.matmul(m2.T, cross)


def _precondition(transport, second_raw, scale, rows, partner_r_pinv,
                  partner_m2, eig_old, rho, t, step, *, b1, b2, eps,
                  escape: bool, rank_rtol):
  """ALGORITHMS.md 1.6-1.10 and 1.12 for one factor, in ``r x r`` matrices.

  ``transport`` is ``C = U'.T basis_old`` of the *other* factor (in whose
  basis this factor's moments live), ``second_raw = Gbar.T Gbar`` of this
  factor's unmagnified gradient before clipping and ``scale`` the clip (0 if
  the factor is skipped). Returns the ``r x r`` matrices that the factor-sized
  products need (``mu' = mu K1 + nan_to_zero(Gbar K2)``, ``D = mu' K3``, the
  other factor's new ``basis = U1 K4``), the eigenvalues of ``V`` and ``rho``.
  """
  dtype = second_raw.dtype
  beta1 = bias_corrected_decay(jnp.asarray(b1, dtype), t)
  beta2 = bias_corrected_decay(jnp.asarray(b2, dtype), t)

  # 1.6: V' = P V P.T = C C.T (ScaleByLoraRiteState), non-finite -> 0.
  nu_moved = linalg.matmul(transport, transport.T)
  nu_moved = jnp.where(jnp.isfinite(nu_moved), nu_moved, 0.0)

  # 1.7: escape mass.
  if escape:
    lost = linalg.escape_mass_from_spectra(
        eig_old, jnp.linalg.eigvalsh(nu_moved), jnp.sum(eig_old),
        jnp.trace(nu_moved))
    rho = beta2 * (rho + lost)
  else:
    rho = jnp.zeros_like(rho)

  # 1.8: V = sym(bc V' + (1 - bc) S), S = Gbar.T Gbar / rows after 1.4-1.5.
  second = jnp.where(scale > 0, scale**2 * second_raw / rows, 0.0)
  nu = linalg.sym(beta2 * nu_moved + (1 - beta2) * second)

  # 1.9: V = Q diag(w) Q.T, Vis Q = Q diag(1 / (sqrt(w + rho) + eps)).
  w, q = jnp.linalg.eigh(nu)
  w, present = _revealed_spectrum(w, rank_rtol)
  vis = 1.0 / (jnp.sqrt(jnp.maximum(w + rho, 0.0)) + jnp.asarray(eps, dtype))
  # Directions of V that rounding cannot tell from 0 get no step (not 1/eps).
  vis = jnp.where(present, vis, 0.0)
  root = jnp.sqrt(w)
  whiten = jnp.where(w > 0, 1.0 / jnp.where(w > 0, root, 1.0), 0.0)

  # 1.10 in whitened coordinates: mu = M Q diag(w)^-1/2 with
  # M = bc1 M' + (1 - bc1) nan_to_zero(Gbar Vis), M' = mu_old C.T.
  # Each K ends in a product (linalg.scale_columns says why).
  k1 = linalg.matmul(transport.T, q * (beta1 * whiten))
  k2_scale = (1 - beta1) * scale * vis * whiten
  k2 = linalg.scale_columns(q, jnp.where(jnp.isfinite(k2_scale), k2_scale,
                                         0.0))
  # 1.12: D = M (R^+).T of the other factor (times step, 1.14's
  # -learning_rate if ours); its new basis U Q diag(w)^1/2.
  k3 = linalg.matmul((step * root)[:, None] * q.T, partner_r_pinv.T)
  k4 = linalg.matmul(partner_m2, q * root)
  return k1, k2, k3, k4, w, rho


# ------------------------------------- batching the r x r math of the tree


def _on_both_sides(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` of one factor -> ``fn`` on ``(N, 2, ...)`` batches: ``N`` alike
  adapters (pairs times stacked layers), side 0 the A factor, 1 the B."""
  return jax.vmap(jax.vmap(fn))


def _partner(x: jax.Array) -> jax.Array:
  """The other factor's value in a ``(N, 2, ...)`` batch."""
  return jnp.flip(x, axis=1)


# ------------------------------------------- the phases of one update (1.x)


class _Factors:
  """Both factors of every pair, per pair ``(A, B)``, each in its memory
  layout (``(nb, rows, r)``, or ``(nb, r, rows)`` when ``rank_first``), and
  the products on them that every phase uses."""

  def __init__(self, rank_first: list[tuple[bool, bool]],
               matmul: linalg.MatmulPrecision):
    self.rank_first = rank_first
    self.matmul = matmul

  def map(self, fn: Callable[..., Any], *per_pair) -> list[tuple[Any, Any]]:
    """``fn(rank_first, *values)`` on both factors of every pair."""
    return [tuple(fn(*args) for args in zip(rf, *(v[i] for v in per_pair)))
            for i, rf in enumerate(self.rank_first)]

  def gram(self, x, y):
    """Per factor ``x.T y`` (``(nb, r, r)``)."""
    return self.map(lambda rf, u, v: _gram(u, v, rf, self.matmul.gram), x, y)

  def times(self, x, m):
    """Per factor ``x @ m`` for ``r x r`` ``m``."""
    return self.map(lambda rf, u, k: _times(u, k, rf, self.matmul.product),
                    x, m)

  def empty(self) -> list[Any]:
    return [None] * len(self.rank_first)


def _first_passes(groups: list[pairs_lib.AlikeGroup], gram_x, out):
  """1.2's first QR pass of every factor from its Gram ``X.T X``: ``m1`` per
  factor (written into ``out``, ``U1 = X m1``) and per group the ``(N, 2,
  ...)`` batches ``(m1, r1)``."""
  first = []
  for group in groups:
    m1_g, r1_g = _on_both_sides(linalg.gram_first_pass)(group.stack(gram_x))
    group.unstack(m1_g, out)
    first.append((m1_g, r1_g))
  return first


def _second_passes(f: _Factors, groups: list[pairs_lib.AlikeGroup], first,
                   gram_u1, cross, *, rank_revealing: bool):
  """1.2's second pass and 1.6's basis change from ``U1.T U1`` and
  ``U1.T basis_old``: ``R^+`` per factor, and per group the batches
  ``(m2, R^+, C)``."""
  r_pinv, second = f.empty(), []
  for group, (m1_g, r1_g) in zip(groups, first):
    rank, dtype = m1_g.shape[-1], m1_g.dtype
    second_pass = functools.partial(
        _second_pass,
        factor_rtol=factor_rtol(rank, dtype) if rank_revealing else None)
    m2_g, r_pinv_g, transport_g = _on_both_sides(second_pass)(
        group.stack(gram_u1), group.stack(cross), m1_g, r1_g)
    group.unstack(r_pinv_g, r_pinv)
    second.append((m2_g, r_pinv_g, transport_g))
  return r_pinv, second


def _orthonormalize(f: _Factors, groups: list[pairs_lib.AlikeGroup], x, basis, *,
                    rank_revealing: bool):
  """1.2: the thin QR of every factor from Gram matrices, and 1.6's basis
  change ``C = U.T basis_old``.

  :func:`rite_optax.linalg.gram_qr` written out, so that ``U = U1 m2`` is
  only used through products and never formed. Returns ``U1 = X m1`` per
  factor, ``R^+`` per factor, and per group the ``(N, 2, ...)`` batches
  ``(m2, R^+, C)``.
  """
  m1 = f.empty()
  first = _first_passes(groups, f.gram(x, x), m1)
  u1 = f.times(x, m1)
  r_pinv, second = _second_passes(f, groups, first, f.gram(u1, u1),
                                  f.gram(u1, basis),
                                  rank_revealing=rank_revealing)
  return u1, r_pinv, second


def _unmagnify(f: _Factors, grads, r_pinv):
  """1.3: each factor's gradient in the other factor's basis, ``Gbar_A = G_A
  R_B^+``, ``Gbar_B = G_B R_A^+``."""
  return f.times(grads, [(rb, ra) for ra, rb in r_pinv])


def _skip_and_clip(second_raw, rows, *,
                   update_skipping, clip_unmagnified_grad):
  """1.4, skipping, and 1.5, global clipping, from ``Gbar.T Gbar`` of every
  factor (per group of alike pairs, ``(N, 2, r, r)``) and its row count.

  A factor with a non-finite gradient is skipped whatever the threshold (our
  safe behaviour: no NaN reaches the state or the global norm). Returns per
  group the factors kept, and the clip factor of 1.5.
  """
  sq_norms = [jnp.trace(s, axis1=-2, axis2=-1) for s in second_raw]
  keep = []
  for sq, n, s in zip(sq_norms, rows, second_raw):
    rms = jnp.sqrt(sq / (n * s.shape[-1]))
    too_big = (update_skipping > 0) & (rms > update_skipping)
    keep.append(jnp.isfinite(sq) & ~too_big)
  norm = jnp.sqrt(sum(jnp.sum(jnp.where(k, sq, 0.0))
                      for k, sq in zip(keep, sq_norms)))
  clip = jnp.where(
      (clip_unmagnified_grad > 0) & (norm > clip_unmagnified_grad),
      clip_unmagnified_grad / jnp.where(norm > 0, norm, 1.0), 1.0)
  return keep, clip


def _precondition_all(f: _Factors, groups: list[pairs_lib.AlikeGroup],
                      second, second_raw, keep, clip, rows, eig_old, rho,
                      count, step, *, b1, b2, eps, escape: bool,
                      rank_revealing: bool):
  """1.6-1.9, and the ``r x r`` parts of 1.10 and 1.12, for every factor
  (:func:`_precondition`, one batch per group; ``step`` multiplies K3).
  Returns per factor the matrices ``K1 .. K4``, the eigenvalues of ``V`` and
  ``rho``."""
  k1, k2, k3, k4, eig_new, new_rho = (f.empty() for _ in range(6))
  for group, (m2_g, r_pinv_g, transport_g), raw_g, keep_g, rows_g in zip(
      groups, second, second_raw, keep, rows):
    dtype = raw_g.dtype
    precondition = _on_both_sides(functools.partial(
        _precondition, b1=b1, b2=b2, eps=eps, escape=escape,
        rank_rtol=second_moment_rtol(raw_g.shape[-1], dtype)
        if rank_revealing else 0.0))
    if escape:
      eig_old_g, rho_g = group.stack(eig_old), group.stack(rho)
    else:
      eig_old_g = jnp.zeros(raw_g.shape[:-1], dtype)
      rho_g = jnp.zeros(raw_g.shape[:2], dtype)
    scale = jnp.where(keep_g, clip.astype(dtype), 0.0)
    t = jnp.broadcast_to(count.astype(dtype), scale.shape)
    step_g = jnp.broadcast_to(jnp.asarray(step, dtype), scale.shape)
    k1_g, k2_g, k3_g, k4_g, eig_g, rho_g = precondition(
        _partner(transport_g), raw_g, scale, rows_g.astype(dtype),
        _partner(r_pinv_g), _partner(m2_g), eig_old_g, rho_g, t, step_g)
    for batch, out in ((k1_g, k1), (k2_g, k2), (k3_g, k3), (eig_g, eig_new),
                       (rho_g, new_rho)):
      group.unstack(batch, out)
    # A's K4 makes B's new basis and the other way round.
    group.unstack(_partner(k4_g), k4)
  return k1, k2, k3, k4, eig_new, new_rho


def _apply(f: _Factors, x, mu, gbar, u1, k1, k2, k3, k4, eig_new, *,
           update_capping, decay, weight_decay):
  """1.10-1.14 on the factors: the new first moments, the directions (K3
  carries 1.14's ``-learning_rate`` if it is ours, and ``decay`` is then
  ``-learning_rate * weight_decay``) and the new bases."""
  # 1.10: mu' = mu K1 + nan_to_zero(Gbar K2).
  new_mu = f.map(
      lambda rf, m, ka, g, kb: (
          _times(m, ka, rf, f.matmul.product)
          + _nan_to_zero(_times(g, kb, rf, f.matmul.product))),
      mu, k1, gbar, k2)
  directions = _directions(f, x, new_mu, k3, eig_new,
                           update_capping=update_capping, decay=decay,
                           weight_decay=weight_decay)
  # 1.14: U_old = U, kept as the other factor's second-moment root.
  return new_mu, directions, f.times(u1, k4)


def _directions(f: _Factors, x, new_mu, k3, eig_new, *, update_capping,
                decay, weight_decay):
  """1.11-1.13: the capped directions ``mu' K3`` plus the weight decay."""
  # 1.11: update capping (0 disables): rms of M = mu Q diag(w)^1/2.
  if _maybe_positive(update_capping):
    def capped(rf, m, w, k):
      column_sq = jnp.sum(m * m, axis=-1 if rf else -2)
      rms = jnp.sqrt(jnp.sum(column_sq * jnp.maximum(w, 0.0), axis=-1)
                     / m[0].size)
      safe_cap = jnp.where(update_capping > 0, update_capping, 1.0)
      factor = jnp.where(update_capping > 0,
                         1.0 / jnp.maximum(1.0, rms / safe_cap), 1.0)
      return k * factor.astype(k.dtype)[:, None, None]
    k3 = f.map(capped, new_mu, eig_new, k3)
  # 1.12: back to factor coordinates.
  directions = f.times(new_mu, k3)
  # 1.13: weight decay, D + weight_decay X (times 1.14's -learning_rate).
  if not _known_zero(weight_decay):
    directions = f.map(
        lambda _, d, v: d + jnp.asarray(decay, d.dtype) * v, directions, x)
  return directions


# --------------------------- the same phases in fused passes (fused=True)
# XLA writes every product with a factor to memory (rite_optax.fused says
# why that costs); these read X, the basis and G once for all of 1.2-1.4's
# Grams, and X, G and mu once for 1.10-1.14's results. Only the algebra
# that lets the passes merge differs from the unfused phases: Gbar = G R_p^+
# = Y m2_p with Y = G m1_p, so S = Gbar.T Gbar = m2_p.T (Y.T Y) m2_p is
# summed in the pass of the QR's second Grams (m2_p has condition ~1, so
# the sandwich loses nothing).


def _per_pair(values, k: int):
  """Per pair ``(a, b)`` of ``k``-lists -> ``k`` per-pair lists of pairs."""
  return [[(a[j], b[j]) for a, b in values] for j in range(k)]


def _orthonormalize_fused(f: _Factors, groups: list[pairs_lib.AlikeGroup],
                          x, basis, grads, *, rank_revealing: bool):
  """1.2, 1.3's products and 1.6's basis change, with one fused pass per
  factor for ``U1.T U1``, ``U1.T basis_old`` and ``Y.T Y`` (``U1 = X m1``,
  ``Y = G m1_p``). Returns ``m1`` and ``R^+`` per factor, the second
  passes' batches ``(m2, R^+, C)`` and ``Gbar.T Gbar`` per group."""
  m1 = f.empty()
  first = _first_passes(groups, f.gram(x, x), m1)
  p = f.matmul

  def body(blocks, matrices):
    x_blk, basis_blk, g_blk = blocks
    own_m1, partner_m1 = matrices
    u1 = linalg.matmul(x_blk, own_m1, p.product)
    y = linalg.matmul(g_blk, partner_m1, p.product)
    return [], [linalg.matmul(u1.T, u1, p.gram),
                linalg.matmul(u1.T, basis_blk, p.gram),
                linalg.matmul(y.T, y, p.gram)]

  def one_pass(rf, xs, bs, gs, own, partner):
    r = own.shape[-1]
    return fused_lib.factor_pass(body, [xs, bs, gs], [own, partner],
                             rank_first=rf, out_columns=(),
                             gram_shapes=[(r, r)] * 3)[1]

  grams = f.map(one_pass, x, basis, grads, m1, [(b, a) for a, b in m1])
  gram_u1, cross, gram_y = _per_pair(grams, 3)
  r_pinv, second = _second_passes(f, groups, first, gram_u1, cross,
                                  rank_revealing=rank_revealing)
  second_raw = []
  for group, (m2_g, _, _) in zip(groups, second):
    m2_p = _partner(m2_g)
    second_raw.append(linalg.matmul(jnp.swapaxes(m2_p, -1, -2), linalg.matmul(
        group.stack(gram_y), m2_p)))
  return m1, r_pinv, second_raw, second


def _apply_fused(f: _Factors, x, mu, grads, m1, r_pinv, k1, k2, k3, k4,
                 eig_new, *, update_capping, decay, weight_decay):
  """:func:`_apply` in one fused pass per factor reading ``X``, ``G`` and
  ``mu``: ``mu' = mu K1 + nan_to_zero(G (R_p^+ K2))``, ``D = mu' K3 +
  decay X`` and the new basis ``U1 K4 = X (m1 K4)``. With update capping the
  directions need ``mu'``'s norm first, so they come from
  :func:`_directions` after the pass."""
  p = f.matmul
  with_directions = not _maybe_positive(update_capping)
  with_decay = with_directions and not _known_zero(weight_decay)

  def body(blocks, matrices):
    x_blk, g_blk, mu_blk = blocks
    k1_, partner_k2, m1_k4 = matrices[:3]
    new_mu = (linalg.matmul(mu_blk, k1_, p.product)
              + _nan_to_zero(linalg.matmul(g_blk, partner_k2, p.product)))
    outs = [new_mu, linalg.matmul(x_blk, m1_k4, p.product)]
    if with_directions:
      d = linalg.matmul(new_mu, matrices[3], p.product)
      if with_decay:
        d = d + linalg.matmul(x_blk, matrices[4], p.product)
      outs.append(d)
    return outs, []

  def one_pass(rf, xs, gs, ms, k1_, rp, k2_, m1_, k4_, k3_):
    r = k1_.shape[-1]
    matrices = [k1_, linalg.matmul(rp, k2_), linalg.matmul(m1_, k4_)]
    if with_directions:
      matrices.append(k3_)
    if with_decay:
      matrices.append(jnp.broadcast_to(
          jnp.asarray(decay, k1_.dtype) * jnp.eye(r, dtype=k1_.dtype),
          k1_.shape))
    return fused_lib.factor_pass(body, [xs, gs, ms], matrices, rank_first=rf,
                             out_columns=[r] * (2 + with_directions),
                             gram_shapes=())[0]

  outs = f.map(one_pass, x, grads, mu, k1, [(b, a) for a, b in r_pinv], k2,
               m1, k4, k3)
  if with_directions:
    new_mu, new_basis, directions = _per_pair(outs, 3)
  else:
    new_mu, new_basis = _per_pair(outs, 2)
    directions = _directions(f, x, new_mu, k3, eig_new,
                             update_capping=update_capping, decay=decay,
                             weight_decay=weight_decay)
  return new_mu, directions, new_basis


def second_moment_rtol(rank: int, dtype: Any) -> float:
  """Eigenvalues of a second moment ``V`` at or below this times the largest
  are absent (1.9): ``10 r eps``, the resolution of ``eigh`` in ``dtype``
  (``jnp.linalg.pinv``'s rule)."""
  return 10 * rank * float(jnp.finfo(dtype).eps)


def factor_rtol(rank: int, dtype: Any) -> float:
  """Singular values of a factor's ``R`` at or below this times the largest
  are absent (1.3, 1.12): ``max(10 r eps, min(sqrt(eps), 1e-6))``.

  Rounding leaves noise in a factor the optimizer built, relative to its
  largest singular value, about ``eps`` times the dynamic range of the
  preconditioner (up to ``1 / eps`` of the spec). In float64, ``sqrt(eps) =
  1.5e-8`` separates that noise from real directions; in float32 nothing
  above ``pinv``'s ``10 r eps`` is safe to cut (a factor of condition number
  1e5 is common), and the cutoff of :func:`second_moment_rtol` keeps the noise
  below it. Factors of condition number up to ``1e6`` are resolved in every
  dtype, so the invariance holds for transforms that keep them so.
  """
  eps = float(jnp.finfo(dtype).eps)
  return max(10 * rank * eps, min(float(np.sqrt(eps)), 1e-6))


def _check_number(name: str, value: Any, kind: str = "a number") -> None:
  """Refuse, when the optimizer is built, a hyperparameter that is no number
  (a string such as ``"1e-3"`` included): optax would fail, or convert it,
  only at the first update."""
  if isinstance(value, (bool, str, bytes)) or not isinstance(
      value, (numbers.Real, np.ndarray, jax.Array)):
    raise ValueError(f"{name} must be {kind}, got {value!r}")
  if not jnp.issubdtype(jnp.result_type(value), jnp.number):
    raise ValueError(f"{name} must be {kind}, got {value!r}")


def _known_zero(x: Any) -> bool:
  """True only for a hyperparameter known at trace time to be 0."""
  return isinstance(x, (int, float)) and x == 0


def _maybe_positive(x: Any) -> bool:
  """False only for a hyperparameter known at trace time to be <= 0."""
  return not isinstance(x, (int, float)) or x > 0


def scale_by_lora_rite(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    clip_unmagnified_grad: float = 1.0,
    update_skipping: float = 1.0,
    update_capping: float = 0.0,
    escape: bool = False,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    weight_decay: float = 0.0,
    rank_revealing: bool = True,
    precision: linalg.PrecisionLike = None,
    fused: bool = False,
) -> optax.GradientTransformation:
  """LoRA-RITE's preconditioning (ALGORITHMS.md 1, steps 1-13, and 1b).

  The tree given to ``init`` and ``update`` holds LoRA factors only, in any
  layout :mod:`rite_optax.pairs` recognises (or describes with
  ``pair_spec``); ``update`` needs ``params``. Math runs in at least float32
  (float64 stays float64), the state is kept in that precision, and the
  updates come back in each parameter's dtype.

  A factor whose gradient has a non-finite entry is skipped on that step, as
  an over-large one is (1.4): its unmagnified gradient counts as zero, its
  moments decay as for a zero gradient, and params and state stay finite.

  The thin QR of 1.2 is computed from Gram matrices in two passes
  (:func:`rite_optax.linalg.gram_qr`): every operation on a factor is a
  product with an ``r x r`` matrix or a product reducing to one, so factors
  sharded along their rows are never gathered (only ``r x r`` matrices are
  all-reduced).

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the square root of the second moment's eigenvalues.
    clip_unmagnified_grad: global norm clip of the unmagnified gradients over
      every pair of the tree (0 disables).
    update_skipping: a factor whose unmagnified gradient has an rms above this
      is skipped on that step (0 disables).
    update_capping: caps the rms of the first moment (0 disables).
    escape: accumulate the escape mass of the second moment (1.7).
    pair_spec: optional ``(path, leaf) -> FactorSpec | None`` for layouts the
      automatic rules do not know (see :mod:`rite_optax.pairs`). Pass
      ``static_args="pair_spec"`` to ``optax.inject_hyperparams``.
    learning_rate: if given, the updates are ``-learning_rate`` times the
      direction (step 14 without weight decay), the factor folded into the
      last ``r x r`` product rather than a separate pass over the factors as
      ``optax.scale_by_learning_rate`` would be. A schedule is evaluated at
      the step count.
    weight_decay: step 13, ``D + weight_decay * X`` (times
      ``-learning_rate`` if that is given).
    rank_revealing: treat directions that rounding cannot tell from zero as
      absent: eigenvalues of ``V`` at or below ``10 r eps`` of the largest get
      no step, and singular values of a factor at or below
      :func:`factor_rtol` of the largest are dropped from ``R^+``. Keeps
      training bounded when the gradient has rank below ``r`` (``B = 0``
      init, few tokens per step). ``False``: ALGORITHMS.md 1 exactly. See
      ALGORITHMS.md 1b.
    precision: of the products with a factor-sized operand
      (:func:`rite_optax.linalg.matmul_precision`): one
      ``jax.lax.Precision`` (or its name) for all, or a pair ``(gram,
      product)``. Default ``HIGHEST`` for both: the Gram matrices of the QR
      and of the second moment are factorised, where a bfloat16 (TPU
      ``DEFAULT``) or TF32 (GPU ``DEFAULT`` and ``HIGH``) rounding of the
      operands, amplified by the factor's condition number, would break the
      invariance in float32. The ``r x r`` products are ``HIGHEST`` whatever
      this says. Cost: on TPU ``HIGHEST`` is six bfloat16 MXU passes
      (``HIGH`` three), on GPU float32 rather than TF32 tensor-core
      throughput; these products are memory-bound up to ``r`` of about 100
      on both (``2 r`` flops per factor element read), so the price is
      expected to be small there and to grow with ``r`` beyond. No effect on
      CPU, nor for float64 or bfloat16 operands. Unmeasured on TPU / GPU.
    fused: run the products with the factors as two fused Pallas passes per
      factor (:mod:`rite_optax.fused`) after the Gram ``X.T X``: 7
      factor-sized reads and 3 writes per factor rather than about 20
      passes. For TPU / GPU, on unsharded or replicated factors (a Pallas
      kernel is not partitioned); on a CPU it runs in Pallas's interpreter,
      slower than the default. Same math, rounded differently (tested
      against the default); unmeasured on TPU / GPU.

  Cost per pair: ``O((m + n) r^2 + r^3)`` flops: per factor ten products of
  the factor's size with ``r x r`` matrices (about ``20 (m + n) r^2``), and
  three ``r x r`` ``eigh``. State: two factor-sized arrays per factor
  (``mu``, ``basis``), as Adam's ``mu`` and ``nu``
  (:class:`ScaleByLoraRiteState`), plus ``r + 1`` numbers per factor with
  ``escape=True``.
  """

  for name, value in dict(
      b1=b1, b2=b2, eps=eps, clip_unmagnified_grad=clip_unmagnified_grad,
      update_skipping=update_skipping, update_capping=update_capping,
      weight_decay=weight_decay).items():
    _check_number(name, value)
  if learning_rate is not None and not callable(learning_rate):
    _check_number("learning_rate", learning_rate, "a number, an array or a "
                  "schedule (step -> number)")
  if pair_spec is not None and not callable(pair_spec):
    raise ValueError(
        f"pair_spec must be a function (path, leaf) -> FactorSpec | None, got "
        f"{type(pair_spec).__name__}. Under optax.inject_hyperparams, pass "
        "static_args='pair_spec' (optax would call it as a schedule)")

  matmul = linalg.matmul_precision(precision)

  def find_pairs(params):
    found = pairs_lib.find_pairs(params, pair_spec)
    for layout, leaf in zip(found.layouts, jax.tree_util.tree_leaves(params)):
      if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(
            f"{layout.path}: LoRA-RITE trains floating-point factors, but "
            f"this one has dtype {leaf.dtype}")
    for pair in found.pairs:
      for layout in (pair.a, pair.b):
        if layout.rows < layout.rank:
          # The thin QR of 1.2 needs an r x r R; such an adapter could hold
          # a full-rank update with a smaller r anyway.
          raise ValueError(
              f"{layout.path}: LoRA-RITE needs rank <= rows, but this factor "
              f"has {layout.rows} rows and rank {layout.rank}")
    return found

  def init_fn(params):
    found = find_pairs(params)
    dtypes = [pairs_lib.compute_dtype(leaf.dtype)
              for leaf in jax.tree_util.tree_leaves(params)]

    def zeros(p):
      return jnp.zeros(p.shape, pairs_lib.compute_dtype(p.dtype))

    nu = escape_mass = None
    if escape:
      nu = found.init_per_adapter(params, lambda l: (l.rank,), dtypes)
      escape_mass = found.init_per_adapter(params, lambda l: (), dtypes)
    return ScaleByLoraRiteState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        basis=jax.tree.map(zeros, params),
        skipped=found.init_per_adapter(params, lambda l: (),
                                       [jnp.int32] * len(dtypes)),
        total_skipped=jnp.zeros([], jnp.int32),
        nu=nu,
        escape_mass=escape_mass,
    )

  def update_fn(updates, state, params=None):
    inputs = pairs_lib.pair_inputs("scale_by_lora_rite", updates, params,
                                   native=True, find=find_pairs)
    found = inputs.found
    found.check_like(state.mu, "state.mu")
    found.check_like(state.basis, "state.basis")
    f = _Factors([(p.a.rank_first, p.b.rank_first) for p in found.pairs],
                 matmul)
    x = inputs.factors
    mu = inputs.split(state.mu, "state.mu")
    basis = inputs.split(state.basis, "state.basis")
    groups = inputs.groups()

    if fused:
      m1, r_pinv, second_raw, second = _orthonormalize_fused(
          f, groups, x, basis, inputs.grads, rank_revealing=rank_revealing)
    else:
      u1, r_pinv, second = _orthonormalize(f, groups, x, basis,
                                           rank_revealing=rank_revealing)
      gbar = _unmagnify(f, inputs.grads, r_pinv)
      second_raw = [group.stack(f.gram(gbar, gbar)) for group in groups]
    rows = [group.stack([(np.full(a.shape[0], p.a.rows),
                          np.full(b.shape[0], p.b.rows))
                         for (a, b), p in zip(x, found.pairs)])
            for group in groups]
    keep, clip = _skip_and_clip(second_raw, rows,
                                update_skipping=update_skipping,
                                clip_unmagnified_grad=clip_unmagnified_grad)
    eig_old = rho = None
    if escape:
      eig_old = found.split_per_adapter(state.nu, "state.nu")
      rho = found.split_per_adapter(state.escape_mass, "state.escape_mass")
    # 1.14's -learning_rate, if ours, is folded into K3 (and the decay).
    step, decay = 1.0, weight_decay
    if learning_rate is not None:
      step_size = (learning_rate(state.count) if callable(learning_rate)
                   else learning_rate)
      step, decay = -step_size, -step_size * weight_decay
    k1, k2, k3, k4, eig_new, new_rho = _precondition_all(
        f, groups, second, second_raw, keep, clip, rows, eig_old, rho,
        state.count, step, b1=b1, b2=b2, eps=eps, escape=escape,
        rank_revealing=rank_revealing)
    apply_kw = dict(update_capping=update_capping, decay=decay,
                    weight_decay=weight_decay)
    if fused:
      new_mu, directions, new_basis = _apply_fused(
          f, x, mu, inputs.grads, m1, r_pinv, k1, k2, k3, k4, eig_new,
          **apply_kw)
    else:
      new_mu, directions, new_basis = _apply(
          f, x, mu, gbar, u1, k1, k2, k3, k4, eig_new, **apply_kw)

    nu = escape_mass = None
    if escape:
      nu = found.merge_per_adapter(state.nu, eig_new)
      escape_mass = found.merge_per_adapter(state.escape_mass, new_rho)
    skipped = f.empty()
    for group, keep_g in zip(groups, keep):
      group.unstack((~keep_g).astype(jnp.int32), skipped)
    num_skipped = sum(jnp.sum(k == 0) for k in keep).astype(jnp.int32)
    new_state = ScaleByLoraRiteState(
        count=optax.safe_increment(state.count),
        mu=inputs.merge(state.mu, new_mu),
        basis=inputs.merge(state.basis, new_basis),
        skipped=found.merge_per_adapter(state.skipped, skipped),
        total_skipped=state.total_skipped + num_skipped,
        nu=nu,
        escape_mass=escape_mass,
    )
    return inputs.merge(updates, directions, updates=True), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def lora_rite(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    clip_unmagnified_grad: float = 1.0,
    update_skipping: float = 1.0,
    update_capping: float = 0.0,
    weight_decay: float = 0.0,
    escape: bool = False,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
    rank_revealing: bool = True,
    precision: linalg.PrecisionLike = None,
    fused: bool = False,
) -> optax.GradientTransformation:
  """LoRA-RITE (Yen et al., ICLR 2025), ALGORITHMS.md 1, defaults included.

  One :func:`scale_by_lora_rite` that also does steps 13 and 14: the
  learning rate and the weight decay are folded into its last ``r x r``
  product (one pass over the factors less than optax's
  ``add_decayed_weights`` and ``scale_by_learning_rate`` would take). The
  optimizer is a one-element ``optax.chain`` whatever the hyperparameters'
  values, so ``state[0]`` is the :class:`ScaleByLoraRiteState` and a
  checkpoint carries between runs with and without weight decay (only
  ``escape``, a structural flag, adds state). ``learning_rate`` may be a
  schedule. Use it like any optax optimizer, on a tree of LoRA factors
  (``nnx.state(model, nnx.LoRAParam)``)::

      tx = optax.chain(optax.clip_by_global_norm(1.0),
                       rite_optax.lora_rite(1e-3))

  With ``optax.inject_hyperparams``, a ``pair_spec`` function must be named
  static (``static_args="pair_spec"``): optax takes any callable for a
  schedule and calls it with the step count, before this function runs (the
  error then comes from the spec: "missing 1 required positional argument:
  'leaf'"); whatever non-callable optax would pass here is refused, with
  that advice.

  See :func:`scale_by_lora_rite` for the arguments, the cost and the state.
  """
  if learning_rate is None:
    raise ValueError("learning_rate must be a number, an array or a schedule "
                     "(step -> number), got None")
  return optax.chain(scale_by_lora_rite(
      b1=b1, b2=b2, eps=eps, clip_unmagnified_grad=clip_unmagnified_grad,
      update_skipping=update_skipping, update_capping=update_capping,
      escape=escape, pair_spec=pair_spec, learning_rate=learning_rate,
      weight_decay=weight_decay, rank_revealing=rank_revealing,
      precision=precision, fused=fused))


def skip_metrics(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """How many LoRA factors the last update skipped, for a train step's metrics.

  ``skipped_factors``: the factors (one per stacked layer) that the last
  update of every :class:`ScaleByLoraRiteState` in ``opt_state`` skipped
  (1.4, or a non-finite gradient); ``skippable_factors``: how many there are.
  Both 0 for an optimizer without such a state. Jit-compatible; pass the
  result to :func:`warn_if_every_factor_skipped` on the host.
  """
  states = [leaf for leaf in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ScaleByLoraRiteState))
            if isinstance(leaf, ScaleByLoraRiteState)]
  flags = [leaf for st in states for leaf in jax.tree_util.tree_leaves(
      st.skipped)]
  skipped = sum((jnp.sum(f, dtype=jnp.int32) for f in flags),
                jnp.zeros([], jnp.int32))
  return {"skipped_factors": skipped,
          "skippable_factors": jnp.asarray(sum(f.size for f in flags),
                                           jnp.int32)}


_warned_every_factor_skipped = False


def warn_if_every_factor_skipped(metrics: dict[str, Any]) -> bool:
  """Warn, once per process, when a step skipped every LoRA factor.

  ``metrics`` holds :func:`skip_metrics`'s keys (as the train step's do).
  Host side: call it in the train loop with each step's metrics. Returns
  whether it warned now.
  """
  global _warned_every_factor_skipped
  total = int(metrics.get("skippable_factors", 0))
  if (_warned_every_factor_skipped or total == 0
      or int(metrics.get("skipped_factors", 0)) < total):
    return False
  _warned_every_factor_skipped = True
  warnings.warn(
      f"LoRA-RITE skipped all {total} LoRA factors in this step, so nothing "
      "trained: every unmagnified gradient had an rms above update_skipping "
      "(or a non-finite entry). With a summed rather than mean loss, or a "
      "large loss scale, gradients are that large by construction: use a "
      "mean loss, or raise update_skipping (0 disables skipping).",
      RuntimeWarning, stacklevel=2)
  return True
