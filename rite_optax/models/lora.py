"""LoRA adapters for the library's Flax NNX models: inject, freeze, merge.

``inject_lora(model, rank, alpha, targets, rngs)`` wraps every ``nnx.Linear``
whose path matches ``targets`` in a :class:`LoRADense`: the frozen base layer
plus ``scale * (x @ lora_a) @ lora_b`` with ``scale = alpha / rank``,
``lora_a (in, r)`` random and ``lora_b (r, out)`` zero, both
``nnx.LoRAParam``. So ``nnx.state(model, nnx.LoRAParam)`` is exactly a tree of
pairs that :mod:`rite_optax.pairs` finds with no configuration, and
``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`` selects the frozen weights.

The factors inherit the logical sharding axes of the base kernel
(``(in_axis, None)`` and ``(None, out_axis)``), so a mesh that shards the base
weight shards its adapter the same way along the long axes.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# The filter of the trainable adapter factors and of the frozen rest.
TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def _factor_metadata(kernel: nnx.Variable) -> tuple[dict, dict]:
  """Sharding metadata of ``lora_a`` and ``lora_b`` from the base kernel's."""
  metadata = kernel.get_metadata()
  axes = metadata.get("out_sharding")
  if not axes:
    return {}, {}
  # Placed the way the base weight is: eagerly only if it was.
  common = {"eager_sharding": metadata.get("eager_sharding", False)}
  if "sharding_rules" in metadata:
    common["sharding_rules"] = metadata["sharding_rules"]
  return ({"out_sharding": (axes[0], None), **common},
          {"out_sharding": (None, axes[1]), **common})


class LoRADense(nnx.Module):
  """``base(x) + scale * (x @ lora_a) @ lora_b`` around a frozen ``nnx.Linear``."""

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, *,
               rngs: nnx.Rngs,
               a_init: nnx.Initializer = nnx.initializers.he_uniform()):
    in_features, out_features = base.kernel.shape
    dtype = base.kernel[...].dtype
    a_meta, b_meta = _factor_metadata(base.kernel)
    self.base = base
    self.rank = rank
    self.scale = alpha / rank
    self.lora_a = nnx.LoRAParam(
        a_init(rngs.params(), (in_features, rank), dtype), **a_meta)
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), dtype),
                                **b_meta)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    dtype = y.dtype
    delta = (x.astype(dtype) @ self.lora_a[...].astype(dtype)) @ (
        self.lora_b[...].astype(dtype))
    return y + self.scale * delta

  def merged(self) -> nnx.Linear:
    """The base layer with ``scale * lora_a @ lora_b`` added to its kernel."""
    base = nnx.clone(self.base)
    kernel = base.kernel[...]
    # At least float32 (a bfloat16 kernel gains a float32 product), and a
    # float64 kernel keeps its precision.
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    update = self.scale * (self.lora_a[...].astype(dtype)
                           @ self.lora_b[...].astype(dtype))
    base.kernel[...] = (kernel.astype(dtype) + update).astype(kernel.dtype)
    return base


def join_targets(patterns: Sequence[str]) -> str:
  """One ``inject_lora`` regular expression matching any of ``patterns``."""
  if not patterns:
    raise ValueError("lora targets: choose at least one group of projections")
  return "|".join(f"({p})" for p in patterns)


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


def _parent(model: nnx.Module, path: Sequence[Any]) -> Any:
  node = model
  for key in path[:-1]:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _set_child(parent: Any, key: Any, value: Any) -> None:
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def _modules(model: nnx.Module) -> list[tuple[tuple[Any, ...], Any]]:
  return [(tuple(path), module) for path, module in nnx.iter_modules(model)]


def inject_lora(model: nnx.Module, rank: int, alpha: float,
                targets: str | Iterable[str], rngs: nnx.Rngs,
                a_init: nnx.Initializer = nnx.initializers.he_uniform()
                ) -> list[str]:
  """Wrap each ``nnx.Linear`` whose ``/``-joined path matches ``targets``.

  Args:
    model: modified in place.
    rank: the adapters' rank ``r``.
    alpha: scale numerator: the adapter adds ``(alpha / r) * x @ A @ B``.
    targets: a regular expression (or several) searched in each module path,
      e.g. ``r"attn/(q|k|v|o)$"`` or ``r"mlp/(gate|up|down)$"``.
    rngs: for the ``lora_a`` initialisation.
    a_init: ``lora_a``'s initializer (``lora_b`` starts at zero).

  Returns:
    The paths that were wrapped.

  Raises:
    ValueError: if no layer matches (a silent no-op would train nothing).
  """
  patterns = [targets] if isinstance(targets, str) else list(targets)
  compiled = [re.compile(p) for p in patterns]
  wrapped = []
  for path, module in _modules(model):
    name = _path_str(path)
    if (isinstance(module, nnx.Linear) and path
        and any(c.search(name) for c in compiled)):
      _set_child(_parent(model, path), path[-1],
                 LoRADense(module, rank, alpha, rngs=rngs,
                                           a_init=a_init))
      wrapped.append(name)
  if not wrapped:
    linears = [_path_str(p) for p, m in _modules(model)
               if isinstance(m, nnx.Linear)]
    raise ValueError(f"no nnx.Linear matches {patterns}; the model's linear "
                     f"layers are: {', '.join(linears)}")
  return wrapped


def merge_lora(model: nnx.Module) -> list[str]:
  """Replace every :class:`LoRADense` by its merged ``nnx.Linear``, in place."""
  merged = []
  for path, module in _modules(model):
    if isinstance(module, LoRADense) and path:
      _set_child(_parent(model, path), path[-1], module.merged())
      merged.append(_path_str(path))
  return merged
