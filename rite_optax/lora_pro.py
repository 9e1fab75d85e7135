"""LoRA-Pro: LoRA steps that follow full fine-tuning as closely as they can.

Wang, Liang, Zhang, Tan, Wang. "LoRA-Pro: Are Low-Rank Adapters Properly
Optimized?", ICLR 2025.

A LoRA step moves the weight ``W0 + s A B.T`` along an "equivalent gradient"
``s (gA B.T + A gB.T)`` of rank at most ``2 r``. LoRA-Pro picks the factor
gradients ``gA, gB`` whose equivalent gradient is the Frobenius-closest one to
the full fine-tuning gradient, runs Adam on it in the full weight space, and
maps Adam's step back to the factors the same way. The exact algorithm is
ALGORITHMS.md section 3 (``mode="full"``) and 3b (``mode="efficient"``, the
paper's memory-efficient variant); comments cite its steps.

In the canonical layout of :mod:`rite_optax.pairs`, ``A (m, r)`` is the
input-side factor and ``B (n, r)`` the output-side one (zero at LoRA init);
the roles are not symmetric, so the pairing module must know which is which.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from rite_optax import fused as fused_lib
from rite_optax import linalg
from rite_optax import pairs as pairs_lib

MODES = ("full", "efficient")
_mm = linalg.matmul  # r x r products: HIGHEST


class ScaleByLoraProState(NamedTuple):
  """State of :func:`scale_by_lora_pro`; ``mu``, ``nu`` have the params' tree.

  Attributes:
    count: number of steps taken, ``int32``.
    mu: Adam's first moments.
    nu: Adam's second moments.

  With ``mode="efficient"`` (ALGORITHMS.md 3b) ``mu`` and ``nu`` are Adam's own:
  each factor's shape.

  With ``mode="full"`` (ALGORITHMS.md 3) the moments ``Mf, Vf`` belong to the
  adapter, not to a factor: each is the size of the full weight, ``(m, n)``
  (the canonical rows of ``A`` by the canonical rows of ``B``). They are
  stored at the adapter's **input-side** factor, ``(*batch, m, n)``; the
  output-side factor holds a placeholder of zeros, ``(*batch,)``. Why this
  layout: it keeps the state a plain pytree of arrays with the params' tree,
  so it jits, shards and checkpoints like any optax state, and
  ``state.mu[...]['lora_a']`` is that adapter's moment, found by the same path
  as its parameters (a tuple indexed by pair order would not say which adapter
  is which). The placeholder is one number per stacked layer rather than an
  empty ``(*batch, 0)`` array because checkpointers (orbax) refuse zero-size
  arrays.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def _gram_pinv(x: jax.Array, delta: jax.Array,
               p: linalg.MatmulPrecision) -> jax.Array:
  """``pinv(X.T X + delta I)`` for a factor ``x (rows, r)``."""
  gram = _mm(x.T, x, p.gram)
  return linalg.pinv_psd(gram + delta * jnp.eye(gram.shape[0],
                                                dtype=gram.dtype))


def _project_out(b: jax.Array, gram_pinv_b: jax.Array, y: jax.Array,
                 p: linalg.MatmulPrecision) -> jax.Array:
  """``Pb y = (I - B Gb B.T) y`` without forming the ``n x n`` projector."""
  return y - _mm(b, _mm(gram_pinv_b, _mm(b.T, y, p.gram)), p.product)


def lora_pro_adjusted_grads(
    a: jax.Array,
    b: jax.Array,
    grad_a: jax.Array,
    grad_b: jax.Array,
    scale: jax.Array | float,
    first_step: jax.Array | bool,
    delta: jax.Array | float = 1e-8,
    precision: linalg.PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]:
  """ALGORITHMS.md 3.1: LoRA-Pro's adjusted gradients on one canonical pair.

  ``a (m, r)`` input-side, ``b (n, r)`` output-side, ``grad_a, grad_b`` their
  raw gradients, ``scale`` the adapter scale ``s``. ``first_step`` (``t = 0``;
  may be traced) selects the first-step rule, which does not divide by
  ``B.T B`` (zero at LoRA init)::

    t = 0:  gA = G_A,               gB = (1/s^2) G_B Ga
    t > 0:  gA = (1/s^2) G_A Gb,    gB = (1/s^2) Pb G_B Ga

  with ``Ga = pinv(A.T A + delta I)``, ``Gb = pinv(B.T B + delta I)`` and
  ``Pb = I - B Gb B.T``. For ``t > 0`` (and ``delta -> 0``) the equivalent
  gradient :func:`lora_pro_equivalent_gradient` of the result is the
  Frobenius-closest point to the full gradient ``G`` (``G_A = s G B``,
  ``G_B = s G.T A``) among all ``s (x B.T + A y.T)``.

  Cost: ``O((m + n) r^2 + r^3)`` flops.
  """
  p = linalg.matmul_precision(precision)
  return _adjust(a, b, grad_a, grad_b, 1.0 / jnp.square(scale), first_step,
                 _gram_pinv(a, delta, p), _gram_pinv(b, delta, p), p)


def _adjust(a, b, grad_a, grad_b, inv_s2, first_step, gram_pinv_a,
            gram_pinv_b, p: linalg.MatmulPrecision):
  """ALGORITHMS.md 3.1 given ``Ga``, ``Gb``: both rules, selected by ``t``."""
  later_a = inv_s2 * _mm(grad_a, gram_pinv_b, p.product)
  later_b = inv_s2 * _mm(_project_out(b, gram_pinv_b, grad_b, p),
                         gram_pinv_a, p.product)
  first_b = inv_s2 * _mm(grad_b, gram_pinv_a, p.product)
  return (jnp.where(first_step, grad_a, later_a),
          jnp.where(first_step, first_b, later_b))


def lora_pro_equivalent_gradient(a: jax.Array, b: jax.Array, ga: jax.Array,
                                 gb: jax.Array,
                                 scale: jax.Array | float,
                                 precision: linalg.PrecisionLike = None
                                 ) -> jax.Array:
  """ALGORITHMS.md 3.2: ``E = s (gA B.T + A gB.T)``, shape ``(m, n)``.

  Cost: ``O(m n r)`` flops and an ``(m, n)`` array.
  """
  p = linalg.matmul_precision(precision).product
  return scale * (_mm(ga, b.T, p) + _mm(a, gb.T, p))


def _efficient_coefficients(grams: jax.Array, inv_s2: jax.Array,
                            jitter: jax.Array) -> jax.Array:
  """ALGORITHMS.md 3b.1-3b.2 in ``r x r`` matrices, for one adapter.

  ``grams`` stacks ``A.T A``, ``B.T B``, ``G_A.T A`` and ``B.T G_B``
  (``(4, r, r)``). Returns, stacked, ``K_A``, ``L_A``, ``K_B``, ``L_B`` with
  ``gA = G_A K_A + A L_A`` and ``gB = G_B K_B + B L_B``: 3b.2 with the
  projection ``I - B inv(SB) B.T`` multiplied out, so that each adjusted
  gradient is two products with a factor-sized operand, added where Adam's
  moments are updated (no factor-sized intermediate of its own).
  """
  gram_a, gram_b, ga_t_a, bt_gb = grams
  eye = jnp.eye(gram_a.shape[-1], dtype=gram_a.dtype)
  sa, sb = gram_a + jitter * eye, gram_b + jitter * eye
  sa_inv, sb_inv = jnp.linalg.inv(sa), jnp.linalg.inv(sb)
  # 3b.1: Sylvester equation for the free r x r component.
  x = linalg.solve_sylvester_sym(sb, sa, -inv_s2 * _mm(sb_inv, ga_t_a))
  # 3b.2: gA = (1/s^2) G_A inv(SB) + A X.T, and
  # gB = (1/s^2) (G_B - B inv(SB) B.T G_B) inv(SA) - B X.
  k_b = inv_s2 * sa_inv
  l_b = -(_mm(_mm(sb_inv, bt_gb), k_b) + x)
  return jnp.stack([inv_s2 * sb_inv, x.T, k_b, l_b])


def _batched_coefficients(groups, grams, scale, jitter):
  """:func:`_efficient_coefficients` of every pair, one batch per group of
  alike pairs (``grams`` per pair ``(nb, 4, r, r)``)."""
  def coefficients(g):
    inv_s2 = 1.0 / jnp.square(jnp.asarray(scale, g.dtype))
    return jax.vmap(_efficient_coefficients, in_axes=(0, None, None))(
        g, inv_s2, jnp.asarray(jitter, g.dtype))

  return pairs_lib.batched(groups, coefficients, grams, sides=False)


def _efficient_adjusted(inputs_factors, grads, rank_first, groups, scale,
                        jitter, p: linalg.MatmulPrecision):
  """3b.1-3b.2 for every pair: per pair the two products of ``gA`` and of
  ``gB`` (``(G_A K_A, A L_A)``, ``(G_B K_B, B L_B)``), whose sums are the
  adjusted gradients. The ``r x r`` work of alike pairs is one batch."""
  grams = []
  for (a, b), (g_a, g_b), (rf_a, rf_b) in zip(inputs_factors, grads,
                                              rank_first):
    grams.append(jnp.stack([
        pairs_lib.factor_gram(a, a, rf_a, p.gram),
        pairs_lib.factor_gram(b, b, rf_b, p.gram),
        pairs_lib.factor_gram(g_a, a, rf_a, p.gram),
        pairs_lib.factor_gram(b, g_b, rf_b, p.gram)], axis=1))

  coeffs = _batched_coefficients(groups, grams, scale, jitter)
  times = lambda x, k, rf: pairs_lib.factor_times(x, k, rf, p.product)
  return [((times(g_a, c[:, 0], rf_a), times(a, c[:, 1], rf_a)),
           (times(g_b, c[:, 2], rf_b), times(b, c[:, 3], rf_b)))
          for (a, b), (g_a, g_b), (rf_a, rf_b), c in zip(
              inputs_factors, grads, rank_first, coeffs)]


def _fused_grams(x, g, rank_first: bool, p: linalg.MatmulPrecision):
  """``(X.T X, G.T X)`` of one factor in one fused pass."""
  r = x.shape[-2 if rank_first else -1]

  def body(blocks, _):
    x_blk, g_blk = blocks
    return [], [_mm(x_blk.T, x_blk, p.gram), _mm(g_blk.T, x_blk, p.gram)]

  return fused_lib.factor_pass(body, [x, g], [], rank_first=rank_first,
                               out_columns=(), gram_shapes=[(r, r)] * 2)[1]


def _fused_efficient_step(inputs_factors, grads, mus, nus, rank_first, groups,
                          scale, jitter, count, b1, b2, eps,
                          p: linalg.MatmulPrecision):
  """3b.1-3b.3 in two fused passes per factor (rite_optax.fused): the Grams
  of 3b.1 reading ``X`` and ``G`` once, then ``g = G K + X L`` and Adam's
  moments and direction reading ``X``, ``G``, ``mu``, ``nu`` once. Returns
  per pair the directions, the new ``mu`` and the new ``nu``."""
  grams = []
  for (a, b), (g_a, g_b), (rf_a, rf_b) in zip(inputs_factors, grads,
                                              rank_first):
    gram_a, ga_t_a = _fused_grams(a, g_a, rf_a, p)
    gram_b, gb_t_b = _fused_grams(b, g_b, rf_b, p)
    grams.append(jnp.stack([gram_a, gram_b, ga_t_a,
                            jnp.swapaxes(gb_t_b, -1, -2)], axis=1))

  coeffs = _batched_coefficients(groups, grams, scale, jitter)

  def body(blocks, matrices):
    x_blk, g_blk, mu_blk, nu_blk = blocks
    k, l, c = matrices
    # c: b1, b2, eps, 1 - b1^t, 1 - b2^t as (1, 1) slices (no scalar reads).
    b1_, b2_, eps_, bc1, bc2 = (c[:, i:i + 1] for i in range(5))
    adjusted = _mm(g_blk, k, p.product) + _mm(x_blk, l, p.product)
    mu = b1_ * mu_blk + (1 - b1_) * adjusted
    nu = b2_ * nu_blk + (1 - b2_) * jnp.square(adjusted)
    return [(mu / bc1) / (jnp.sqrt(nu / bc2) + eps_), mu, nu], []

  out = []
  for (a, b), (g_a, g_b), pair_mu, pair_nu, rfs, c in zip(
      inputs_factors, grads, mus, nus, rank_first, coeffs):
    dtype, nb = a.dtype, a.shape[0]
    t = (count + 1).astype(dtype)
    b1_, b2_ = jnp.asarray(b1, dtype), jnp.asarray(b2, dtype)
    # Padded to 8 columns: Triton's blocks are powers of two.
    constants = jnp.broadcast_to(jnp.stack(
        [b1_, b2_, jnp.asarray(eps, dtype), 1 - b1_**t, 1 - b2_**t]
        + [jnp.zeros((), dtype)] * 3), (nb, 1, 8))
    r = a.shape[-2 if rfs[0] else -1]
    sides = [fused_lib.factor_pass(
        body, [x, g, mu, nu], [c[:, i], c[:, i + 1], constants],
        rank_first=rf, out_columns=[r] * 3, gram_shapes=())[0]
             for i, x, g, mu, nu, rf in zip((0, 2), (a, b), (g_a, g_b),
                                            pair_mu, pair_nu, rfs)]
    out.append(sides)
  return ([tuple(side[j] for side in sides) for sides in out]
          for j in range(3))


def lora_pro_efficient_adjusted_grads(
    a: jax.Array,
    b: jax.Array,
    grad_a: jax.Array,
    grad_b: jax.Array,
    scale: jax.Array | float,
    jitter: jax.Array | float = 1e-6,
    precision: linalg.PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]:
  """ALGORITHMS.md 3b.1-3b.2: the memory-efficient mode's adjusted gradients.

  With ``SA = A.T A + jitter I`` and ``SB = B.T B + jitter I`` (definite, so the
  same rule serves every step, ``B = 0`` included), solve
  ``SB X + X SA = -(1/s^2) inv(SB) G_A.T A`` and return
  ``gA = (1/s^2) G_A inv(SB) + A X.T``,
  ``gB = (1/s^2) (I - B inv(SB) B.T) G_B inv(SA) - B X``.

  Cost: ``O((m + n) r^2 + r^3)`` flops; nothing of size ``m x n``.
  """
  p = linalg.matmul_precision(precision)
  dtype = pairs_lib.compute_dtype(a.dtype, b.dtype)
  a, b, grad_a, grad_b = (x.astype(dtype) for x in (a, b, grad_a, grad_b))
  grams = jnp.stack([
      _mm(a.T, a, p.gram), _mm(b.T, b, p.gram), _mm(grad_a.T, a, p.gram),
      _mm(b.T, grad_b, p.gram)])
  k = _efficient_coefficients(grams, 1.0 / jnp.square(jnp.asarray(
      scale, dtype)), jnp.asarray(jitter, dtype))
  return (_mm(grad_a, k[0], p.product) + _mm(a, k[1], p.product),
          _mm(grad_b, k[2], p.product) + _mm(b, k[3], p.product))


def _adam_moments(g, mu, nu, count, b1, b2, eps):
  """Adam with bias correction (ALGORITHMS.md 3.3 / 3b.3), elementwise."""
  mu = b1 * mu + (1 - b1) * g
  nu = b2 * nu + (1 - b2) * jnp.square(g)
  t = (count + 1).astype(g.dtype)
  direction = (mu / (1 - b1**t)) / (jnp.sqrt(nu / (1 - b2**t)) + eps)
  return direction, mu, nu


def _full_space_step(a, b, grad_a, grad_b, mu, nu, count, scale, b1, b2, eps,
                     delta, p: linalg.MatmulPrecision):
  """ALGORITHMS.md 3.1-3.5 on one canonical pair; ``mu, nu (m, n)``."""
  first_step = count == 0
  inv_s2 = 1.0 / jnp.square(scale)
  gram_pinv_a = _gram_pinv(a, delta, p)
  gram_pinv_b = _gram_pinv(b, delta, p)
  # 3.1-3.2: the equivalent gradient of the adjusted factor gradients.
  ga, gb = _adjust(a, b, grad_a, grad_b, inv_s2, first_step, gram_pinv_a,
                   gram_pinv_b, p)
  equivalent = lora_pro_equivalent_gradient(a, b, ga, gb, scale, p)
  # 3.3: Adam in the full weight space.
  full_step, mu, nu = _adam_moments(equivalent, mu, nu, count, b1, b2, eps)
  # 3.4: back to the factors.
  h_a = scale * _mm(full_step, b, p.product)
  h_b = scale * _mm(full_step.T, a, p.product)
  # 3.5: adjust again; t = 0 avoids B.T B, zero at LoRA init.
  first_a = h_a
  first_b = inv_s2 * _mm(h_b, gram_pinv_a, p.product)
  # Both rules are computed (t is traced). At t = 0, B = 0 makes P = B.T B
  # zero: exact while A.T A is definite, and the minimum-norm solution if
  # both are singular, so the unselected branch stays finite.
  x = linalg.solve_sylvester_sym(
      _mm(b.T, b, p.gram), _mm(a.T, a, p.gram),
      -inv_s2 * _mm(gram_pinv_b, _mm(h_a.T, a, p.gram)))
  later_a = (inv_s2 * _mm(h_a, gram_pinv_b, p.product)
             + _mm(a, x.T, p.product))
  later_b = (inv_s2 * _mm(_project_out(b, gram_pinv_b, h_b, p), gram_pinv_a,
                          p.product)
             - _mm(b, x, p.product))
  return (jnp.where(first_step, first_a, later_a),
          jnp.where(first_step, first_b, later_b), mu, nu)


def scale_by_lora_pro(
    scale: float,
    mode: str = "full",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    delta: float = 1e-8,
    jitter: float = 1e-6,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
    precision: linalg.PrecisionLike = None,
    fused: bool = False,
) -> optax.GradientTransformation:
  """LoRA-Pro's direction (ALGORITHMS.md 3.1-3.5, or 3b.1-3b.3).

  The tree given to ``init`` and ``update`` holds LoRA factors only, in any
  layout :mod:`rite_optax.pairs` recognises (or describes with
  ``pair_spec``); ``update`` needs ``params``. Math runs in at least float32
  (float64 stays float64), the state is kept in that precision, and the
  updates come back in each parameter's dtype. The result is the direction
  ``gA, gB`` of step 3.6; :func:`lora_pro` scales it by ``-learning_rate``.

  Args:
    scale: the adapters' scale ``s`` (``alpha / r``), by which the model
      multiplies ``A @ B.T``; the same for every pair of the tree.
    mode: ``"full"`` (ALGORITHMS.md 3, Adam in the full weight space) or
      ``"efficient"`` (3b, Adam on the adjusted factor gradients).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to Adam's bias-corrected root second moment.
    delta: ridge of the Gram pseudo-inverses of ``mode="full"``.
    jitter: ridge of the Gram inverses of ``mode="efficient"``.
    pair_spec: optional ``(path, leaf) -> FactorSpec | None`` for layouts the
      automatic rules do not know (see :mod:`rite_optax.pairs`). Pass
      ``static_args="pair_spec"`` to ``optax.inject_hyperparams``.
    precision: of the products with a factor-sized (or ``m x n``) operand
      (:func:`rite_optax.linalg.matmul_precision`). Default ``HIGHEST``: the
      Gram matrices are inverted and feed a Sylvester solve, and with
      ``delta = 1e-8`` a bfloat16 (TPU ``DEFAULT``) or TF32 (GPU) rounding of
      their operands would dominate them. On TPU ``HIGHEST`` is six bfloat16
      MXU passes (``HIGH`` three), on GPU float32 rather than TF32
      throughput: full mode's ``O(m n r)`` products are compute-bound for
      large ``r``, where ``"high"`` trades accuracy for up to 2x (TPU). The
      ``r x r`` products are ``HIGHEST`` always. Unmeasured on TPU / GPU.
    fused: with ``mode="efficient"``, the products with the factors and
      Adam's moments as two fused Pallas passes per factor
      (:mod:`rite_optax.fused`): 6 factor-sized reads and 3 writes per
      factor. For TPU / GPU, on unsharded or replicated factors; on a CPU it
      runs in Pallas's interpreter, slower than the default. Same math,
      rounded differently (tested against the default); unmeasured on TPU /
      GPU.

  Cost per adapter of shape ``(m, n)`` and rank ``r``:

  * ``mode="full"``: state ``2 m n`` numbers (``Mf``, ``Vf``), the size of two
    copies of the full weight. This mode gives up LoRA's memory saving (and
    its ``O((m + n) r)`` optimizer state) for fidelity to full fine-tuning;
    ``O(m n r + r^3)`` flops per step.
  * ``mode="efficient"``: state ``2 (m + n) r`` numbers, Adam's;
    ``O((m + n) r^2 + r^3)`` flops per step, nothing of size ``m x n``.
  """
  if mode not in MODES:
    raise ValueError(f"lora_pro: mode must be one of {MODES}, got {mode!r}")
  if fused and mode != "efficient":
    raise ValueError("lora_pro: fused=True is for mode='efficient' (full "
                     f"mode's moments are m x n), got mode={mode!r}")
  matmul = linalg.matmul_precision(precision)

  def pair_dtype(pair, leaves):
    return pairs_lib.compute_dtype(leaves[pair.a_index].dtype,
                                   leaves[pair.b_index].dtype)

  def init_fn(params):
    found = pairs_lib.find_pairs(params, pair_spec)
    leaves = jax.tree_util.tree_leaves(params)
    treedef = jax.tree_util.tree_structure(params)
    if mode == "efficient":
      moments = [None] * len(leaves)
      for pair in found.pairs:
        dtype = pair_dtype(pair, leaves)
        moments[pair.a_index] = jnp.zeros(pair.a.shape, dtype)
        moments[pair.b_index] = jnp.zeros(pair.b.shape, dtype)
    else:
      # Full-space moments at the input-side factor, a placeholder at the
      # output side (see ScaleByLoraProState).
      moments = [None] * len(leaves)
      for pair in found.pairs:
        dtype = pair_dtype(pair, leaves)
        moments[pair.a_index] = jnp.zeros(
            pair.a.per_adapter_shape(pair.a.rows, pair.b.rows), dtype)
        moments[pair.b_index] = jnp.zeros(pair.b.per_adapter_shape(), dtype)
    zeros = jax.tree_util.tree_unflatten(treedef, moments)
    return ScaleByLoraProState(
        count=jnp.zeros([], jnp.int32), mu=zeros,
        nu=jax.tree.map(jnp.zeros_like, zeros))

  def update_fn(updates, state, params=None):
    inputs = pairs_lib.pair_inputs("scale_by_lora_pro", updates, params,
                                   pair_spec, native=mode == "efficient")
    found, factors, grads, dtypes = (inputs.found, inputs.factors,
                                     inputs.grads, inputs.dtypes)

    if mode == "full":
      mus = found.split_per_adapter(state.mu, "state.mu")
      nus = found.split_per_adapter(state.nu, "state.nu")
      step = jax.vmap(functools.partial(_full_space_step, p=matmul),
                      in_axes=(0,) * 6 + (None,) * 6)
      directions, new_mu, new_nu = [], [], []
      for (a, b), (ga, gb), (mu, mu_pad), (nu, nu_pad), d in zip(
          factors, grads, mus, nus, dtypes):
        d_a, d_b, mu, nu = step(a, b, ga, gb, mu, nu, state.count,
                                jnp.asarray(scale, d), jnp.asarray(b1, d),
                                jnp.asarray(b2, d), jnp.asarray(eps, d),
                                jnp.asarray(delta, d))
        directions.append((d_a, d_b))
        new_mu.append((mu, mu_pad))
        new_nu.append((nu, nu_pad))
      mu_tree = found.merge_per_adapter(state.mu, new_mu)
      nu_tree = found.merge_per_adapter(state.nu, new_nu)
    elif fused:
      directions, new_mu, new_nu = _fused_efficient_step(
          factors, grads, inputs.split(state.mu, "state.mu"),
          inputs.split(state.nu, "state.nu"), inputs.rank_first,
          inputs.groups(), scale, jitter, state.count, b1, b2, eps, matmul)
      mu_tree = inputs.merge(state.mu, new_mu)
      nu_tree = inputs.merge(state.nu, new_nu)
    else:
      mus = inputs.split(state.mu, "state.mu")
      nus = inputs.split(state.nu, "state.nu")
      products = _efficient_adjusted(factors, grads, inputs.rank_first,
                                     inputs.groups(), scale, jitter, matmul)
      directions, new_mu, new_nu = [], [], []
      for pair_products, pair_mu, pair_nu, d in zip(products, mus, nus,
                                                    dtypes):
        # 3b.3: Adam on gA = G_A K_A + A L_A (the sum fuses into the moments).
        sides = [_adam_moments(x + y, mu, nu, state.count, jnp.asarray(b1, d),
                               jnp.asarray(b2, d), jnp.asarray(eps, d))
                 for (x, y), mu, nu in zip(pair_products, pair_mu, pair_nu)]
        directions.append(tuple(side[0] for side in sides))
        new_mu.append(tuple(side[1] for side in sides))
        new_nu.append(tuple(side[2] for side in sides))
      mu_tree = inputs.merge(state.mu, new_mu)
      nu_tree = inputs.merge(state.nu, new_nu)

    new_state = ScaleByLoraProState(
        count=optax.safe_increment(state.count), mu=mu_tree, nu=nu_tree)
    return inputs.merge(updates, directions, updates=True), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def lora_pro(
    learning_rate: optax.ScalarOrSchedule,
    scale: float,
    mode: str = "full",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    delta: float = 1e-8,
    jitter: float = 1e-6,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
    precision: linalg.PrecisionLike = None,
    fused: bool = False,
) -> optax.GradientTransformation:
  """LoRA-Pro (Wang et al., ICLR 2025): ALGORITHMS.md 3 and 3b, its defaults.

  ``chain(scale_by_lora_pro(...), scale_by_learning_rate(learning_rate))``:
  step 3.6 is plain SGD on the adjusted direction. ``scale`` is the adapters'
  ``alpha / r`` and is required: the adjustment depends on it. Use it on a
  tree of LoRA factors (``nnx.state(model, nnx.LoRAParam)``)::

      tx = rite_optax.lora_pro(1e-4, scale=alpha / rank)

  ``mode="full"`` keeps two ``m x n`` arrays per adapter (the full weight's
  size, giving up LoRA's memory saving for fidelity to full fine-tuning);
  ``mode="efficient"`` keeps Adam's ``2 (m + n) r``. See
  :func:`scale_by_lora_pro` for the arguments, the cost and the state.
  """
  return optax.chain(
      scale_by_lora_pro(scale, mode=mode, b1=b1, b2=b2, eps=eps, delta=delta,
                        jitter=jitter, pair_spec=pair_spec,
                        precision=precision, fused=fused),
      optax.scale_by_learning_rate(learning_rate),
  )
