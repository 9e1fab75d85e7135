"""Placing the models' parameters on a device mesh by their logical axes.

Every parameter of the library's models names its axes logically
(``nnx.with_partitioning(init, ("embed", "heads"))``); :data:`LOGICAL_RULES`
maps those names to the axes of a ``("data", "fsdp", "tensor")`` mesh:

================  ==========  ===========================================
logical axis      mesh axis   what it is
================  ==========  ===========================================
``vocab``         tensor      rows of the embedding
``embed``         fsdp        ``d_model``: every weight is split along it
``heads``         tensor      ``num_heads * head_dim`` of ``q`` and ``o``
``kv_heads``      tensor      ``num_kv_heads * head_dim`` of ``k``, ``v``
``mlp``           tensor      the MLP's hidden axis
``norm``          --          norm scales, replicated
``relpos_*``      --          T5's relative attention bias, replicated
================  ==========  ===========================================

so a ``(embed, heads)`` kernel is ``P("fsdp", "tensor")``: fully sharded data
parallelism over ``fsdp`` and Megatron-style tensor parallelism over
``tensor``, while ``data`` holds whole replicas. LoRA factors inherit their
base kernel's axes with ``None`` on the rank axis (``models/lora.py``), so
``lora_a`` of ``q`` is ``P("fsdp", None)``.

The rules are applied with Flax's own machinery
(``flax.nnx.logical_axis_rules`` and ``nnx.get_partition_spec``). One
deviation: an axis whose length does not divide the size of its mesh axes is
replicated instead (``jax.device_put`` would reject the uneven split), so
e.g. a single key/value head of 256 on a tensor axis of 3 still loads.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, Optional[str | tuple[str, ...]]], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("relpos_buckets", None),
    ("relpos_heads", None),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh of ``data * fsdp * tensor`` devices.

  The axes are ``AxisType.Auto``: shardings propagate through ``jax.jit`` the
  GSPMD way, so a model written without sharding annotations runs unchanged
  (``jax.make_mesh`` defaults to ``Explicit`` axes, which would require every
  op's sharding to be unambiguous).
  """
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES,
                       axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Inputs ``(B, ...)`` split over ``data`` and ``fsdp``, as FSDP needs."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def _mesh_axis_size(mesh: Mesh, entry: Any) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[name] for name in names)


def _fit(spec: PartitionSpec, shape: Sequence[int],
         mesh: Mesh) -> PartitionSpec:
  """``spec`` with every axis that the mesh cannot split evenly replicated."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return PartitionSpec(*(
      entry if entry is None or size % _mesh_axis_size(mesh, entry) == 0
      else None
      for entry, size in zip(entries, shape)))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def model_shardings(model_or_state: nnx.Module | nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES
                    ) -> nnx.State:
  """The ``NamedSharding`` of every parameter, as a tree like ``nnx.state``.

  Args:
    model_or_state: a model, or its (possibly abstract) ``nnx.state``.
    mesh: usually from :func:`make_mesh`.
    rules: logical axis name -> mesh axis (or ``None``, replicated).

  Returns:
    ``nnx.state(model)`` with each Variable holding its ``NamedSharding``
    (the form of ``nnx.get_named_sharding``), for ``jax.device_put`` or
    ``jax.jit(out_shardings=...)``. Variables without logical axes are
    replicated.
  """
  state = (nnx.state(model_or_state)
           if isinstance(model_or_state, nnx.Module) else model_or_state)
  with nnx.logical_axis_rules(tuple(rules)):
    specs = nnx.get_partition_spec(state)

  def sharding(variable, spec):
    spec = spec.get_value() if _is_variable(spec) else spec
    fitted = _fit(spec, variable.shape, mesh)
    return variable.replace(NamedSharding(mesh, fitted))

  return jax.tree.map(sharding, state, specs, is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: Mesh,
                rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> nnx.Module:
  """Place ``model``'s state per :func:`model_shardings`, in place.

  Returns:
    ``model`` itself, for chaining.
  """
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, model_shardings(state, mesh, rules)))
  return model


def model_from_params(make_model: Callable[[], nnx.Module],
                      params: Mapping[str, Any],
                      mesh: Optional[Mesh] = None) -> nnx.Module:
  """The model ``make_model()`` would build, holding ``params`` instead.

  ``params`` is the nested pure form of ``nnx.state(model)`` (host or device
  arrays). The model is built abstractly (``nnx.eval_shape``), so no random
  weights are allocated; each array goes straight to its place: the default
  device, or with a ``mesh`` its shards per :func:`model_shardings`, so a
  model larger than one device loads.

  Raises:
    ValueError: if ``params`` and the model do not have the same parameters.
  """
  graphdef, state = nnx.split(nnx.eval_shape(make_model))
  wanted = {tuple(path) for path, _ in nnx.to_flat_state(state)}
  given = {tuple(getattr(k, "key", k) for k in path) for path, _ in
           jax.tree_util.tree_leaves_with_path(params)}
  if wanted != given:
    raise ValueError(
        f"the parameters do not match the model: missing "
        f"{sorted(map(str, wanted - given))}, unexpected "
        f"{sorted(map(str, given - wanted))}")
  if mesh is None:
    placed = jax.tree.map(jnp.asarray, params)
  else:
    shardings = nnx.to_pure_dict(model_shardings(state, mesh))
    placed = jax.tree.map(jax.device_put, params, shardings)
  nnx.replace_by_pure_dict(state, placed)
  return nnx.merge(graphdef, state)
