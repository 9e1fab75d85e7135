"""Riemannian preconditioned LoRA: scaled GD and scaled AdamW.

Zhang, Pilanci. "Riemannian Preconditioned LoRA for Fine-Tuning Foundation
Models", ICML 2024.

Each factor's gradient is preconditioned by the ``r x r`` Gram matrix of the
*other* factor, ``Gs_A = G_A inv(B.T B + reg I)``, ``Gs_B = G_B inv(A.T A +
reg I)``. With ``reg = 0`` scaled GD is transformation invariant: starting from
``(A S, B S^-T)`` gives the same products ``A @ B.T`` at every step. Scaled
AdamW runs Adam on the scaled gradients and is not invariant (Adam's
elementwise normalisation is not). The exact algorithm is ALGORITHMS.md
section 2; comments cite it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from rite_optax import linalg
from rite_optax import pairs as pairs_lib


def _spd_inverse(gram: jax.Array, reg: jax.Array) -> jax.Array:
  """``inv(gram + reg I)`` of a batch ``(..., r, r)`` of Gram matrices.

  The matrix is symmetric positive definite (for ``reg > 0``, or a
  full-rank factor): its inverse comes from a Cholesky factorisation, and the
  factor-sized work is one product with it. A triangular solve against every
  row of the gradient gives the same numbers up to rounding (float64
  invariance gap 9.4e-11 there, 1.9e-10 here), but XLA cannot split a solve
  over rows: with factors sharded along their rows it gathers them, where
  the product stays row-local (the Gram matrix is a sharded matmul and an
  ``r x r`` all-reduce).
  """
  eye = jnp.broadcast_to(jnp.eye(gram.shape[-1], dtype=gram.dtype),
                         gram.shape)
  cholesky = jax.scipy.linalg.cho_factor(gram + reg * eye, lower=True)
  inverse = jax.scipy.linalg.cho_solve(cholesky, eye)
  # sym(inverse), ending in a product (linalg.scale_columns says why).
  return linalg.scale_columns(inverse + jnp.swapaxes(inverse, -1, -2),
                              jnp.full(gram.shape[:-1], 0.5, gram.dtype))


def _gram_inverses(groups, grams, reg, sides: bool = True):
  """:func:`_spd_inverse` of per-pair Gram matrices, one batch per group."""
  return pairs_lib.batched(
      groups, lambda g: _spd_inverse(g, jnp.asarray(reg, g.dtype)), grams,
      sides=sides)


def _preconditioners(inputs: pairs_lib.PairInputs, factors, groups, reg,
                     precision: linalg.MatmulPrecision):
  """ALGORITHMS.md 2: per pair ``(inv(B.T B + reg I), inv(A.T A + reg I))``,
  the ``r x r`` matrices that multiply ``G_A`` and ``G_B``.

  The Gram matrices are per-factor products in the factor's own layout; the
  inverses of every alike pair of the tree are one batched Cholesky.
  """
  grams = [tuple(pairs_lib.factor_gram(x, x, rf, precision.gram)
                 for x, rf in zip(pair, rank_first))
           for pair, rank_first in zip(factors, inputs.rank_first)]
  return [(inv_b, inv_a)
          for inv_a, inv_b in _gram_inverses(groups, grams, reg)]


def _one_side_inverses(inputs, factors, groups, reg, precision, side: int):
  """``inv(X.T X + reg I)`` of one side's factor of every pair."""
  grams = [pairs_lib.factor_gram(pair[side], pair[side], rf[side],
                                 precision.gram)
           for pair, rf in zip(factors, inputs.rank_first)]
  return _gram_inverses(groups, grams, reg, sides=False)


def _precondition(inputs: pairs_lib.PairInputs, grads, preconditioners,
                  precision: linalg.MatmulPrecision):
  """``(G_A inv(B.T B + reg I), G_B inv(A.T A + reg I))`` per pair (``None``
  for a side whose preconditioner is ``None``)."""
  return [tuple(None if k is None else
                pairs_lib.factor_times(g, k, rf, precision.product)
                for g, k, rf in zip(pair_grads, pair_k, rank_first))
          for pair_grads, pair_k, rank_first in zip(
              grads, preconditioners, inputs.rank_first)]


def scale_by_riemannian_preconditioner(
    reg: float = 1e-6,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
    precision: linalg.PrecisionLike = None,
) -> optax.GradientTransformation:
  """Riemannian preconditioning of LoRA gradients (ALGORITHMS.md 2).

  Maps each pair's gradient to ``Gs_A = G_A inv(B.T B + reg I)``,
  ``Gs_B = G_B inv(A.T A + reg I)`` in the canonical layout, both from the
  current factors. Stateless; ``update`` needs ``params``. The tree holds
  LoRA factors only, in any layout :mod:`rite_optax.pairs` recognises (or
  describes with ``pair_spec``). Math runs in at least float32; the updates
  come back in each parameter's dtype.

  Args:
    reg: ridge added to each Gram matrix. ``reg = 0`` gives exact
      transformation invariance but needs both factors to have full column
      rank (a zero-initialised ``B`` does not).
    pair_spec: optional ``(path, leaf) -> FactorSpec | None`` for layouts the
      automatic rules do not know. Pass ``static_args="pair_spec"`` to
      ``optax.inject_hyperparams``.
    precision: of the products with a factor-sized operand
      (:func:`rite_optax.linalg.matmul_precision`). Default ``HIGHEST``: the
      Gram matrix is Cholesky-factorised, and a bfloat16 (TPU ``DEFAULT``) or
      TF32 (GPU) rounding of its operands would cost the invariance of
      scaled GD in float32. On TPU ``HIGHEST`` is six bfloat16 MXU passes, on
      GPU float32 instead of TF32 throughput; the Gram products are
      memory-bound for small ``r``, so the price is expected to be small
      there (unmeasured on TPU / GPU).

  Cost per pair: ``O((m + n) r^2 + r^3)`` flops (two Gram matrices, two
  ``r x r`` Cholesky factorisations and solves). No state.
  """
  matmul = linalg.matmul_precision(precision)  # refuses a bad value now

  def init_fn(params):
    pairs_lib.find_pairs(params, pair_spec)  # fail early on a bad tree
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    inputs = pairs_lib.pair_inputs("scale_by_riemannian_preconditioner",
                                   updates, params, pair_spec, native=True)
    # ALGORITHMS.md 2, every pair and stacked layer.
    preconditioners = _preconditioners(inputs, inputs.factors,
                                       inputs.groups(), reg, matmul)
    scaled = _precondition(inputs, inputs.grads, preconditioners, matmul)
    return inputs.merge(updates, scaled, updates=True), state

  return optax.GradientTransformation(init_fn, update_fn)


def scaled_gd(
    learning_rate: optax.ScalarOrSchedule,
    reg: float = 1e-6,
    weight_decay: float = 0.0,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
    precision: linalg.PrecisionLike = None,
) -> optax.GradientTransformation:
  """Scaled GD (Zhang & Pilanci, ICML 2024), ALGORITHMS.md 2.

  ``chain(scale_by_riemannian_preconditioner(reg),
  add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``:
  the update is ``-lr (Gs + weight_decay X)``. ``learning_rate`` may be a
  schedule. With ``reg = 0`` and ``weight_decay = 0`` the products
  ``A @ B.T`` do not depend on how the factors are scaled: ``(A S, B S^-T)``
  follows the same trajectory for any invertible ``S``.

  ``precision``: see :func:`scale_by_riemannian_preconditioner`. Cost per
  pair: ``O((m + n) r^2 + r^3)`` flops; no state.
  """
  return optax.chain(
      scale_by_riemannian_preconditioner(reg=reg, pair_spec=pair_spec,
                                         precision=precision),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )


def _adam_direction(scaled_grad, mu, nu, count_inc, b1, b2, eps,
                    correct_bias: bool):
  """ALGORITHMS.md 2, scaled AdamW: moments of one factor and its direction."""
  mu = optax.tree.update_moment(scaled_grad, mu, b1, 1)
  nu = optax.tree.update_moment_per_elem_norm(scaled_grad, nu, b2, 2)
  if correct_bias:
    mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
  else:  # the reference's default: no bias correction
    mu_hat, nu_hat = mu, nu
  return mu_hat / (jnp.sqrt(nu_hat) + eps), mu, nu


def scale_by_riemannian_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    reg: float = 1e-6,
    correct_bias: bool = False,
    sequential: bool = False,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    weight_decay: float = 0.0,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
    precision: linalg.PrecisionLike = None,
) -> optax.GradientTransformation:
  """Adam on Riemannian-preconditioned gradients (ALGORITHMS.md 2).

  Per factor, elementwise: ``m = b1 m + (1 - b1) Gs``,
  ``v = b2 v + (1 - b2) Gs^2``, direction ``m / (sqrt(v) + eps)``, with ``m``
  and ``v`` divided by ``1 - b^(t+1)`` first if ``correct_bias``. The
  returned updates are these directions; :func:`scaled_adamw` chains the
  weight decay and the learning rate after them.

  Not ``optax.scale_by_adam``: it always corrects the bias, and with
  ``sequential`` the moments of ``B`` depend on ``A``'s new direction within
  the same pair, so both factors' moments are updated here, per pair.

  ``sequential=True`` follows the authors' code: ``B``'s preconditioner is
  built from ``A - learning_rate (D_A + weight_decay A)``, the value ``A``
  takes after this step. That needs the step's ``learning_rate`` (a schedule
  is evaluated at this transformation's count, as
  ``optax.scale_by_learning_rate`` does at its own) and ``weight_decay``; they
  must be the ones chained after this transformation. Both are ignored when
  ``sequential=False``.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to ``sqrt(v)``.
    reg: ridge added to each Gram matrix (see
      :func:`scale_by_riemannian_preconditioner`).
    correct_bias: divide the moments by ``1 - b^(t+1)`` (off in the reference).
    sequential: precondition ``B`` with ``A`` after its step.
    learning_rate: the step size, scalar or schedule; required if
      ``sequential``.
    weight_decay: decoupled weight decay of the step, for ``sequential``.
    pair_spec: optional ``(path, leaf) -> FactorSpec | None`` for layouts the
      automatic rules do not know.
    precision: of the products with a factor-sized operand
      (:func:`rite_optax.linalg.matmul_precision`). Default ``HIGHEST``: the
      Gram matrix is Cholesky-factorised, and a bfloat16 (TPU ``DEFAULT``) or
      TF32 (GPU) rounding of its operands would cost the invariance of
      scaled GD in float32. On TPU ``HIGHEST`` is six bfloat16 MXU passes, on
      GPU float32 instead of TF32 throughput; the Gram products are
      memory-bound for small ``r``, so the price is expected to be small
      there (unmeasured on TPU / GPU).

  Cost per pair: ``O((m + n) r^2 + r^3)`` flops. State: ``optax``'s
  ``ScaleByAdamState``, two factor-sized arrays per factor (``mu``, ``nu``),
  in at least float32.
  """
  if sequential and learning_rate is None:
    raise ValueError("scale_by_riemannian_adam(sequential=True) needs the "
                     "learning_rate of the step to build B's preconditioner")
  matmul = linalg.matmul_precision(precision)  # refuses a bad value now

  def init_fn(params):
    pairs_lib.find_pairs(params, pair_spec)  # fail early on a bad tree
    def zeros(p):
      return jnp.zeros(p.shape, pairs_lib.compute_dtype(p.dtype))
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(zeros, params),
                                  nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    inputs = pairs_lib.pair_inputs("scale_by_riemannian_adam", updates,
                                   params, pair_spec, native=True)
    groups = inputs.groups()
    mus = inputs.split(state.mu, "state.mu")
    nus = inputs.split(state.nu, "state.nu")
    count_inc = optax.safe_increment(state.count)
    if not sequential:
      step_size = 0.0  # unused
    elif callable(learning_rate):
      step_size = learning_rate(state.count)
    else:
      step_size = learning_rate

    def adam(scaled, mu, nu, dtype):
      hyper = (jnp.asarray(x, dtype) for x in (b1, b2, eps))
      return _adam_direction(scaled, mu, nu, count_inc, *hyper, correct_bias)

    # ALGORITHMS.md 2: both preconditioners from the current factors.
    preconditioners = _preconditioners(inputs, inputs.factors, groups, reg,
                                       matmul)
    scaled = _precondition(inputs, inputs.grads, preconditioners, matmul)
    side_a = [adam(s_a, mu_a, nu_a, d) for (s_a, _), (mu_a, _), (nu_a, _), d
              in zip(scaled, mus, nus, inputs.dtypes)]
    if sequential:
      # The authors' order: B's preconditioner sees A after A's full step
      # (weight decay included); G_B stays the gradient at the start.
      stepped = [(a - jnp.asarray(step_size, d)
                  * (d_a + jnp.asarray(weight_decay, d) * a), b)
                 for (a, b), (d_a, _, _), d in zip(inputs.factors, side_a,
                                                   inputs.dtypes)]
      inverses = _one_side_inverses(inputs, stepped, groups, reg, matmul, 0)
      scaled = _precondition(inputs, inputs.grads,
                             [(None, k) for k in inverses], matmul)
    side_b = [adam(s_b, mu_b, nu_b, d) for (_, s_b), (_, mu_b), (_, nu_b), d
              in zip(scaled, mus, nus, inputs.dtypes)]
    directions = [(a[0], b[0]) for a, b in zip(side_a, side_b)]
    new_mu = [(a[1], b[1]) for a, b in zip(side_a, side_b)]
    new_nu = [(a[2], b[2]) for a, b in zip(side_a, side_b)]

    new_state = optax.ScaleByAdamState(
        count=count_inc,
        mu=inputs.merge(state.mu, new_mu),
        nu=inputs.merge(state.nu, new_nu))
    return inputs.merge(updates, directions, updates=True), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def scaled_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    reg: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = False,
    sequential: bool = False,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
    precision: linalg.PrecisionLike = None,
) -> optax.GradientTransformation:
  """Scaled AdamW (Zhang & Pilanci, ICML 2024), ALGORITHMS.md 2, defaults included.

  ``chain(scale_by_riemannian_adam(...), add_decayed_weights(weight_decay),
  scale_by_learning_rate(learning_rate))``: the update is
  ``-lr (m / (sqrt(v) + eps) + weight_decay X)`` (decoupled weight decay).
  No bias correction by default, as in the reference; ``correct_bias=True``
  turns it on. ``sequential=True`` builds ``B``'s preconditioner from ``A``
  after ``A``'s step, as the authors' code does. ``learning_rate`` may be a
  schedule.

  Unlike :func:`scaled_gd`, not transformation invariant: the elementwise
  normalisation by ``sqrt(v)`` depends on the factors' scaling.

  See :func:`scale_by_riemannian_adam` for the arguments, the cost and the
  state.
  """
  return optax.chain(
      scale_by_riemannian_adam(
          b1=b1, b2=b2, eps=eps, reg=reg, correct_bias=correct_bias,
          sequential=sequential, learning_rate=learning_rate,
          weight_decay=weight_decay, pair_spec=pair_spec,
          precision=precision),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
