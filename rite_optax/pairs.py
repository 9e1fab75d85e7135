"""Finding LoRA factor pairs in a pytree, and their canonical layout.

Every optimizer of the library is defined on a canonical pair (ALGORITHMS.md,
"Notation and layouts"): ``A (m, r)``, the input-side factor, and ``B (n, r)``,
the output-side factor (zero at LoRA init), so that the weight change is
``s * A @ B.T``. Real trees store factors in other layouts; this module is the
one place that walks a pytree, recognises the factors, groups them into pairs
and maps each factor to and from the canonical layout.

A factor maps to the canonical layout by moving its batch axes (stacked or
scanned layers) first, its rank axis last, and flattening every other axis into
rows: ``(*batch, rows, r)``, then ``(num_batch, rows, r)``. Optimizers vmap
their per-pair math over the leading axis.

Recognised automatically (the last key of a leaf's path, ignoring the
``.value`` of an ``nnx.Variable``):

==========================  =====================  ====================  ==========
layout                      input-side factor      output-side factor    batch axes
==========================  =====================  ====================  ==========
Flax NNX ``nnx.LoRA``       ``lora_a (..., in, r)``  ``lora_b (..., r, out)``  leading
Gemma library ``lora``      ``lora/a (*in, r)``      ``lora/b (r, *out)``      none
HF PEFT names               ``lora_A (..., r, in)``  ``lora_B (..., out, r)``  leading
==========================  =====================  ====================  ==========

(a PEFT factor may also be a node holding ``weight`` or ``kernel``, optionally
under an adapter name: ``lora_A/default/weight``). For anything else, pass a
``spec``: a function ``(path, leaf) -> FactorSpec | None`` that names each
factor's pair, side, rank axis and batch axes (it is consulted before the
automatic rules; returning ``None`` falls back to them).

Every leaf of the tree must belong to a pair. To train LoRA factors next to
other leaves (biases, norms), route the factors to the LoRA optimizer with
optax's combinators, for example::

    is_lora = lambda path, _: rite_optax.pairs.is_lora_factor(path)
    labels = jax.tree_util.tree_map_with_path(
        lambda p, x: "lora" if is_lora(p, x) else "other", params)
    tx = optax.multi_transform(
        {"lora": rite_optax.lora_rite(1e-3), "other": optax.adamw(1e-3)},
        labels)

(or ``optax.partition`` with the same labels). The LoRA optimizer then sees
only the factors: the other leaves are ``optax.MaskedNode`` and have no leaves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Hashable, Literal, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Side = Literal["in", "out"]
KeyPath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class FactorSpec:
  """How one LoRA factor is stored.

  Attributes:
    pair: any hashable naming the adapter; the two factors of one adapter share
      it, and no other leaf has it.
    side: ``"in"`` for the input-side factor (canonical ``A``, Flax ``lora_a``),
      ``"out"`` for the output-side factor (canonical ``B``, zero at init).
    rank_axis: the axis of length ``r``.
    batch_axes: axes that index independent adapters (stacked or scanned
      layers); both factors of a pair must have the same batch shape.
  """

  pair: Hashable
  side: Side
  rank_axis: int
  batch_axes: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class FactorLayout:
  """A factor's resolved layout: where its batch, row and rank axes are."""

  path: str
  shape: tuple[int, ...]
  side: Side
  rank_axis: int
  batch_axes: tuple[int, ...]

  @property
  def row_axes(self) -> tuple[int, ...]:
    special = set(self.batch_axes) | {self.rank_axis}
    return tuple(i for i in range(len(self.shape)) if i not in special)

  @property
  def rank(self) -> int:
    return self.shape[self.rank_axis]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.batch_axes)

  @property
  def num_batch(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def rows(self) -> int:
    return math.prod(self.shape[i] for i in self.row_axes)

  @property
  def rank_first(self) -> bool:
    """Whether the rank axis comes before every row axis (Flax ``lora_b
    (r, out)``, PEFT ``lora_A (r, in)``): in memory, such a factor is
    ``(num_batch, r, rows)`` without moving any data."""
    return bool(self.row_axes) and self.rank_axis < min(self.row_axes)

  def _perm(self, rank_first: bool) -> tuple[int, ...]:
    if rank_first:
      return self.batch_axes + (self.rank_axis,) + self.row_axes
    return self.batch_axes + self.row_axes + (self.rank_axis,)

  def to_canonical(self, x: jax.Array, rank_first: bool = False) -> jax.Array:
    """``x`` of this factor's shape -> ``(num_batch, rows, r)``.

    With ``rank_first=True``, ``(num_batch, r, rows)`` instead: the transpose
    of the canonical layout, which for a :attr:`rank_first` factor is a
    reshape (products written for it need no transposed copy).
    """
    perm = self._perm(rank_first)
    trailing = ((self.rank, self.rows) if rank_first
                else (self.rows, self.rank))
    return jnp.transpose(x, perm).reshape((self.num_batch,) + trailing)

  def from_canonical(self, y: jax.Array, rank_first: bool = False
                     ) -> jax.Array:
    """Inverse of :meth:`to_canonical`."""
    perm = self._perm(rank_first)
    permuted_shape = tuple(self.shape[i] for i in perm)
    inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return jnp.transpose(y.reshape(permuted_shape), inverse)

  def per_adapter_shape(self, *trailing: int) -> tuple[int, ...]:
    """Shape of per-adapter state (e.g. an ``r x r`` moment) for this factor."""
    return self.batch_shape + tuple(trailing)

  def per_adapter_to_canonical(self, x: jax.Array) -> jax.Array:
    return x.reshape((self.num_batch,) + x.shape[len(self.batch_axes):])

  def per_adapter_from_canonical(self, y: jax.Array) -> jax.Array:
    return y.reshape(self.batch_shape + y.shape[1:])


@dataclasses.dataclass(frozen=True)
class LoraPair:
  """One adapter: its name and the leaf indices and layouts of its factors."""

  name: str
  a_index: int
  b_index: int
  a: FactorLayout  # input-side, canonical (m, r)
  b: FactorLayout  # output-side, canonical (n, r)


def _key_name(key: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _strip_variable(path: KeyPath) -> KeyPath:
  # nnx.Variable leaves flatten with a trailing `.value`; the factor is the
  # Variable, so its name is the key before that.
  while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name in ("value", "raw_value")):
    path = path[:-1]
  return path


def path_str(path: KeyPath, root: str = "params") -> str:
  """``params['layer_0']['lora']['a']`` for error messages."""
  return root + jax.tree_util.keystr(_strip_variable(tuple(path)))


_PEFT_NAMES = {"lora_A": "in", "lora_B": "out"}
_PEFT_LEAF_NAMES = ("weight", "kernel")


def auto_factor_spec(path: KeyPath, leaf: Any) -> Optional[FactorSpec]:
  """The automatic rules of the module docstring; ``None`` if none applies."""
  path = _strip_variable(tuple(path))
  names = [_key_name(k) for k in path]
  ndim = len(getattr(leaf, "shape", ()))
  if not names:
    return None
  last = names[-1]
  parent = tuple(names[:-1])
  # Flax NNX: lora_a (..., in, r), lora_b (..., r, out); leading axes stack.
  if last in ("lora_a", "lora_b") and ndim >= 2:
    batch = tuple(range(ndim - 2))
    if last == "lora_a":
      return FactorSpec(("nnx",) + parent, "in", ndim - 1, batch)
    return FactorSpec(("nnx",) + parent, "out", ndim - 2, batch)
  # Gemma library LoRA wrappers: lora/a (*in, r), lora/b (r, *out).
  if last in ("a", "b") and parent and parent[-1] == "lora" and ndim >= 2:
    if last == "a":
      return FactorSpec(("gemma",) + parent, "in", ndim - 1)
    return FactorSpec(("gemma",) + parent, "out", 0)
  # PEFT: lora_A (..., r, in), lora_B (..., out, r), possibly as
  # lora_A[/adapter]/weight.
  for i in range(len(names) - 1, -1, -1):
    if names[i] in _PEFT_NAMES:
      rest = names[i + 1:]
      if rest and rest[-1] not in _PEFT_LEAF_NAMES:
        return None
      if len(rest) > 2 or ndim < 2:
        return None
      side = _PEFT_NAMES[names[i]]
      key = ("peft",) + tuple(names[:i]) + tuple(rest)
      batch = tuple(range(ndim - 2))
      return FactorSpec(key, side, ndim - 2 if side == "in" else ndim - 1,
                        batch)
  return None


def is_lora_factor(path: KeyPath, leaf: Any = None) -> bool:
  """Whether the automatic rules recognise ``path`` as a LoRA factor.

  With ``leaf=None`` only the names are checked (any rank >= 2 is assumed).
  """
  if leaf is None:
    leaf = jax.ShapeDtypeStruct((1, 1), jnp.float32)
  return auto_factor_spec(path, leaf) is not None


SpecFn = Callable[[KeyPath, Any], Optional[FactorSpec]]


def _resolve(path: KeyPath, leaf: Any, spec: Optional[SpecFn],
             root: str) -> tuple[FactorLayout, Hashable]:
  where = path_str(path, root)
  if not hasattr(leaf, "shape"):
    raise ValueError(f"{where}: expected an array, got {type(leaf).__name__}")
  factor = spec(path, leaf) if spec is not None else None
  if factor is None:
    factor = auto_factor_spec(path, leaf)
  if factor is None and any(
      part in _PEFT_NAMES for key in path for part in str(_key_name(key))
      .split(".")[:-1]):
    raise ValueError(
        f"{where}: a flat key of a PEFT state dict ('...lora_A.weight'): the "
        "automatic rules read nested trees. Nest it first, e.g. "
        "flax.traverse_util.unflatten_dict({tuple(k.split('.')): v for k, v "
        "in state_dict.items()}), so that the factor is "
        "...['lora_A']['weight']")
  if factor is None:
    raise ValueError(
        f"{where}: leaf of shape {tuple(leaf.shape)} belongs to no LoRA pair. "
        "LoRA optimizers take trees of LoRA factors only; route other leaves "
        "to another optimizer with optax.multi_transform / optax.partition "
        "(see rite_optax.pairs), or describe the factor with a FactorSpec.")
  if factor.side not in ("in", "out"):
    raise ValueError(f"{where}: side must be 'in' or 'out', got {factor.side!r}")
  ndim = len(leaf.shape)
  axes = (factor.rank_axis,) + tuple(factor.batch_axes)
  if any(not -ndim <= ax < ndim for ax in axes):
    raise ValueError(
        f"{where}: rank axis {factor.rank_axis} / batch axes "
        f"{factor.batch_axes} out of range for shape {tuple(leaf.shape)}")
  rank_axis = factor.rank_axis % ndim
  batch_axes = tuple(ax % ndim for ax in factor.batch_axes)
  if rank_axis in batch_axes or len(set(batch_axes)) != len(batch_axes):
    raise ValueError(
        f"{where}: rank axis {factor.rank_axis} and batch axes "
        f"{factor.batch_axes} overlap")
  return FactorLayout(where, tuple(leaf.shape), factor.side, rank_axis,
                      batch_axes), factor.pair


@dataclasses.dataclass(frozen=True)
class LoraPairs:
  """The pairs of one tree: a static description, computed at trace time.

  ``layouts[i]`` is the layout of the tree's ``i``-th leaf (in
  ``jax.tree_util.tree_leaves`` order); ``pairs`` group them.
  """

  layouts: tuple[FactorLayout, ...]
  pairs: tuple[LoraPair, ...]

  def _leaves(self, tree: Any, what: str) -> list[jax.Array]:
    leaves = jax.tree_util.tree_leaves(tree)
    if len(leaves) != len(self.layouts):
      raise ValueError(
          f"{what} has {len(leaves)} leaves but the LoRA parameters have "
          f"{len(self.layouts)}; they must have the same tree structure")
    return leaves

  def check_like(self, tree: Any, what: str) -> None:
    """Raise if ``tree`` does not have the parameters' paths and shapes."""
    leaves = self._leaves(tree, what)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_str(path, "params") for path, _ in flat]
    expected = [layout.path for layout in self.layouts]
    if paths != expected:
      extra = sorted(set(paths) - set(expected))
      missing = sorted(set(expected) - set(paths))
      if extra or missing:
        raise ValueError(
            f"{what} does not have the parameters' tree: "
            + "; ".join(part for part in (
                f"{what} has {', '.join(extra)}" if extra else "",
                f"the parameters have {', '.join(missing)}" if missing
                else "") if part))
      raise ValueError(f"{what} has the parameters' keys in another order")
    for layout, leaf in zip(self.layouts, leaves):
      if tuple(leaf.shape) != layout.shape:
        raise ValueError(
            f"{layout.path}: {what} has shape {tuple(leaf.shape)} but the "
            f"parameter has shape {layout.shape}")

  def split(self, tree: Any, what: str = "tree", native: bool = False
            ) -> list[tuple[jax.Array, jax.Array]]:
    """Factor-shaped leaves -> per pair ``(A, B)``, each ``(num_batch, rows, r)``.

    With ``native=True``, a :attr:`FactorLayout.rank_first` factor comes as
    ``(num_batch, r, rows)`` instead, so that no factor is transposed in
    memory; the optimizer then writes its products for either orientation.
    """
    leaves = self._leaves(tree, what)
    return [(p.a.to_canonical(leaves[p.a_index], native and p.a.rank_first),
             p.b.to_canonical(leaves[p.b_index], native and p.b.rank_first))
            for p in self.pairs]

  def merge(self, like: Any, per_pair: Sequence[tuple[jax.Array, jax.Array]],
            dtypes: Optional[Sequence[Any]] = None,
            native: bool = False) -> Any:
    """Inverse of :meth:`split`; the result has ``like``'s tree structure.

    ``dtypes``, one per leaf, casts each leaf (e.g. to its parameter's dtype).
    """
    leaves: list[Any] = [None] * len(self.layouts)
    for p, (a, b) in zip(self.pairs, per_pair):
      leaves[p.a_index] = p.a.from_canonical(a, native and p.a.rank_first)
      leaves[p.b_index] = p.b.from_canonical(b, native and p.b.rank_first)
    if dtypes is not None:
      leaves = [x.astype(d) for x, d in zip(leaves, dtypes)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                        leaves)

  def split_per_adapter(self, tree: Any, what: str = "tree"
                        ) -> list[tuple[jax.Array, jax.Array]]:
    """Per-adapter leaves ``(*batch, ...)`` -> per pair ``(num_batch, ...)``."""
    leaves = self._leaves(tree, what)
    return [(p.a.per_adapter_to_canonical(leaves[p.a_index]),
             p.b.per_adapter_to_canonical(leaves[p.b_index]))
            for p in self.pairs]

  def merge_per_adapter(self, like: Any,
                        per_pair: Sequence[tuple[jax.Array, jax.Array]]) -> Any:
    leaves: list[Any] = [None] * len(self.layouts)
    for p, (a, b) in zip(self.pairs, per_pair):
      leaves[p.a_index] = p.a.per_adapter_from_canonical(a)
      leaves[p.b_index] = p.b.per_adapter_from_canonical(b)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                        leaves)

  def init_per_adapter(self, like: Any, trailing_fn: Callable[[FactorLayout],
                                                              tuple[int, ...]],
                       dtypes: Sequence[Any]) -> Any:
    """Zeros of shape ``(*batch, *trailing_fn(layout))`` at every factor."""
    leaves = [jnp.zeros(layout.per_adapter_shape(*trailing_fn(layout)), dtype)
              for layout, dtype in zip(self.layouts, dtypes)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                        leaves)


def compute_dtype(*dtypes: Any) -> jnp.dtype:
  """The dtype every optimizer of the library computes a pair in: that of
  its factors (promoted), at least float32 (float64 stays float64)."""
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


@dataclasses.dataclass(frozen=True)
class PairInputs:
  """One ``update``'s pairs, split: what every optimizer's update starts from.

  Attributes:
    found: the tree's :class:`LoraPairs`.
    factors: per pair ``(A, B)`` in the pair's compute dtype.
    grads: per pair ``(G_A, G_B)`` in the same dtype.
    dtypes: per pair, its :func:`compute_dtype`.
    out_dtypes: per leaf, the parameter's dtype, that of the updates.
    native: whether :meth:`LoraPairs.split` kept each factor's memory layout.
  """

  found: LoraPairs
  factors: list[tuple[jax.Array, jax.Array]]
  grads: list[tuple[jax.Array, jax.Array]]
  dtypes: list[Any]
  out_dtypes: list[Any]
  native: bool = False

  @property
  def rank_first(self) -> list[tuple[bool, bool]]:
    """Per pair, whether each factor came as ``(nb, r, rows)`` (native
    layout of a :attr:`FactorLayout.rank_first` factor)."""
    return [(self.native and p.a.rank_first, self.native and p.b.rank_first)
            for p in self.found.pairs]

  def groups(self) -> list["AlikeGroup"]:
    """The pairs grouped for batched ``r x r`` work (:func:`alike_groups`)."""
    return alike_groups(self.found, [a.shape[0] for a, _ in self.factors],
                        self.dtypes)

  def split(self, tree: Any, what: str) -> list[tuple[jax.Array, jax.Array]]:
    """A factor-shaped tree of the state (moments), split as the factors."""
    return self.found.split(tree, what, native=self.native)

  def merge(self, like: Any, per_pair: Sequence[tuple[jax.Array, jax.Array]],
            *, updates: bool = False) -> Any:
    """Inverse of :meth:`split`; ``updates=True`` casts each leaf to its
    parameter's dtype (the updates optax applies)."""
    return self.found.merge(like, per_pair,
                            self.out_dtypes if updates else None,
                            native=self.native)


def pair_inputs(name: str, updates: Any, params: Any,
                spec: Optional[SpecFn] = None, *, native: bool = False,
                find: Optional[Callable[[Any], LoraPairs]] = None
                ) -> PairInputs:
  """The walk every optimizer's ``update`` starts with: refuse a missing
  ``params`` (naming the optimizer ``name``), find the pairs (with
  ``find(params)`` if given, an optimizer's own checks added), check that the
  gradient has the parameters' tree, and split factors and gradients in the
  compute dtype (:func:`compute_dtype`)."""
  if params is None:
    raise ValueError(f"{name} needs params: its preconditioner is built from "
                     "the current factors")
  found = find(params) if find is not None else find_pairs(params, spec)
  found.check_like(updates, "gradient")
  leaves = jax.tree_util.tree_leaves(params)
  dtypes = [compute_dtype(leaves[p.a_index].dtype, leaves[p.b_index].dtype)
            for p in found.pairs]
  factors = [(a.astype(d), b.astype(d)) for (a, b), d in
             zip(found.split(params, "params", native=native), dtypes)]
  grads = [(ga.astype(d), gb.astype(d)) for (ga, gb), d in
           zip(found.split(updates, "gradient", native=native), dtypes)]
  return PairInputs(found, factors, grads, dtypes,
                    [leaf.dtype for leaf in leaves], native)


# ----------------------------------- products with factors in either layout
# A factor-sized array is (nb, rows, r), or (nb, r, rows) when rank_first
# (LoraPairs.split(..., native=True)): its layout in memory either way. Every
# optimizer's factor-sized work is one of these two products, so that none
# transposes a factor in memory.


def factor_gram(x: jax.Array, y: jax.Array, rank_first: bool,
                precision: Optional[jax.lax.Precision] = None) -> jax.Array:
  """``x.T y`` of two factor-sized arrays, ``(nb, r, r)``: sharded along
  rows, a local product and an ``r x r`` all-reduce."""
  # einsum, not swapaxes + matmul: XLA folds the layouts into the dot instead
  # of first copying a transposed factor.
  return jnp.einsum("bik,bjk->bij" if rank_first else "bki,bkj->bij", x, y,
                    precision=precision)


def factor_times(x: jax.Array, m: jax.Array, rank_first: bool,
                 precision: Optional[jax.lax.Precision] = None) -> jax.Array:
  """``x @ m`` for a factor-sized ``x`` and ``m (nb, r, s)``, row-local."""
  m = m.astype(x.dtype)
  return jnp.einsum("bik,bij->bjk" if rank_first else "bki,bij->bkj", x, m,
                    precision=precision)


# ------------------------------------------ batching the r x r work of a tree


class AlikeGroup(NamedTuple):
  """Alike pairs (same rank and compute dtype): their ``r x r`` matrices are
  one batch, so that a tree of a hundred adapters makes one ``eigh`` or
  Cholesky call per kind of pair rather than one per adapter."""

  pairs: tuple[int, ...]  # indices into LoraPairs.pairs
  sizes: tuple[int, ...]  # num_batch of each pair
  offsets: tuple[jax.Array, ...]  # where each pair starts in the batch

  def stack(self, per_pair: Sequence[Any]) -> jax.Array:
    """Per pair ``(a, b)`` of ``(nb, ...)`` arrays -> one ``(N, 2, ...)``
    (side 0 the A factor, 1 the B); per pair one ``(nb, ...)`` array ->
    ``(N, ...)``."""
    if not isinstance(per_pair[self.pairs[0]], tuple):
      parts = [per_pair[i] for i in self.pairs]
      return parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    # One concatenation per side, then one stack: XLA makes a few
    # operations per call of this, not one per pair.
    sides = [[jnp.broadcast_arrays(*per_pair[i])[side] for i in self.pairs]
             for side in (0, 1)]
    return jnp.stack([parts[0] if len(parts) == 1 else jnp.concatenate(parts)
                      for parts in sides], axis=1)

  def unstack(self, batch: jax.Array, out: list[Any],
              sides: bool = True) -> list[Any]:
    """Inverse of :meth:`stack`, written into ``out`` (a per-pair list);
    ``sides=False`` for a batch stacked from one array per pair."""
    for i, size, offset in zip(self.pairs, self.sizes, self.offsets):
      part = jax.lax.dynamic_slice_in_dim(batch, offset, size)
      out[i] = (part[:, 0], part[:, 1]) if sides else part
    return out


def alike_groups(found: LoraPairs, sizes: Sequence[int],
                 dtypes: Sequence[Any]) -> list[AlikeGroup]:
  """The pairs grouped by rank and compute dtype (``sizes``: each pair's
  ``num_batch``).

  The offsets are signed scalars behind an optimization barrier, so that
  each slice takes its offset as an operand: XLA:CPU compiles one kernel per
  distinct fused computation, and with literal offsets every pair's slices
  would be distinct kernels (a tree of a hundred adapters would spend most
  of its compile time on them). Measured: each offset still reaches XLA as a
  constant, in a tiny kernel of its own (JAX's normalisation of a negative
  index), and the slices stay one shared kernel; unsigned offsets skip that
  normalisation and make every slice distinct, about three times the
  compile time (README, *Performance*).
  """
  members: dict[Any, list[int]] = {}
  for i, (pair, dtype) in enumerate(zip(found.pairs, dtypes)):
    members.setdefault((pair.a.rank, jnp.dtype(dtype)), []).append(i)
  starts = [np.cumsum([0] + [sizes[i] for i in group])[:-1]
            for group in members.values()]
  values = sorted({int(v) for start in starts for v in start})
  runtime = dict(zip(values, jax.lax.optimization_barrier(
      tuple(jnp.asarray(v, jnp.int32) for v in values))))
  return [AlikeGroup(tuple(group), tuple(sizes[i] for i in group),
                     tuple(runtime[int(v)] for v in start))
          for group, start in zip(members.values(), starts)]


def batched(groups: Sequence[AlikeGroup], fn: Callable[..., jax.Array],
            *per_pair: Sequence[Any], sides: bool = True) -> list[Any]:
  """``fn`` on the stacked batch of every group, unstacked per pair.

  ``per_pair`` are per-pair lists, of ``(a, b)`` tuples or, with
  ``sides=False``, of one array per pair; ``fn`` takes the stacked batches
  and returns one batch, unstacked into a per-pair list of the same kind.
  """
  out: list[Any] = [None] * len(per_pair[0]) if per_pair else []
  for group in groups:
    group.unstack(fn(*(group.stack(values) for values in per_pair)), out,
                  sides)
  return out


def find_pairs(tree: Any, spec: Optional[SpecFn] = None,
               root: str = "params") -> LoraPairs:
  """Find the LoRA pairs of ``tree`` (arrays or ``ShapeDtypeStruct`` leaves).

  Raises:
    ValueError: naming the pytree path, for a leaf that belongs to no pair, a
      factor without its partner, two factors on the same side of one pair,
      or factors whose ranks or batch shapes disagree.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  layouts: list[FactorLayout] = []
  groups: dict[Hashable, dict[str, int]] = {}
  for index, (path, leaf) in enumerate(flat):
    layout, pair_key = _resolve(path, leaf, spec, root)
    layouts.append(layout)
    group = groups.setdefault(pair_key, {})
    if layout.side in group:
      other = layouts[group[layout.side]].path
      raise ValueError(
          f"{layout.path}: second {layout.side!r}-side factor of one LoRA "
          f"pair (the first is {other})")
    group[layout.side] = index
  pairs = []
  for pair_key, group in groups.items():
    if len(group) != 2:
      (side, index), = group.items()
      missing = "output-side" if side == "in" else "input-side"
      raise ValueError(
          f"{layouts[index].path}: LoRA factor has no {missing} partner")
    a, b = layouts[group["in"]], layouts[group["out"]]
    name = _common_prefix(a.path, b.path)
    if isinstance(pair_key, tuple) and pair_key[:1] == ("gemma",):
      _check_gemma_batch_dims(name, a, b)
    if a.rank != b.rank:
      raise ValueError(
          f"{name}: input-side factor {a.path} has rank {a.rank} but "
          f"output-side factor {b.path} has rank {b.rank}")
    if a.batch_shape != b.batch_shape:
      raise ValueError(
          f"{name}: input-side factor {a.path} has batch shape "
          f"{a.batch_shape} but output-side factor {b.path} has "
          f"{b.batch_shape}")
    pairs.append(LoraPair(name, group["in"], group["out"], a, b))
  return LoraPairs(tuple(layouts), tuple(pairs))


def _check_gemma_batch_dims(name: str, a: FactorLayout,
                            b: FactorLayout) -> None:
  """Refuse what may be the Gemma library's ``LoRADenseGeneral`` with
  ``batch_dims``: ``a (*batch, *in, r)``, ``b (*batch, r, *out)``, whose
  batch axes the automatic rule (``b``'s rank axis first) cannot tell from
  its own layout. Both factors then start with the same axes, and have row
  axes besides: the signature of shared batch axes (an unbatched adapter
  has it only when its first input axis has length ``r`` and it has two
  output axes).
  """
  rank = a.shape[-1]
  for k in range(1, min(len(a.shape) - 1, len(b.shape) - 1)):
    if a.shape[:k] == b.shape[:k] and b.shape[k] == rank:
      raise ValueError(
          f"{name}: lora/a {a.shape} and lora/b {b.shape} share their "
          f"leading axes {a.shape[:k]}: this looks like the Gemma library's "
          "LoRADenseGeneral with batch_dims (a (*batch, *in, r), b (*batch, "
          "r, *out)), which the automatic rule would read as b (r, *out). "
          "Pass a pair_spec that declares the batch axes, e.g. "
          f"FactorSpec(pair, 'in', rank_axis=-1, batch_axes={tuple(range(k))})"
          f" for a and FactorSpec(pair, 'out', rank_axis={k}, "
          f"batch_axes={tuple(range(k))}) for b")


def _common_prefix(a: str, b: str) -> str:
  # The adapter's name for messages: the factors' paths up to the last
  # complete key they share.
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  cut = a.rfind("]", 0, n + 1)
  return a[:cut + 1] if cut > 0 else a

