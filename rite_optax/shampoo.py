"""Shampoo, the Kronecker-factored baseline of ALGORITHMS.md 5.

Gupta, Koren, Singer. "Shampoo: Preconditioned Stochastic Tensor
Optimization", ICML 2018; with the blocking, layerwise grafting and momentum
of distributed Shampoo (Anil, Gupta, Koren, Regan, Singer, "Scalable Second
Order Optimization for Deep Learning", 2020).

ALGORITHMS.md 5 asks for a maintained JAX Shampoo that runs on the pinned
JAX, and only failing that a compact one of our own. None runs on JAX 0.10.2
with optax 0.2.8: Google's distributed Shampoo (``precondition-opt`` 0.3.0,
the newest, and its copy ``optax-shampoo`` 0.0.6) fails in ``init`` on the
removed ``jax.tree_map``, and optax has no Shampoo. Hence this file.

Every leaf is seen as a stack of matrices ``G (rows, cols)``; each is cut into
blocks, and each block ``G_b`` keeps Kronecker-factor statistics
``L = b2 L + (1 - b2) G_b G_b^T`` and ``R = b2 R + (1 - b2) G_b^T G_b`` and is
preconditioned as ``L^(-1/4) G_b R^(-1/4)``: the paper's exponent ``-1/(2k)``
for the ``k = 2`` factors of a matrix. Leaves that are not matrices (vectors,
scalars) get Adam's diagonal scaling. The direction is then grafted onto
Adam's (its norm per leaf made that of Adam's direction), and a first moment
is kept on top.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from rite_optax import linalg
from rite_optax import pairs as pairs_lib

GRAFT_TYPES = ("adam", "sgd", "none")

# The inverse roots are rebuilt from eigh at full float32 (HIGHEST) whatever
# the precision= argument (the statistics and the gradient products) says.
_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


class ShampooStatistics(NamedTuple):
  """The Kronecker factors of one matrix leaf, per block.

  Attributes:
    left: ``(blocks, row_block, row_block)``, the moving average of
      ``G_b G_b^T``.
    right: ``(blocks, col_block, col_block)``, that of ``G_b^T G_b``.
    left_root: ``left``'s inverse fourth root at the last refresh.
    right_root: ``right``'s inverse fourth root at the last refresh.
  """

  left: jax.Array
  right: jax.Array
  left_root: jax.Array
  right_root: jax.Array


class ScaleByShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`.

  Attributes:
    count: number of steps taken, ``int32``.
    mu: first moments, the params' tree and shapes.
    nu: Adam's diagonal second moments, the params' tree and shapes.
    stats: the params' tree, with :class:`ShampooStatistics` at matrix leaves
      and ``optax.MaskedNode()`` at the others.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  stats: Any


@dataclasses.dataclass(frozen=True)
class _MatrixLayout:
  """A leaf as ``(batch, rows, cols)``, cut into equal (padded) blocks."""

  shape: tuple[int, ...]
  batch: int
  rows: int
  cols: int
  row_blocks: int
  row_block: int
  col_blocks: int
  col_block: int

  @property
  def num_blocks(self) -> int:
    return self.batch * self.row_blocks * self.col_blocks

  def to_blocks(self, x: jax.Array) -> jax.Array:
    """Leaf-shaped ``x`` -> ``(num_blocks, row_block, col_block)``."""
    x = x.reshape(self.batch, self.rows, self.cols)
    # Zero padding is exact: a zero row of G_b is a zero row and column of L
    # and a zero row of the product, whatever L^(-1/4) is.
    x = jnp.pad(x, ((0, 0),
                    (0, self.row_blocks * self.row_block - self.rows),
                    (0, self.col_blocks * self.col_block - self.cols)))
    x = x.reshape(self.batch, self.row_blocks, self.row_block,
                  self.col_blocks, self.col_block)
    return x.transpose(0, 1, 3, 2, 4).reshape(
        self.num_blocks, self.row_block, self.col_block)

  def from_blocks(self, y: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_blocks`, the padding dropped."""
    y = y.reshape(self.batch, self.row_blocks, self.col_blocks,
                  self.row_block, self.col_block)
    y = y.transpose(0, 1, 3, 2, 4).reshape(
        self.batch, self.row_blocks * self.row_block,
        self.col_blocks * self.col_block)
    return y[:, :self.rows, :self.cols].reshape(self.shape)


def _num_batch_dims(shape: tuple[int, ...], batch_dims: int) -> int:
  """Batch axes apply to leaves with at least two more axes."""
  return batch_dims if len(shape) >= batch_dims + 2 else 0


def _matrix_layout(shape: tuple[int, ...], batch_dims: int,
                   block_size: int) -> Optional[_MatrixLayout]:
  """The layout of a matrix leaf, or ``None`` for a diagonal one.

  Axes after the batch axes, size-1 ones dropped, are merged into
  ``(rows, cols)`` at the split that makes the matrix most nearly square;
  fewer than two such axes make the leaf diagonal.
  """
  n_batch = _num_batch_dims(shape, batch_dims)
  dims = [d for d in shape[n_batch:] if d != 1]
  if len(dims) < 2 or 0 in dims:
    return None
  split = min(range(1, len(dims)),
              key=lambda k: max(math.prod(dims[:k]), math.prod(dims[k:])))
  rows, cols = math.prod(dims[:split]), math.prod(dims[split:])

  def blocks(d):
    count = -(-d // block_size)
    return count, -(-d // count)

  return _MatrixLayout(tuple(shape), math.prod(shape[:n_batch]), rows, cols,
                       *blocks(rows), *blocks(cols))


def _inverse_root(stats: jax.Array, p: int, eps: jax.Array,
                  relative_eps: bool) -> jax.Array:
  """``(S + ridge I)^(-1/p)`` per block by ``eigh``.

  ``ridge = eps * lambda_max(S)`` (or ``eps``), floored at the dtype's
  smallest normal number so that an all-zero block stays finite.
  """
  w, q = jnp.linalg.eigh(stats)
  w = jnp.maximum(w, 0.0)  # rounding below zero of a PSD matrix
  ridge = eps * (jnp.max(w, axis=-1, keepdims=True) if relative_eps else 1.0)
  ridge = jnp.maximum(ridge, jnp.finfo(w.dtype).tiny)
  inv_root = (w + ridge) ** (-1.0 / p)
  return _matmul(q * inv_root[..., None, :], jnp.swapaxes(q, -1, -2))


def _norm_per_batch(x: jax.Array, batch: int) -> jax.Array:
  return jnp.linalg.norm(x.reshape(batch, -1), axis=1)


def _graft(direction: jax.Array, graft_direction: jax.Array,
           batch: int) -> jax.Array:
  """``direction`` rescaled to ``graft_direction``'s norm per batch entry."""
  norm = _norm_per_batch(direction, batch)
  graft_norm = _norm_per_batch(graft_direction, batch)
  scale = jnp.where(norm > 0, graft_norm / jnp.where(norm > 0, norm, 1.0), 0.0)
  return (scale[:, None] * direction.reshape(batch, -1)).reshape(
      direction.shape)


@dataclasses.dataclass(frozen=True)
class _ShampooHyper:
  """:func:`scale_by_shampoo`'s hyperparameters, for :func:`_shampoo_leaf`."""

  b1: float
  b2: float
  eps: float
  graft_type: str
  graft_eps: float
  start_preconditioning_step: Any
  relative_eps: bool
  batch_dims: int
  precondition_every: Any
  matmul: linalg.MatmulPrecision


def _shampoo_leaf(grad: jax.Array, mu: jax.Array, nu: jax.Array, stat: Any,
                  count: jax.Array, lay: Optional["_MatrixLayout"],
                  h: _ShampooHyper) -> tuple[jax.Array, jax.Array, jax.Array,
                                             Any]:
  """Steps 1-5 of :func:`scale_by_shampoo` on one leaf: ``(direction, mu,
  nu, stats)``, the direction in the gradient's dtype. ``lay`` is the leaf's
  matrix blocking, or None for a leaf that gets Adam's scaling."""
  dtype = nu.dtype
  g = grad.astype(dtype)
  t = count.astype(dtype) + 1  # steps including this one
  beta1, beta2 = jnp.asarray(h.b1, dtype), jnp.asarray(h.b2, dtype)
  summing = beta2 == 1
  weight2 = jnp.where(summing, 1.0, 1 - beta2)
  correction2 = jnp.where(summing, 1.0, 1 - beta2**t)
  batch = math.prod(g.shape[:_num_batch_dims(g.shape, h.batch_dims)])

  nu = beta2 * nu + weight2 * jnp.square(g)  # step 1
  adam = g / (jnp.sqrt(nu / correction2) + h.graft_eps)

  if lay is None:
    direction = adam
  else:  # step 2
    blocks = lay.to_blocks(g)
    blocks_t = jnp.swapaxes(blocks, 1, 2)
    left = beta2 * stat.left + weight2 * jnp.matmul(
        blocks, blocks_t, precision=h.matmul.gram)
    right = beta2 * stat.right + weight2 * jnp.matmul(
        blocks_t, blocks, precision=h.matmul.gram)

    def roots():
      epsilon = jnp.asarray(h.eps, dtype)
      return (_inverse_root(left / correction2, 4, epsilon, h.relative_eps),
              _inverse_root(right / correction2, 4, epsilon, h.relative_eps))

    if isinstance(h.precondition_every, int) and h.precondition_every == 1:
      left_root, right_root = roots()
    else:
      left_root, right_root = jax.lax.cond(
          count % h.precondition_every == 0, roots,
          lambda: (stat.left_root, stat.right_root))
    direction = lay.from_blocks(jnp.matmul(
        jnp.matmul(left_root, blocks, precision=h.matmul.product),
        right_root, precision=h.matmul.product))
    stat = ShampooStatistics(left, right, left_root, right_root)

  graft_direction = {"adam": adam, "sgd": g, "none": adam}[h.graft_type]
  if h.graft_type != "none":  # step 3
    direction = _graft(direction, graft_direction, batch)
  direction = jnp.where(count >= h.start_preconditioning_step,  # step 4
                        direction, graft_direction)

  mu = beta1 * mu + (1 - beta1) * direction  # step 5
  return (mu / (1 - beta1**t)).astype(grad.dtype), mu, nu, stat


def scale_by_shampoo(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    block_size: int = 256,
    precondition_every: int = 1,
    graft_type: str = "adam",
    graft_eps: float = 1e-10,
    start_preconditioning_step: int = 0,
    relative_eps: bool = True,
    batch_dims: int = 0,
    precision: linalg.PrecisionLike = None,
) -> optax.GradientTransformation:
  """Shampoo's preconditioning (ALGORITHMS.md 5), on any pytree.

  Per leaf, with ``t`` the 0-based step count and ``G`` the gradient (in
  ``float32``, or ``float64`` for ``float64`` leaves):

  1. Adam's diagonal second moment ``nu = b2 nu + (1 - b2) G^2``, bias
     corrected; ``adam = G / (sqrt(nu_hat) + graft_eps)``.
  2. A matrix leaf (see below) updates the statistics of each block,
     ``L = b2 L + (1 - b2) G_b G_b^T`` and ``R = b2 R + (1 - b2) G_b^T G_b``,
     and every ``precondition_every`` steps (from step 0) recomputes
     ``L_hat^(-1/4)`` and ``R_hat^(-1/4)`` of the bias-corrected statistics
     by ``eigh``, with ``eps`` times the largest eigenvalue (``eps`` itself if
     not ``relative_eps``) added to the eigenvalues. The direction is
     ``P_b = L^(-1/4) G_b R^(-1/4)``. Other leaves take ``P = adam``.
  3. Grafting: ``P`` is rescaled to the norm of the graft direction (``adam``,
     or ``G`` for ``"sgd"``; ``"none"`` keeps ``P``), per leaf, or per entry
     of the batch axes.
  4. Before ``start_preconditioning_step`` the graft direction (``adam`` when
     ``graft_type="none"``) is used instead of ``P``.
  5. First moment ``mu = b1 mu + (1 - b1) P``; the update is ``mu``, bias
     corrected.

  ``b2 = 1`` sums instead of averaging (no bias correction): the original
  paper's Shampoo, with AdaGrad grafting in place of Adam's. The default
  ``b2 = 0.999``, as in distributed Shampoo, suits non-stationary training.

  Matrix leaves. The leading ``batch_dims`` axes of a leaf with at least two
  more axes index independent matrices (stacked or scanned layers). The
  remaining axes, size-1 axes dropped, must number at least two; they are
  merged into ``(rows, cols)`` at the split that makes the matrix most nearly
  square (``(3, 3, 64, 128)`` becomes
  ``(576, 128)``). A dimension ``d > block_size`` is cut into
  ``n = ceil(d / block_size)`` contiguous blocks of ``ceil(d / n)`` (the last
  may be shorter), each with its own statistics, as distributed Shampoo does;
  so a LoRA factor ``(2048, 8)`` keeps eight ``256 x 256`` left and
  ``8 x 8`` right statistics rather than one ``2048 x 2048``. (Distributed
  Shampoo cuts ``block_size`` blocks and a remainder; equal blocks lose less
  to padding.)

  Where this differs from distributed Shampoo's defaults: Adam grafting
  (bias corrected) rather than SGD grafting; ``start_preconditioning_step``
  0 rather than 5; a bias-corrected moving average for momentum rather than
  heavy-ball momentum, and no Nesterov, so that ``learning_rate`` means what
  it means for Adam; statistics start at zero rather than ``eps * I``.

  Args:
    b1: decay of the first moment (0 disables momentum).
    b2: decay of the Kronecker statistics and of Adam's second moment (1 sums).
    eps: ridge added to the statistics' eigenvalues before the inverse root.
    block_size: the largest side of a block. A Python int: pass
      ``static_args=("block_size", "batch_dims")`` to
      ``optax.inject_hyperparams``.
    precondition_every: steps between recomputations of the inverse roots
      (the statistics are updated at every step).
    graft_type: ``"adam"``, ``"sgd"`` or ``"none"``.
    graft_eps: Adam's epsilon, for the grafting and the diagonal leaves.
    start_preconditioning_step: steps that use the graft direction alone.
    relative_eps: scale ``eps`` by each block's largest eigenvalue.
    batch_dims: leading axes of each leaf (with at least two more) that are
      not merged but index independent matrices. A Python int.
    precision: of the products with the gradient blocks
      (:func:`rite_optax.linalg.matmul_precision`): the statistics
      ``G_b G_b^T`` (``gram``: they are eigendecomposed, and an
      ill-conditioned block needs float32 products, not the bfloat16 / TF32
      passes that TPU / GPU default to) and ``L^(-1/4) G_b R^(-1/4)``
      (``product``). Default ``HIGHEST`` for both. On TPU ``HIGHEST`` is six
      bfloat16 MXU passes, on GPU float32 rather than TF32 throughput; with
      ``256 x 256`` blocks these products are compute-bound, so ``"high"``
      (three passes on TPU) can be up to 2x faster there, at the cost of
      about 16 bits of each product. Unmeasured on TPU / GPU.

  Cost per matrix leaf ``(rows, cols)`` cut into blocks ``(br, bc)``:
  ``O(rows cols (br + bc))`` flops for the statistics and the products, plus
  ``O(blocks (br^3 + bc^3))`` per refresh for the ``eigh``. State: ``mu`` and
  ``nu`` of the leaf's size, and ``2 blocks (br^2 + bc^2)`` numbers, all in
  ``float32`` (or ``float64``).
  """
  for name, value in (("block_size", block_size), ("batch_dims", batch_dims)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise ValueError(
          f"{name} must be a Python int (it fixes the state's shapes), got "
          f"{value!r}; with optax.inject_hyperparams pass "
          f"static_args=('block_size', 'batch_dims')")
  if block_size < 1 or batch_dims < 0:
    raise ValueError(f"need block_size >= 1 and batch_dims >= 0, got "
                     f"{block_size} and {batch_dims}")
  if isinstance(precondition_every, int) and precondition_every < 1:
    raise ValueError(f"precondition_every must be >= 1, got "
                     f"{precondition_every}")
  if graft_type not in GRAFT_TYPES:
    raise ValueError(f"graft_type must be one of {GRAFT_TYPES}, "
                     f"got {graft_type!r}")
  block_size, batch_dims = int(block_size), int(batch_dims)
  matmul = linalg.matmul_precision(precision)

  def layout(leaf):
    return _matrix_layout(tuple(leaf.shape), batch_dims, block_size)

  def init_stats(param):
    lay = layout(param)
    if lay is None:
      return optax.MaskedNode()
    dtype = pairs_lib.compute_dtype(param.dtype)
    left = jnp.zeros((lay.num_blocks, lay.row_block, lay.row_block), dtype)
    right = jnp.zeros((lay.num_blocks, lay.col_block, lay.col_block), dtype)
    # The roots get arrays of their own: a state holding one buffer twice
    # cannot be donated to a jitted update (jax refuses it).
    return ShampooStatistics(left, right, jnp.zeros_like(left),
                             jnp.zeros_like(right))

  def init_fn(params):
    def zeros(p):
      return jnp.zeros(p.shape, pairs_lib.compute_dtype(p.dtype))

    return ScaleByShampooState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        nu=jax.tree.map(zeros, params),
        stats=jax.tree.map(init_stats, params),
    )

  hyper = _ShampooHyper(b1=b1, b2=b2, eps=eps, graft_type=graft_type,
                        graft_eps=graft_eps,
                        start_preconditioning_step=start_preconditioning_step,
                        relative_eps=relative_eps, batch_dims=batch_dims,
                        precondition_every=precondition_every, matmul=matmul)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    stats = treedef.flatten_up_to(state.stats)
    count = state.count
    out, new_mu, new_nu, new_stats = [], [], [], []
    for grad, mu, nu, stat in zip(leaves, mus, nus, stats):
      direction, mu, nu, stat = _shampoo_leaf(grad, mu, nu, stat, count,
                                              layout(grad), hyper)
      out.append(direction)
      new_mu.append(mu)
      new_nu.append(nu)
      new_stats.append(stat)

    new_state = ScaleByShampooState(
        count=optax.safe_increment(count),
        mu=treedef.unflatten(new_mu),
        nu=treedef.unflatten(new_nu),
        stats=treedef.unflatten(new_stats),
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    block_size: int = 256,
    precondition_every: int = 1,
    graft_type: str = "adam",
    graft_eps: float = 1e-10,
    start_preconditioning_step: int = 0,
    relative_eps: bool = True,
    batch_dims: int = 0,
    weight_decay: float = 0.0,
    precision: linalg.PrecisionLike = None,
) -> optax.GradientTransformation:
  """Shampoo (Gupta et al., 2018) with Adam grafting, ALGORITHMS.md 5.

  ``chain(scale_by_shampoo(...), add_decayed_weights(weight_decay),
  scale_by_learning_rate(learning_rate))``. ``learning_rate`` may be a
  schedule; with ``optax.inject_hyperparams`` pass
  ``static_args=("block_size", "batch_dims")``. Works on any pytree::

      tx = rite_optax.shampoo(1e-3, block_size=256)

  See :func:`scale_by_shampoo` for the arguments, the cost and the state.
  """
  return optax.chain(
      scale_by_shampoo(b1=b1, b2=b2, eps=eps, block_size=block_size,
                       precondition_every=precondition_every,
                       graft_type=graft_type, graft_eps=graft_eps,
                       start_preconditioning_step=start_preconditioning_step,
                       relative_eps=relative_eps, batch_dims=batch_dims,
                       precision=precision),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
