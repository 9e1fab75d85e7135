"""Small dense kernels on the ``r x r`` matrices of LoRA optimizers.

Each works on one matrix; callers vmap over stacked layers (LoRA-RITE over
every alike factor of a tree at once). The ``r x r``
problems are tiny (r <= 256), so the cost of everything here is ``O(r^3)``,
negligible next to the ``O((m + n) r^2)`` products with the factors.

The two ``gram_*_pass`` kernels are the small halves of a thin QR computed
from Gram matrices (:func:`gram_qr` puts them together): the factor is only
ever touched by matrix products that reduce to ``r x r``, so a factor
sharded along its rows needs no gathering, only ``r x r`` all-reduces.

Matmul precision. On TPU a float32 product at JAX's default precision runs
with bfloat16 operands (one MXU pass, 8 significant bits), and on NVIDIA GPUs
since Ampere with TF32 ones (11 bits); only the CPU computes it in float32.
So every product here and in the optimizers passes an explicit precision
(:class:`MatmulPrecision`): the ``r x r`` products always ``HIGHEST`` (their
``O(r^3)`` cost is negligible), and those with a factor-sized operand the
optimizer's ``precision=`` argument, by default :data:`DEFAULT_PRECISION`.
:func:`emulate_precision` rounds the operands of each product as the hardware
would, so that what the precision buys can be measured on a CPU.

:func:`limit_lapack_threads` bounds the CPU LAPACK's threads for a scope:
the batched ``eigh`` of many small matrices is slower with several.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, NamedTuple, Union

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


class MatmulPrecision(NamedTuple):
  """The precisions of an optimizer's products with a factor-sized operand.

  Attributes:
    gram: Gram and cross products ``X.T Y`` of two factor-sized arrays whose
      ``r x r`` result is factorised (``eigh``, Cholesky) or squared: their
      rounding error is amplified by the factor's condition number squared
      (CholeskyQR's ``eps cond^2``), so these want ``HIGHEST``.
    product: products of a factor-sized array with an ``r x r`` matrix
      (``X @ K``): each entry's error is relative to the operands' size.
  """

  gram: jax.lax.Precision
  product: jax.lax.Precision


# The Grams feed eigh / Cholesky; products at HIGHEST too, because HIGH is
# TF32 on GPUs (11 bits), too coarse for the float32 invariance (measured:
# README "Precision", experiments/invariance_table.py --emulate).
DEFAULT_PRECISION = MatmulPrecision(gram=HIGHEST, product=HIGHEST)

PrecisionLike = Union[None, str, jax.lax.Precision, MatmulPrecision,
                      tuple[Any, Any]]


def _one_precision(value: Any) -> jax.lax.Precision:
  if isinstance(value, jax.lax.Precision):
    return value
  if isinstance(value, str):
    try:
      return jax.lax.Precision(value)
    except ValueError:
      pass
  raise ValueError(
      f"precision must be a jax.lax.Precision or one of 'default', 'high', "
      f"'highest', got {value!r}")


def matmul_precision(precision: PrecisionLike = None) -> MatmulPrecision:
  """``precision=`` of an optimizer -> :class:`MatmulPrecision`.

  ``None``: :data:`DEFAULT_PRECISION`. One precision (a
  ``jax.lax.Precision`` or its name): every product with a factor-sized
  operand. A pair ``(gram, product)`` or a :class:`MatmulPrecision`: each.
  Raises ``ValueError`` for anything else, when the optimizer is built.
  """
  if precision is None:
    return DEFAULT_PRECISION
  if isinstance(precision, (tuple, list)) and not isinstance(
      precision, str):
    if len(precision) != 2:
      raise ValueError(f"precision must be one precision or a pair (gram, "
                       f"product), got {precision!r}")
    return MatmulPrecision(*(_one_precision(p) for p in precision))
  p = _one_precision(precision)
  return MatmulPrecision(p, p)


def matmul(x: jax.Array, y: jax.Array,
           precision: jax.lax.Precision = HIGHEST) -> jax.Array:
  """``x @ y`` at an explicit precision (``HIGHEST`` for ``r x r`` work)."""
  return jnp.matmul(x, y, precision=precision)


def scale_columns(x: jax.Array, d: jax.Array) -> jax.Array:
  """``x * d``, the columns of ``x (..., r, r)`` scaled by ``d (..., r)``,
  computed as the product ``x @ diag(d)`` (the same numbers for finite
  ``x``: every other term is an exact zero).

  Why a product: the ``r x r`` results of a whole tree are computed as one
  batch and sliced per adapter. A batch whose last operation is
  elementwise gets fused into each adapter's slice, and XLA's cost model
  then charges every slice with reading the whole batch (quadratic in the
  number of adapters); a product's result is materialised once. ``r^3``
  flops per matrix, nothing next to the factor-sized work.
  """
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return matmul(x, d[..., None] * eye)


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
  return sym(matmul(q * inv_root, q.T))


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
  coeff = matmul(matmul(basis_p.T, c), basis_q)
  solution = jnp.where(keep, coeff / jnp.where(keep, denom, 1.0), 0.0)
  return matmul(matmul(basis_p, solution), basis_q.T)


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
  return sym(matmul(q * inv, q.T))


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
  m = scale_columns(v, jnp.where(nonzero, 1.0 / s, 0.0))
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
  row_norms = s * jnp.linalg.norm(matmul(r_first.T, v), axis=0)
  keep = row_norms > rtol * jnp.max(row_norms)
  return scale_columns(v, jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0),
                                    0.0))


def gram_qr(x: jax.Array, precision: PrecisionLike = None
            ) -> tuple[jax.Array, jax.Array]:
  """Thin QR of ``x (rows, r)`` from Gram matrices: ``(U, R^+)``.

  ``U = x R^+`` has orthonormal columns spanning those of ``x`` (as
  accurate as Householder QR for ``cond(x)`` up to about ``1 / eps``), and
  ``R^+`` is the pseudo-inverse of an ``R`` with ``x = U R`` (rows of ``R``
  below ``pinv``'s cutoff dropped, see :func:`gram_second_pass`). ``U`` is
  ``Q`` of a QR up to a rotation, which is all a basis needs to be. Cost:
  three products of ``x``'s size with ``r x r`` (``6 rows r^2`` flops), two
  ``r x r`` ``eigh``. ``precision``: see :func:`matmul_precision`.
  """
  p = matmul_precision(precision)
  m1, r1 = gram_first_pass(matmul(x.T, x, p.gram))
  u1 = matmul(x, m1, p.product)
  m2 = gram_second_pass(matmul(u1.T, u1, p.gram), r1)
  return matmul(u1, m2, p.product), matmul(m1, m2)


# ------------------------------------------- reduced-precision products on CPU

# How each precision computes a float32 product, per platform (the
# docstring of jax.lax.Precision): "bf16" rounds both operands to bfloat16
# (one MXU pass, exact products, float32 accumulation), "bf16_3x" splits each
# into bfloat16 hi + lo and sums hi.hi + hi.lo + lo.hi (three passes), "tf32"
# rounds them to TF32's 10 mantissa bits (tensor cores), "f32" is float32.
PLATFORM_PRODUCTS = {
    "tpu": {jax.lax.Precision.DEFAULT: "bf16",
            jax.lax.Precision.HIGH: "bf16_3x",
            jax.lax.Precision.HIGHEST: "f32"},
    "gpu": {jax.lax.Precision.DEFAULT: "tf32",
            jax.lax.Precision.HIGH: "tf32",
            jax.lax.Precision.HIGHEST: "f32"},
    "cpu": {p: "f32" for p in jax.lax.Precision},
}


def _round(x: jax.Array, mantissa_bits: int) -> jax.Array:
  return jax.lax.reduce_precision(x, exponent_bits=8,
                                  mantissa_bits=mantissa_bits)


def _emulated_dot(lhs, rhs, *, precision, platform: str, override,
                  **params):
  """One ``dot_general`` as ``platform`` computes it at its ``precision``."""
  exact = functools.partial(jax.lax.dot_general, precision=HIGHEST,
                            dimension_numbers=params["dimension_numbers"],
                            preferred_element_type=params.get(
                                "preferred_element_type"))
  if not (lhs.dtype == rhs.dtype == jnp.float32):
    return exact(lhs, rhs)  # bfloat16 inputs are exact; float64 untouched
  if override is not None:
    precision = override
  elif isinstance(precision, (tuple, list)):
    precision = max(precision, key=lambda p: -1 if p is None else p.value)
  kind = PLATFORM_PRODUCTS[platform][precision or jax.lax.Precision.DEFAULT]
  if kind == "f32":
    return exact(lhs, rhs)
  if kind == "tf32":
    return exact(_round(lhs, 10), _round(rhs, 10))
  lhs_hi, rhs_hi = _round(lhs, 7), _round(rhs, 7)
  if kind == "bf16":
    return exact(lhs_hi, rhs_hi)
  lhs_lo, rhs_lo = _round(lhs - lhs_hi, 7), _round(rhs - rhs_hi, 7)
  return (exact(lhs_hi, rhs_hi) + exact(lhs_hi, rhs_lo)
          + exact(lhs_lo, rhs_hi))


_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}


def _has_dot(jaxpr) -> bool:
  return any(eqn.primitive.name == "dot_general" for j in iter_jaxprs(jaxpr)
             for eqn in j.eqns)


def iter_jaxprs(jaxpr) -> Iterator[Any]:
  """``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``) and every jaxpr nested in it."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  yield jaxpr
  for sub in jex.core.subjaxprs(jaxpr):
    yield from iter_jaxprs(sub)


def _eval_emulated(jaxpr, consts, args, dot):
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == "dot_general":
      outs = [dot(*invals, **eqn.params)]
    elif name in _CALLS and _CALLS[name] in eqn.params:
      sub = eqn.params[_CALLS[name]]
      outs = _eval_emulated(getattr(sub, "jaxpr", sub),
                            getattr(sub, "consts", ()),
                            invals, dot)
    else:
      if any(_has_dot(sub) for sub in jex.core.jaxprs_in_params(eqn.params)):
        raise NotImplementedError(
            f"emulate_precision: a product inside {name} is not emulated")
      outs = eqn.primitive.bind(*invals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def emulate_precision(fn: Callable[..., Any], platform: str,
                      override: Union[None, jax.lax.Precision] = None
                      ) -> Callable[..., Any]:
  """``fn`` with every ``dot_general`` computed as ``platform`` would.

  ``platform`` is ``"tpu"``, ``"gpu"`` (Ampere or later, TF32 allowed) or
  ``"cpu"``; each product's operands are rounded as that platform's
  hardware does at the product's own precision (:data:`PLATFORM_PRODUCTS`),
  so an unannotated product is emulated at ``DEFAULT``. ``override`` replaces
  every product's precision (``DEFAULT``: a program that passes none).
  ``fn`` is traced with :func:`jax.make_jaxpr` and evaluated equation by
  equation; works under ``jax.jit``. For measurements on a CPU, not for
  training: the rounding is extra work.
  """
  if platform not in PLATFORM_PRODUCTS:
    raise ValueError(f"platform must be one of {sorted(PLATFORM_PRODUCTS)}, "
                     f"got {platform!r}")
  dot = functools.partial(_emulated_dot, platform=platform, override=override)

  def emulated(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat = _eval_emulated(closed.jaxpr, closed.consts,
                          jax.tree_util.tree_leaves(args), dot)
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(out_shape), flat)

  return emulated


# ----------------------------------------------------------- LAPACK threads


@contextlib.contextmanager
def limit_lapack_threads(limit: int = 1) -> Iterator[None]:
  """Within the ``with`` block, the CPU BLAS / LAPACK use ``limit`` threads.

  JAX's CPU ``eigh`` (and Cholesky) of a batch calls LAPACK once per matrix;
  for the ``r x r`` matrices of LoRA optimizers each call is far too small
  for threads, and LAPACK's threads compete with XLA's own for the cores.
  Measured on 2 cores (README "Performance"): LoRA-RITE's update at r = 64.
  Scoped with ``threadpoolctl`` (the previous limits come back on exit);
  nothing changes the process's environment. It first loads SciPy's LAPACK,
  the one JAX's CPU kernels call (jaxlib loads it lazily, at the first
  ``eigh``), so that the limit applies to it. No effect on TPU or GPU work.
  Use it around a CPU train loop or benchmark::

      with rite_optax.linalg.limit_lapack_threads():
        for batch in batches:
          state = train_step(state, batch)
  """
  # pylint: disable=g-import-not-at-top
  import scipy.linalg.cython_lapack  # noqa: F401  (jaxlib's LAPACK)
  import threadpoolctl

  with threadpoolctl.threadpool_limits(limits=limit, user_api="blas"):
    yield
