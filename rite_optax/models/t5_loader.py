"""Checkpoint loaders for :mod:`rite_optax.models.t5`: Hugging Face and T5X.

Two released layouts map onto the NNX tree of :class:`rite_optax.models.t5.T5`:

* Hugging Face ``MT5ForConditionalGeneration`` (and T5.1.1's
  ``T5ForConditionalGeneration``, same names) safetensors: a single
  ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
  Linear weights are ``(out, in)`` and are transposed to NNX's ``(in, out)``
  kernels; the relative bias table is ``(num_buckets, num_heads)``, as ours.
* T5X, the tree of ``t5x/examples/t5/network.py`` (which the mT5 gin files
  ``t5x/examples/t5/mt5/*.gin`` use) under ``target``: kernels already
  ``(in, out)`` and flattened over heads (``DenseGeneral`` stores
  ``(d_model, heads * d_kv)``), the bias table ``relpos_bias/rel_embedding``
  ``(num_heads, num_buckets)``. Read from a nested dict the user restored
  (``t5x.checkpoints.load_t5x_checkpoint``) or from an orbax directory as
  :func:`save_t5x_checkpoint` writes it.

Every loader checks the presence, shape and floating dtype of every expected
array before it reads any data, and raises one ``ValueError`` naming the file
and every missing, unexpected or misshapen key; nothing is silently dropped
(the only tolerated extras are HF's copies of the shared embedding, checked to
equal it, and the unused cross-attention bias table that HF itself ignores).
Arrays are cast to ``config.param_dtype``. The checking and assembling are
:mod:`rite_optax.models.key_mapping`'s; this module holds the two name tables
and the files' particulars.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rite_optax.models import key_mapping as km
from rite_optax.models import sharding as sharding_lib
from rite_optax.models.key_mapping import HF_INDEX_FILE
from rite_optax.models.key_mapping import HF_SINGLE_FILE
from rite_optax.models.key_mapping import ParamPath
from rite_optax.models.t5 import T5
from rite_optax.models.t5 import T5Config

# HF checkpoints often store the shared embedding three times (each stack's
# ``embed_tokens`` is the same tensor as ``shared``); they are checked to equal
# it. Old T5 exports also carry a cross-attention bias table that T5 never
# uses (HF ignores it: MT5ForConditionalGeneration._keys_to_ignore_on_load_
# unexpected).
_HF_EMBEDDING_COPIES = ("encoder.embed_tokens.weight",
                        "decoder.embed_tokens.weight")
_HF_UNUSED_CROSS_BIAS = ("decoder.block.0.layer.1.EncDecAttention."
                         "relative_attention_bias.weight")


def _hf_tolerated(config: T5Config) -> dict[str, tuple[int, ...]]:
  embedding = (config.vocab_size, config.d_model)
  return {**{key: embedding for key in _HF_EMBEDDING_COPIES},
          _HF_UNUSED_CROSS_BIAS: (config.relative_attention_num_buckets,
                                  config.num_heads)}


# ---------------------------------------------------------------------------
# Name tables.

# One array per parameter: (key, path in the T5 model, shape in the
# checkpoint, whether the checkpoint's layout is the transpose of ours).
_entry = km.direct


def hf_entries(config: T5Config) -> list[km.Entry]:
  """Every array of an HF ``MT5ForConditionalGeneration`` checkpoint."""
  d, inner, ff = config.d_model, config.inner_dim, config.d_ff
  entries = [_entry("shared.weight", ("shared", "embedding"),
                    (config.vocab_size, d), False),
             _entry("lm_head.weight", ("lm_head", "kernel"),
                    (config.vocab_size, d), True)]

  def attention(prefix: str, path: ParamPath, has_bias: bool) -> None:
    for name in ("q", "k", "v"):
      entries.append(_entry(f"{prefix}.{name}.weight", (*path, name, "kernel"),
                            (inner, d), True))
    entries.append(_entry(f"{prefix}.o.weight", (*path, "o", "kernel"),
                          (d, inner), True))
    if has_bias:
      entries.append(_entry(
          f"{prefix}.relative_attention_bias.weight",
          (*path, "relative_attention_bias", "embedding"),
          (config.relative_attention_num_buckets, config.num_heads), False))

  def mlp(prefix: str, path: ParamPath) -> None:
    for name in ("wi_0", "wi_1"):
      entries.append(_entry(f"{prefix}.{name}.weight",
                            (*path, "mlp", name, "kernel"), (ff, d), True))
    entries.append(_entry(f"{prefix}.wo.weight", (*path, "mlp", "wo", "kernel"),
                          (d, ff), True))

  def norm(key: str, path: ParamPath) -> None:
    entries.append(_entry(key, (*path, "scale"), (d,), False))

  for stack, num_layers in (("encoder", config.num_encoder_layers),
                            ("decoder", config.num_decoder_layers)):
    for i in range(num_layers):
      block, layer = f"{stack}.block.{i}.layer", (stack, "layers", i)
      attention(f"{block}.0.SelfAttention", (*layer, "self_attn"), i == 0)
      norm(f"{block}.0.layer_norm.weight", (*layer, "self_attn_norm"))
      mlp_index = 1
      if stack == "decoder":
        attention(f"{block}.1.EncDecAttention", (*layer, "cross_attn"), False)
        norm(f"{block}.1.layer_norm.weight", (*layer, "cross_attn_norm"))
        mlp_index = 2
      mlp(f"{block}.{mlp_index}.DenseReluDense", layer)
      norm(f"{block}.{mlp_index}.layer_norm.weight", (*layer, "mlp_norm"))
    norm(f"{stack}.final_layer_norm.weight", (stack, "final_norm"))
  return entries


def t5x_entries(config: T5Config) -> list[km.Entry]:
  """Every array under ``target`` of a T5X T5.1.1 / mT5 checkpoint."""
  d, inner, ff = config.d_model, config.inner_dim, config.d_ff
  entries = [
      _entry("token_embedder/embedding", ("shared", "embedding"),
             (config.vocab_size, d), False),
      _entry("decoder/logits_dense/kernel", ("lm_head", "kernel"),
             (d, config.vocab_size), False)]

  def attention(prefix: str, path: ParamPath) -> None:
    for name, ours in (("query", "q"), ("key", "k"), ("value", "v")):
      entries.append(_entry(f"{prefix}/{name}/kernel", (*path, ours, "kernel"),
                            (d, inner), False))
    entries.append(_entry(f"{prefix}/out/kernel", (*path, "o", "kernel"),
                          (inner, d), False))

  def norm(key: str, path: ParamPath) -> None:
    entries.append(_entry(f"{key}/scale", (*path, "scale"), (d,), False))

  for stack, num_layers in (("encoder", config.num_encoder_layers),
                            ("decoder", config.num_decoder_layers)):
    for i in range(num_layers):
      block, layer = f"{stack}/layers_{i}", (stack, "layers", i)
      if stack == "encoder":
        attention(f"{block}/attention", (*layer, "self_attn"))
        norm(f"{block}/pre_attention_layer_norm", (*layer, "self_attn_norm"))
      else:
        attention(f"{block}/self_attention", (*layer, "self_attn"))
        norm(f"{block}/pre_self_attention_layer_norm",
             (*layer, "self_attn_norm"))
        attention(f"{block}/encoder_decoder_attention", (*layer, "cross_attn"))
        norm(f"{block}/pre_cross_attention_layer_norm",
             (*layer, "cross_attn_norm"))
      for name, shape in (("wi_0", (d, ff)), ("wi_1", (d, ff)),
                          ("wo", (ff, d))):
        entries.append(_entry(f"{block}/mlp/{name}/kernel",
                              (*layer, "mlp", name, "kernel"), shape, False))
      norm(f"{block}/pre_mlp_layer_norm", (*layer, "mlp_norm"))
    # One table per stack, shared by its layers; T5X stores it transposed.
    entries.append(_entry(
        f"{stack}/relpos_bias/rel_embedding",
        (stack, "layers", 0, "self_attn", "relative_attention_bias",
         "embedding"),
        (config.num_heads, config.relative_attention_num_buckets), True))
    norm(f"{stack}/{stack}_norm", (stack, "final_norm"))
  return entries


# ---------------------------------------------------------------------------
# Checking and assembling.


def _check(available: Mapping[str, km.ArrayInfo], entries: list[km.Entry],
           source: str,
           tolerated: Optional[Mapping[str, tuple[int, ...]]] = None,
           key_prefix: str = "") -> None:
  """Raise one ValueError listing every missing, extra or misshapen array.

  ``tolerated`` maps keys that may be present, and are not loaded, to their
  shapes.
  """
  problems = []
  for problem in km.find_problems(available, entries, tolerated):
    key, info = f"{key_prefix}{problem.key}", problem.info
    if problem.kind == "missing":
      problems.append(f"missing {key}")
      continue
    where = f"{key} (in {info.source})"
    if problem.kind == "unexpected":
      problems.append(f"unexpected {where}")
    elif problem.kind == "misshapen":
      problems.append(f"misshapen {where}: shape {tuple(info.shape)}, "
                      f"expected {km.shapes_text(problem.expected)}")
    else:
      problems.append(f"wrong dtype {where}: {info.dtype}, expected a "
                      f"floating dtype")
  if problems:
    raise ValueError(f"{source}: checkpoint does not match the T5 config "
                     f"({len(problems)} problems):\n  " + "\n  ".join(problems))


def _check_embedding_copies(read: Callable[[str], Any], present: Iterable[str],
                            shared: np.ndarray, source: str) -> None:
  """HF's per-stack ``embed_tokens`` must equal ``shared``: T5 ties them."""
  for key in _HF_EMBEDDING_COPIES:
    if key in present and not np.array_equal(km.to_numpy(read(key)), shared):
      raise ValueError(f"{source}: {key} differs from shared.weight; T5 shares "
                       f"one input embedding between encoder and decoder")


def _assemble(config: T5Config, entries: list[km.Entry],
              read: Callable[[str], Any]) -> dict:
  """The model's pure param dict, each array read, transposed and cast."""
  return km.assemble(entries, read,
                     lambda x: jnp.asarray(x, dtype=config.param_dtype))


def model_from_params(config: T5Config, params: Mapping[str, Any],
                      mesh: Optional[Mesh] = None) -> T5:
  """A :class:`T5` holding ``params`` (the nested form of ``nnx.state``),
  built abstractly and placed by :func:`sharding.model_from_params`."""
  return sharding_lib.model_from_params(
      lambda: T5(config, rngs=nnx.Rngs(0)), params, mesh)


def _model_params(model: T5) -> dict[ParamPath, np.ndarray]:
  """Flat ``path -> array`` of a model's params; refuses unmerged adapters."""
  if nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    raise ValueError("the model has LoRA adapters: call "
                     "rite_optax.models.merge_lora(model) before saving")
  return {tuple(path): np.asarray(var[...]) for path, var in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_hf_state_dict(model: T5) -> dict[str, np.ndarray]:
  """``model``'s arrays under HF ``MT5ForConditionalGeneration`` names."""
  return km.to_checkpoint(_model_params(model), hf_entries(model.config))


def to_t5x_params(model: T5) -> dict:
  """``model``'s arrays as the nested T5X params (what ``target`` holds)."""
  return km.unflatten(km.to_checkpoint(_model_params(model),
                                       t5x_entries(model.config)))


# ---------------------------------------------------------------------------
# Hugging Face safetensors.


def params_from_hf_t5(state_dict: Mapping[str, Any], config: T5Config,
                      source: str = "state_dict") -> dict:
  """HF ``MT5ForConditionalGeneration`` names -> the T5 model's pure param dict.

  Args:
    state_dict: ``name -> array`` (numpy, jax, or CPU torch tensors, e.g.
      ``hf_model.state_dict()``).
    config: the architecture the arrays must fit.
    source: named in errors.

  Returns:
    A nested dict for ``nnx.replace_by_pure_dict(nnx.state(model), params)``.

  Raises:
    ValueError: naming every missing, unexpected or misshapen array.
  """
  entries = hf_entries(config)
  available = km.describe(state_dict, source)
  _check(available, entries, source, _hf_tolerated(config))
  _check_embedding_copies(state_dict.__getitem__, available,
                          km.to_numpy(state_dict["shared.weight"]), source)
  return _assemble(config, entries, state_dict.__getitem__)


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32",
                       "F64": "float64", "I32": "int32", "I64": "int64"}


def load_hf_safetensors(path_or_dir: str | os.PathLike, config: T5Config,
                        mesh: Optional[Mesh] = None) -> T5:
  """A :class:`T5` holding an HF checkpoint's weights.

  Args:
    path_or_dir: a ``.safetensors`` file, a ``model.safetensors.index.json``,
      or a directory with either.
    config: the architecture (e.g. ``t5.mt5_base()``); arrays are cast to its
      ``param_dtype``.
    mesh: if given, the parameters are placed on it by their logical axes.

  Raises:
    ValueError: naming the file and every missing, unexpected or misshapen
      array, before any tensor data is read.
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  source, key_files = km.safetensors_files(os.fspath(path_or_dir))
  files = km.files_of(source, key_files)
  available: dict[str, km.ArrayInfo] = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      for key in f.keys():
        tensor = f.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype(),
                                        tensor.get_dtype().lower())
        available[key] = km.ArrayInfo(tuple(tensor.get_shape()), dtype,
                                      os.path.basename(file))
        if key_files and key_files.get(key) != file:
          raise ValueError(f"{source}: {key} is in {os.path.basename(file)} "
                           f"but the index says {key_files.get(key)}")
  if key_files:
    for key in sorted(set(key_files) - set(available)):
      raise ValueError(f"{source}: {key} is listed in the index but is not in "
                       f"{os.path.basename(key_files[key])}")
  entries = hf_entries(config)
  _check(available, entries, source, _hf_tolerated(config))

  with contextlib.ExitStack() as stack:
    handles = {file: stack.enter_context(safe_open(file, framework="numpy"))
               for file in files}
    read = lambda key: handles[key_files.get(key, source)].get_tensor(key)
    _check_embedding_copies(read, available, read("shared.weight"), source)
    params = _assemble(config, entries, read)
  return model_from_params(config, params, mesh)


def hf_config_dict(config: T5Config) -> dict[str, Any]:
  """``config.json`` of the HF ``MT5ForConditionalGeneration`` of ``config``."""
  return {
      "architectures": ["MT5ForConditionalGeneration"],
      "model_type": "mt5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_heads": config.num_heads,
      "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance":
          config.relative_attention_max_distance,
      "layer_norm_epsilon": config.layer_norm_eps,
      "feed_forward_proj": "gated-gelu",
      # The published mT5 configs' values; the head has its own weights.
      "tie_word_embeddings": False,
      "dropout_rate": 0.1,
      "pad_token_id": 0,
      "eos_token_id": 1,
      "decoder_start_token_id": 0,
  }


def save_hf_safetensors(model: T5, path: str | os.PathLike, *,
                        num_shards: int = 1) -> None:
  """Write ``model`` in HF ``MT5ForConditionalGeneration`` names.

  Args:
    model: a :class:`T5` without unmerged LoRA adapters.
    path: a ``.safetensors`` file (``num_shards == 1`` only) or a directory
      (created) that ``MT5ForConditionalGeneration.from_pretrained`` reads:
      ``config.json`` and ``model.safetensors``, or
      ``model-0000i-of-0000n.safetensors`` shards plus
      ``model.safetensors.index.json``.
    num_shards: how many files to split the arrays over.
  """
  # pylint: disable-next=import-outside-toplevel
  from safetensors.numpy import save_file

  arrays = to_hf_state_dict(model)
  metadata = {"format": "pt"}  # what HF's loader expects of a safetensors file
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    if num_shards != 1:
      raise ValueError(f"{path}: a sharded checkpoint needs a directory")
    save_file(arrays, path, metadata=metadata)
    return
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config_dict(model.config), f, indent=2)
  if num_shards == 1:
    save_file(arrays, os.path.join(path, HF_SINGLE_FILE), metadata=metadata)
    return
  keys = list(arrays)
  weight_map = {}
  for shard, chunk in enumerate(np.array_split(np.arange(len(keys)),
                                               num_shards)):
    name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
    save_file({keys[i]: arrays[keys[i]] for i in chunk},
              os.path.join(path, name), metadata=metadata)
    weight_map.update({keys[i]: name for i in chunk})
  total_size = int(sum(a.nbytes for a in arrays.values()))
  with open(os.path.join(path, HF_INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total_size},
               "weight_map": weight_map}, f, indent=2)


# ---------------------------------------------------------------------------
# T5X.

# Wrappers around the params in T5X trees: ``load_t5x_checkpoint`` returns
# ``{"target": ..., "state": ...}``; older optimizer trees nest it once more.
_T5X_ROOTS = (("target",), ("optimizer", "target"), ("params",))


def _t5x_root(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
  for keys in _T5X_ROOTS:
    node: Any = tree
    for key in keys:
      node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping):
      return node, "/".join(keys) + "/"
  return tree, ""


# The T5X tree's keys, joined with "/".
_flatten = km.flatten
_unflatten = km.unflatten


def _check_t5x(flat: Mapping[str, Any], config: T5Config, source: str,
               prefix: str) -> list[km.Entry]:
  entries = t5x_entries(config)
  _check(km.describe(flat, source), entries, source, key_prefix=prefix)
  return entries


def params_from_t5x(tree: Mapping[str, Any], config: T5Config,
                    source: str = "t5x tree") -> dict:
  """A T5X params tree (with or without ``target``) -> the pure param dict.

  Args:
    tree: nested ``{"target": {"encoder": {"layers_0": ...}, ...}}`` as
      ``t5x.checkpoints.load_t5x_checkpoint`` returns it, or the params
      themselves (``{"encoder": ..., "decoder": ..., "token_embedder": ...}``).
    config: the architecture the arrays must fit.
    source: named in errors.

  Raises:
    ValueError: naming every missing, unexpected or misshapen array.
  """
  root, prefix = _t5x_root(tree)
  flat = _flatten(root)
  entries = _check_t5x(flat, config, source, prefix)
  return _assemble(config, entries, flat.__getitem__)


def load_t5x_checkpoint(path_or_tree: str | os.PathLike | Mapping[str, Any],
                        config: T5Config, mesh: Optional[Mesh] = None) -> T5:
  """A :class:`T5` from T5X params: a restored nested dict or an orbax dir.

  Args:
    path_or_tree: a nested params tree (see :func:`params_from_t5x`) or an
      orbax PyTree checkpoint directory holding one (as
      :func:`save_t5x_checkpoint` writes it). Native t5x checkpoints
      (msgpack + tensorstore) are read with ``t5x.checkpoints`` first.
    config: the architecture; arrays are cast to its ``param_dtype``.
    mesh: if given, the parameters are placed on it by their logical axes.

  Raises:
    ValueError: naming the checkpoint and every missing, unexpected or
      misshapen array, checked on orbax's metadata before any array is read.
  """
  if isinstance(path_or_tree, Mapping):
    return model_from_params(config, params_from_t5x(path_or_tree, config),
                             mesh)

  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  source = os.path.abspath(os.fspath(path_or_tree))
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(source)
  metadata = getattr(metadata, "item_metadata", metadata)
  metadata_tree = getattr(metadata, "tree", metadata)
  root, prefix = _t5x_root(metadata_tree)
  entries = _check_t5x(_flatten(root), config, source, prefix)
  # Restore host numpy arrays: placement is the caller's (sharding.py's) job.
  restore_args = _map_leaves(
      metadata_tree, lambda _: ocp.RestoreArgs(restore_type=np.ndarray))
  restored = checkpointer.restore(
      source, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  flat = _flatten(_t5x_root(restored)[0])
  return model_from_params(config, _assemble(config, entries, flat.__getitem__),
                           mesh)


def _map_leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
  if isinstance(tree, Mapping):
    return {k: _map_leaves(v, fn) for k, v in tree.items()}
  return fn(tree)


def save_t5x_checkpoint(model: T5, path: str | os.PathLike) -> None:
  """Write ``model`` as an orbax checkpoint of ``{"target": <T5X params>}``.

  Args:
    model: a :class:`T5` without unmerged LoRA adapters.
    path: a directory that must not exist yet (orbax's rule).
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(os.path.abspath(os.fspath(path)),
                    {"target": to_t5x_params(model)})
