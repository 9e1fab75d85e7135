"""LoRA-RITE: robust, transformation-invariant adaptive preconditioning.

Yen, Si, Hsieh, Zhou, Dhillon, Kumar. "LoRA Done RITE: Robust Invariant
Transformation Equilibration for LoRA Optimization", ICLR 2025.

The update of ``A @ B.T`` does not depend on how the factors are scaled or
rotated: starting from ``(A S, B S^-T)`` for any invertible ``S`` gives the same
products at every step. Each factor's gradient is taken in the orthonormal
basis of the other factor (the "unmagnified" gradient), preconditioned there
by an ``r x r`` second moment, and carried back. The exact algorithm is
ALGORITHMS.md section 1; comments cite its steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from rite_optax import linalg
from rite_optax import pairs as pairs_lib


class ScaleByLoraRiteState(NamedTuple):
  """State of :func:`scale_by_lora_rite`; every field has the params' tree.

  Attributes:
    count: number of steps taken, ``int32``.
    mu: first moments, each factor's own shape (ALGORITHMS.md ``M_A``).
    nu: second moments, ``(*batch, r, r)`` at each factor (``V_A``).
    basis: previous orthonormal bases, each factor's own shape (``U_A_old``).
    escape_mass: ``(*batch,)`` at each factor (``rho_A``).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  basis: optax.Updates
  escape_mass: optax.Updates


class _FactorState(NamedTuple):
  mu: jax.Array      # (rows, r)
  nu: jax.Array      # (r, r)
  basis: jax.Array   # (rows, r), this factor's previous basis
  escape_mass: jax.Array  # ()


def bias_corrected_decay(beta: jax.Array, t: jax.Array) -> jax.Array:
  """``beta (1 - beta^t) / (1 - beta^(t+1))`` (Adafactor sec. 7.1); 0 at t=0."""
  return beta * (1 - beta**t) / (1 - beta**(t + 1))


def _nonfinite_to_nan(x: jax.Array) -> jax.Array:
  return jnp.where(jnp.isfinite(x), x, jnp.nan)


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def _unmagnified_grads(a, b, grad_a, grad_b, update_skipping):
  """ALGORITHMS.md 1.1-1.4 on one canonical pair ``a (m, r)``, ``b (n, r)``.

  Returns the unmagnified gradients, both orthonormal bases and both ``R^+``.
  """
  grad_a = _nonfinite_to_nan(grad_a)  # 1.1
  grad_b = _nonfinite_to_nan(grad_b)
  basis_a, r_a = linalg.thin_qr(a)  # 1.2
  basis_b, r_b = linalg.thin_qr(b)
  r_a_pinv, r_b_pinv = linalg.pinv(r_a), linalg.pinv(r_b)
  gbar_a = grad_a @ r_b_pinv  # 1.3
  gbar_b = grad_b @ r_a_pinv

  def skip(gbar):
    # 1.4, and our safe behaviour for non-finite gradients: a factor whose
    # unmagnified gradient is not finite is skipped whatever the threshold,
    # so that no NaN reaches the state or the global norm of step 1.5.
    rms = _rms(gbar)
    too_big = (update_skipping > 0) & (rms > update_skipping)
    return jnp.where(too_big | ~jnp.isfinite(rms), jnp.zeros_like(gbar), gbar)

  return skip(gbar_a), skip(gbar_b), basis_a, basis_b, r_a_pinv, r_b_pinv


def _precondition_factor(gbar, basis_other, r_other_pinv, state: _FactorState,
                         other_old_basis, count, b1, b2, eps, update_capping,
                         escape: bool):
  """ALGORITHMS.md 1.6-1.12 for one factor, on canonical shapes.

  ``gbar (rows, r)`` lives in the orthonormal basis of the *other* factor;
  ``state.mu`` and ``state.nu`` too, so they are transported with the other
  factor's basis change.
  """
  dtype = gbar.dtype
  t = count.astype(dtype)
  beta1 = bias_corrected_decay(jnp.asarray(b1, dtype), t)
  beta2 = bias_corrected_decay(jnp.asarray(b2, dtype), t)

  # 1.6: basis transport.
  transport = basis_other.T @ other_old_basis
  nu_moved = linalg.sym(transport @ state.nu @ transport.T)
  nu_moved = jnp.where(jnp.isfinite(nu_moved), nu_moved, 0.0)
  mu_moved = state.mu @ transport.T

  # 1.7: escape mass.
  if escape:
    rho = beta2 * (state.escape_mass + linalg.escape_mass(state.nu, nu_moved))
  else:
    rho = jnp.zeros_like(state.escape_mass)

  # 1.8: second moment of the unmagnified gradient.
  second = gbar.T @ gbar / gbar.shape[0]
  nu = linalg.sym(beta2 * nu_moved + (1 - beta2) * second)

  # 1.9: precondition with the inverse square root.
  precond = gbar @ linalg.inverse_sqrt_psd(nu, rho, jnp.asarray(eps, dtype))
  precond = jnp.nan_to_num(precond, nan=0.0, posinf=0.0, neginf=0.0)

  # 1.10: first moment.
  mu = beta1 * mu_moved + (1 - beta1) * precond

  # 1.11: update capping (0 disables).
  safe_cap = jnp.where(update_capping > 0, update_capping, 1.0)
  capped = mu / jnp.maximum(1.0, _rms(mu) / safe_cap)
  direction = jnp.where(update_capping > 0, capped, mu)

  # 1.12: back to factor coordinates.
  direction = direction @ r_other_pinv.T
  return direction, mu, nu, rho


def scale_by_lora_rite(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    clip_unmagnified_grad: float = 1.0,
    update_skipping: float = 1.0,
    update_capping: float = 0.0,
    escape: bool = False,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
) -> optax.GradientTransformation:
  """LoRA-RITE's preconditioning (ALGORITHMS.md 1, steps 1-12).

  The tree given to ``init`` and ``update`` holds LoRA factors only, in any
  layout :mod:`rite_optax.pairs` recognises (or describes with
  ``pair_spec``); ``update`` needs ``params``. Math runs in at least float32
  (float64 stays float64), the state is kept in that precision, and the
  updates come back in each parameter's dtype.

  A factor whose gradient has a non-finite entry is skipped on that step, as
  an over-large one is (1.4): its unmagnified gradient counts as zero, its
  moments decay as for a zero gradient, and params and state stay finite.

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

  Cost per pair: ``O((m + n) r^2 + r^3)`` flops (two thin QRs, a few products
  with the factors, ``r x r`` eigendecompositions). State: two factor-sized
  arrays per factor (``mu``, ``basis``), like Adam's ``mu`` and ``nu``, plus
  ``r x r + 1`` numbers.
  """

  def compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)

  def find_pairs(params):
    found = pairs_lib.find_pairs(params, pair_spec)
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
    dtypes = [compute_dtype(leaf.dtype)
              for leaf in jax.tree_util.tree_leaves(params)]
    def zeros(p):
      return jnp.zeros(p.shape, compute_dtype(p.dtype))

    return ScaleByLoraRiteState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        nu=found.init_per_adapter(params, lambda l: (l.rank, l.rank), dtypes),
        basis=jax.tree.map(zeros, params),
        escape_mass=found.init_per_adapter(params, lambda l: (), dtypes),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lora_rite needs params: the preconditioner is "
                       "built from the current factors")
    found = find_pairs(params)
    found.check_like(updates, "gradient")
    param_leaves = jax.tree_util.tree_leaves(params)
    out_dtypes = [p.dtype for p in param_leaves]

    def to_compute(per_pair):
      return [(a.astype(compute_dtype(a.dtype)), b.astype(compute_dtype(b.dtype)))
              for a, b in per_pair]

    factors = to_compute(found.split(params, "params"))
    grads = [(ga.astype(a.dtype), gb.astype(b.dtype)) for (ga, gb), (a, b) in
             zip(found.split(updates, "gradient"), factors)]
    mus = found.split(state.mu, "state.mu")
    bases = found.split(state.basis, "state.basis")
    nus = found.split_per_adapter(state.nu, "state.nu")
    rhos = found.split_per_adapter(state.escape_mass, "state.escape_mass")

    # 1.1-1.4, per pair and stacked layer.
    unmagnify = jax.vmap(_unmagnified_grads, in_axes=(0, 0, 0, 0, None))
    stage1 = [unmagnify(a, b, ga, gb, update_skipping)
              for (a, b), (ga, gb) in zip(factors, grads)]

    # 1.5: global clipping over every pair of the tree.
    sq_norm = sum(jnp.sum(jnp.square(s[0])) + jnp.sum(jnp.square(s[1]))
                  for s in stage1)
    norm = jnp.sqrt(sq_norm)
    clip = jnp.where((clip_unmagnified_grad > 0) & (norm > clip_unmagnified_grad),
                     clip_unmagnified_grad / jnp.where(norm > 0, norm, 1.0), 1.0)

    precondition = jax.vmap(
        _precondition_factor,
        in_axes=(0, 0, 0, 0, 0, None, None, None, None, None, None))
    directions, new_mu, new_nu, new_basis, new_rho = [], [], [], [], []
    for i, (gbar_a, gbar_b, basis_a, basis_b, ra_pinv, rb_pinv) in enumerate(
        stage1):
      (mu_a, mu_b), (nu_a, nu_b) = mus[i], nus[i]
      (old_a, old_b), (rho_a, rho_b) = bases[i], rhos[i]
      # A's gradient lives in B's basis: it moves with B's basis change.
      d_a, mu_a, nu_a, rho_a = precondition(
          clip.astype(gbar_a.dtype) * gbar_a, basis_b, rb_pinv,
          _FactorState(mu_a, nu_a, old_a, rho_a), old_b, state.count, b1, b2,
          eps, update_capping, escape)
      d_b, mu_b, nu_b, rho_b = precondition(
          clip.astype(gbar_b.dtype) * gbar_b, basis_a, ra_pinv,
          _FactorState(mu_b, nu_b, old_b, rho_b), old_a, state.count, b1, b2,
          eps, update_capping, escape)
      directions.append((d_a, d_b))
      new_mu.append((mu_a, mu_b))
      new_nu.append((nu_a, nu_b))
      new_basis.append((basis_a, basis_b))  # 1.14: U_old = U
      new_rho.append((rho_a, rho_b))

    new_state = ScaleByLoraRiteState(
        count=optax.safe_increment(state.count),
        mu=found.merge(state.mu, new_mu),
        nu=found.merge_per_adapter(state.nu, new_nu),
        basis=found.merge(state.basis, new_basis),
        escape_mass=found.merge_per_adapter(state.escape_mass, new_rho),
    )
    return found.merge(updates, directions, out_dtypes), new_state

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
) -> optax.GradientTransformation:
  """LoRA-RITE (Yen et al., ICLR 2025), ALGORITHMS.md 1, defaults included.

  ``chain(scale_by_lora_rite(...), add_decayed_weights(weight_decay),
  scale_by_learning_rate(learning_rate))``: steps 13 and 14 are optax's own.
  ``learning_rate`` may be a schedule. Use it like any optax optimizer, on a
  tree of LoRA factors (``nnx.state(model, nnx.LoRAParam)``)::

      tx = optax.chain(optax.clip_by_global_norm(1.0),
                       rite_optax.lora_rite(1e-3))

  See :func:`scale_by_lora_rite` for the arguments, the cost and the state.
  """
  return optax.chain(
      scale_by_lora_rite(b1=b1, b2=b2, eps=eps,
                         clip_unmagnified_grad=clip_unmagnified_grad,
                         update_skipping=update_skipping,
                         update_capping=update_capping, escape=escape,
                         pair_spec=pair_spec),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
