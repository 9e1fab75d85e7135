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

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from rite_optax import linalg
from rite_optax import pairs as pairs_lib


def _scale_by_other_gram(grad: jax.Array, other: jax.Array, reg: jax.Array,
                         precision: linalg.PrecisionLike = None) -> jax.Array:
  """``grad @ inv(other.T @ other + reg I)`` for ``grad (rows, r)``, ``other (rows', r)``.

  The Gram matrix is symmetric positive definite (for ``reg > 0``, or a
  full-rank ``other``): its ``r x r`` inverse comes from a Cholesky
  factorisation, and the factor-sized work is one product with it. A
  triangular solve against every row of ``grad`` gives the same numbers up
  to rounding (float64 invariance gap 9.4e-11 there, 1.9e-10 here), but XLA
  cannot split a solve over rows: with factors sharded along their rows it gathers them,
  where the product stays row-local (the Gram matrix is a sharded matmul and
  an ``r x r`` all-reduce).
  """
  p = linalg.matmul_precision(precision)
  gram = linalg.matmul(other.T, other, p.gram)
  eye = jnp.eye(other.shape[-1], dtype=other.dtype)
  cholesky = jax.scipy.linalg.cho_factor(gram + reg * eye, lower=True)
  inverse = linalg.sym(jax.scipy.linalg.cho_solve(cholesky, eye))
  return linalg.matmul(grad, inverse, p.product)


def _scaled_grads(a, b, grad_a, grad_b, reg, precision=None):
  """ALGORITHMS.md 2 on one canonical pair ``a (m, r)``, ``b (n, r)``.

  Both preconditioners come from the current, pre-update factors.
  """
  return (_scale_by_other_gram(grad_a, b, reg, precision),
          _scale_by_other_gram(grad_b, a, reg, precision))


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
  linalg.matmul_precision(precision)  # refuse a bad value now

  def init_fn(params):
    pairs_lib.find_pairs(params, pair_spec)  # fail early on a bad tree
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    inputs = pairs_lib.pair_inputs("scale_by_riemannian_preconditioner",
                                   updates, params, pair_spec)
    # ALGORITHMS.md 2, per pair and stacked layer.
    scale = jax.vmap(functools.partial(_scaled_grads, precision=precision),
                     in_axes=(0, 0, 0, 0, None))
    scaled = [scale(a, b, ga, gb, jnp.asarray(reg, d)) for (a, b), (ga, gb), d
              in zip(inputs.factors, inputs.grads, inputs.dtypes)]
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


def _riemannian_adam_pair(a, b, grad_a, grad_b, mu_a, mu_b, nu_a, nu_b,
                          count_inc, b1, b2, eps, reg, learning_rate,
                          weight_decay, correct_bias: bool, sequential: bool,
                          precision=None):
  """ALGORITHMS.md 2, scaled AdamW, on one canonical pair (before ``-lr``)."""
  d_a, mu_a, nu_a = _adam_direction(_scale_by_other_gram(grad_a, b, reg,
                                                         precision),
                                    mu_a, nu_a, count_inc, b1, b2, eps,
                                    correct_bias)
  if sequential:
    # The authors' order: B's preconditioner sees A after A's full step
    # (weight decay included); G_B stays the gradient at the start.
    a = a - learning_rate * (d_a + weight_decay * a)
  d_b, mu_b, nu_b = _adam_direction(_scale_by_other_gram(grad_b, a, reg,
                                                         precision),
                                    mu_b, nu_b, count_inc, b1, b2, eps,
                                    correct_bias)
  return (d_a, d_b), (mu_a, mu_b), (nu_a, nu_b)


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
  linalg.matmul_precision(precision)  # refuse a bad value now

  def init_fn(params):
    pairs_lib.find_pairs(params, pair_spec)  # fail early on a bad tree
    def zeros(p):
      return jnp.zeros(p.shape, pairs_lib.compute_dtype(p.dtype))
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(zeros, params),
                                  nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    inputs = pairs_lib.pair_inputs("scale_by_riemannian_adam", updates,
                                   params, pair_spec)
    mus = inputs.split(state.mu, "state.mu")
    nus = inputs.split(state.nu, "state.nu")
    count_inc = optax.safe_increment(state.count)
    if not sequential:
      step_size = 0.0  # unused
    elif callable(learning_rate):
      step_size = learning_rate(state.count)
    else:
      step_size = learning_rate

    pair_update = jax.vmap(functools.partial(_riemannian_adam_pair,
                                             precision=precision),
                           in_axes=(0,) * 8 + (None,) * 9)
    directions, new_mu, new_nu = [], [], []
    for (a, b), (ga, gb), (mu_a, mu_b), (nu_a, nu_b), dtype in zip(
        inputs.factors, inputs.grads, mus, nus, inputs.dtypes):
      hyper = [jnp.asarray(x, dtype)
               for x in (b1, b2, eps, reg, step_size, weight_decay)]
      d, mu, nu = pair_update(a, b, ga, gb, mu_a, mu_b, nu_a, nu_b, count_inc,
                              *hyper, correct_bias, sequential)
      directions.append(d)
      new_mu.append(mu)
      new_nu.append(nu)

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
