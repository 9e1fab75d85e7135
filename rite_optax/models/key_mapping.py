"""Mapping released checkpoints' keys onto our models' parameters.

What every checkpoint loader of :mod:`rite_optax.models` shares, so that a
loader is a table of :class:`Entry` (one per checkpoint array) and its
format's particulars (its key layout, its tied copies, its error wording):

* :class:`Entry`: a checkpoint key, the shapes its array may have, and how
  that array becomes model parameters; :func:`direct` for the common
  one-array-to-one-parameter case, which can also be written back
  (:func:`to_checkpoint`).
* :func:`find_problems`: every missing, unexpected, misshapen or non-float
  array, from shapes and dtypes alone (:class:`ArrayInfo`), so that a loader
  can check a file's metadata before it reads any data.
* :func:`assemble`: the nested parameter dict, each array read, converted and
  cast.
* :func:`flatten` / :func:`unflatten`: nested trees <-> ``/``-joined keys.
* :func:`safetensors_files`: the files of an HF safetensors checkpoint (one
  file, a directory, or a shard index).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

ParamPath = tuple[Any, ...]  # in a model's state: ("layers", 0, "attn", "q")
Shape = tuple[int, ...]

HF_INDEX_FILE = "model.safetensors.index.json"
HF_SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One checkpoint array and where it goes in the model.

  ``convert`` maps the checkpoint's array (of one of ``shapes``) to the model
  parameters it holds, by path: one, or several for a stacked einsum. For a
  :func:`direct` entry, ``path`` and ``transpose`` say the same thing
  invertibly.
  """

  key: str                                      # name in the checkpoint
  shapes: tuple[Shape, ...]                     # accepted shapes there
  convert: Callable[[np.ndarray], dict[ParamPath, np.ndarray]]
  path: Optional[ParamPath] = None              # set by `direct` only
  transpose: bool = False                       # set by `direct` only


def direct(key: str, path: ParamPath, shape: Shape,
           transpose: bool = False) -> Entry:
  """One checkpoint array of ``shape`` is the parameter at ``path`` (of the
  transposed shape if ``transpose``: checkpoint ``(out, in)``, ours
  ``(in, out)``)."""
  if transpose:
    return Entry(key, (tuple(shape),), lambda x: {path: x.T}, path, True)
  return Entry(key, (tuple(shape),), lambda x: {path: x}, path, False)


# Reading arrays of any framework.


def to_numpy(value: Any) -> np.ndarray:
  """A numpy view of a numpy, jax or (CPU) torch array."""
  if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy view
    value = value.detach().cpu()
    if not value.is_floating_point():
      return value.numpy()
    return value.float().numpy()  # float32 is exact for every torch float
  return np.asarray(value)


def dtype_name(value: Any) -> str:
  """``"float32"``, ``"bfloat16"``, ``"int32"``, ... of an array of any
  framework (the type's name for a non-array)."""
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    return type(value).__name__
  return str(dtype).removeprefix("torch.")


def is_floating(name: str) -> bool:
  """Whether ``name`` is a floating dtype's own name (so ``"f4"``, FP4 in
  safetensors' names, is not float32)."""
  try:
    dtype = jnp.dtype(name)
  except TypeError:  # not a dtype numpy or ml_dtypes knows
    return False
  return dtype.name == name and bool(jnp.issubdtype(dtype, jnp.floating))


# Checking.


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
  """What is checked of an array, known before its data is read."""

  shape: Shape
  dtype: str        # numpy-style name: "float32", "bfloat16", "int32", ...
  source: str       # the file (or tree) holding it


def describe(arrays: Mapping[str, Any], source: str) -> dict[str, ArrayInfo]:
  """:class:`ArrayInfo` of arrays in memory."""
  return {key: ArrayInfo(tuple(value.shape), dtype_name(value), source)
          for key, value in arrays.items()}


@dataclasses.dataclass(frozen=True)
class Problem:
  """A way ``key`` does not match the table; ``kind`` is one of
  ``"missing"``, ``"unexpected"``, ``"misshapen"``, ``"dtype"``."""

  kind: str
  key: str
  info: Optional[ArrayInfo] = None         # None when missing
  expected: tuple[Shape, ...] = ()


def shapes_text(shapes: Iterable[Shape]) -> str:
  return " or ".join(str(tuple(s)) for s in shapes)


def find_problems(available: Mapping[str, ArrayInfo], entries: Iterable[Entry],
                  tolerated: Optional[Mapping[str, Shape]] = None
                  ) -> list[Problem]:
  """Every mismatch of ``available`` against ``entries``: the missing keys
  (sorted), then, by key, each unexpected key, each array of none of its
  shapes and each array of a non-floating dtype.

  ``tolerated`` maps keys that may be present, and are not loaded, to their
  shape; they are checked like entries when present.
  """
  tolerated = tolerated or {}
  shapes = {**{key: (tuple(shape),) for key, shape in tolerated.items()},
            **{e.key: tuple(e.shapes) for e in entries}}
  problems = [Problem("missing", key) for key in
              sorted(set(shapes) - set(tolerated) - set(available))]
  for key, info in sorted(available.items()):
    if key not in shapes:
      problems.append(Problem("unexpected", key, info))
      continue
    if tuple(info.shape) not in shapes[key]:
      problems.append(Problem("misshapen", key, info, shapes[key]))
    if not is_floating(info.dtype):
      problems.append(Problem("dtype", key, info))
  return problems


# Assembling and writing back.


def assemble(entries: Iterable[Entry], read: Callable[[str], Any],
             cast: Callable[[np.ndarray], Any]) -> dict:
  """The nested parameter dict: each entry's array read, converted, and
  ``cast`` (to the model's dtype, on the host or a device)."""
  params: dict = {}
  for entry in entries:
    for path, array in entry.convert(to_numpy(read(entry.key))).items():
      node = params
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = cast(array)
  return params


def to_checkpoint(params: Mapping[ParamPath, np.ndarray],
                  entries: Iterable[Entry]) -> dict[str, np.ndarray]:
  """The inverse of :func:`assemble` for :func:`direct` entries: ``params``
  (flat, by path) under the checkpoint's keys and in its layout."""
  arrays = {}
  for entry in entries:
    if entry.path is None:
      raise ValueError(f"{entry.key}: not a direct entry, cannot be written "
                       f"back")
    array = params[entry.path]
    arrays[entry.key] = np.ascontiguousarray(array.T if entry.transpose
                                             else array)
  return arrays


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": x}}`` -> ``{"a/b": x}``; ``prefix`` ends with ``/``."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``, the inverse of :func:`flatten`."""
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


# HF safetensors checkpoints.


def safetensors_files(path: str) -> tuple[str, dict[str, str]]:
  """``(source, key -> file)`` of a ``.safetensors`` file (``{}``: every key
  is in ``source``), a shard index, or a directory holding either.

  Raises:
    ValueError: for a directory with neither.
  """
  if os.path.isdir(path):
    index = os.path.join(path, HF_INDEX_FILE)
    single = os.path.join(path, HF_SINGLE_FILE)
    if os.path.exists(index):
      path = index
    elif os.path.exists(single):
      path = single
    else:
      raise ValueError(f"{path}: neither {HF_INDEX_FILE} nor {HF_SINGLE_FILE}")
  if path.endswith(".json"):
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    folder = os.path.dirname(path)
    return path, {k: os.path.join(folder, v) for k, v in weight_map.items()}
  return path, {}


def files_of(source: str, key_files: Mapping[str, str]) -> list[str]:
  """The files of :func:`safetensors_files`'s answer."""
  return sorted(set(key_files.values())) if key_files else [source]
