"""Loading released Gemma weights into :class:`~rite_optax.models.gemma.Gemma`.

Three sources (the GGUF files of llama.cpp are read in
:mod:`rite_optax.models.gguf_loader`, through :func:`params_from_gguf_tensors`
here):

* The released Flax checkpoints (orbax), read and written in their own layout
  (google-deepmind/gemma ``gemma/modules.py`` and ``gemma/params.py``). On
  disk the keys are flattened with ``/`` down to the module, e.g.
  ``{"transformer/layer_0/attn/q_einsum": {"w": ...}}``; ``gemma.params``
  nests them fully and drops the ``w`` of the MLP. Both forms are accepted::

    transformer/embedder/input_embedding        (vocab, D)
    transformer/final_norm/scale                (D,)
    transformer/layer_{i}/pre_attention_norm/scale
    transformer/layer_{i}/attn/q_einsum/w       (N, D, H)     if N != K
    transformer/layer_{i}/attn/kv_einsum/w      (2, K, D, H)  if N != K
    transformer/layer_{i}/attn/qkv_einsum/w     (3, N, D, H)  if N == K
    transformer/layer_{i}/attn/attn_vec_einsum/w  (N, H, D)
    transformer/layer_{i}/post_attention_norm/scale   Gemma 2
    transformer/layer_{i}/pre_ffw_norm/scale
    transformer/layer_{i}/mlp/gating_einsum     (2, D, F), or (2, F, D) when
                                                config.transpose_gating_einsum
    transformer/layer_{i}/mlp/linear            (F, D)
    transformer/layer_{i}/post_ffw_norm/scale         Gemma 2 and 3
    transformer/layer_{i}/attn/_query_norm/scale  (H,)     Gemma 3
    transformer/layer_{i}/attn/_key_norm/scale    (H,)     Gemma 3

  The released tables have 256128 rows for the 256000-token vocabulary; the
  128 rows past it are never produced by the tokenizer and are dropped (as
  HF's conversion does) when the config has ``vocab_size=256000``. Gemma 3
  4B and up are multimodal: their vision tower (``SigLiPFromPatches_0/...``,
  ``transformer/embedder/mm_*``) is not read by this text model and skipped.

* HF transformers ``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` /
  ``Gemma3ForCausalLM`` state dicts (``model.layers.{i}.self_attn.q_proj.weight``
  stored ``(out, in)``; Gemma 3's ``self_attn.q_norm`` / ``k_norm``), in memory
  or as safetensors files (:func:`load_hf_gemma`, :func:`save_hf_gemma`). The
  multimodal Gemma 3 releases pad the table to 262,208 rows; the rows past the
  262,144-token vocabulary are dropped.

Every expected array must be present with its shape and a floating dtype, and
nothing else may be present: anything else raises a ``ValueError`` naming the
key (and the checkpoint). Arrays are cast to ``config.param_dtype``. The
checking and assembling are :mod:`rite_optax.models.key_mapping`'s; this
module holds the three name tables and the formats' particulars.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from rite_optax.models import gemma as gemma_lib
from rite_optax.models import key_mapping as km
from rite_optax.models import sharding as sharding_lib
from rite_optax.models.gemma import Gemma, GemmaConfig
from rite_optax.models.key_mapping import HF_INDEX_FILE
from rite_optax.models.key_mapping import HF_SINGLE_FILE
from rite_optax.models.key_mapping import ParamPath as Path
from rite_optax.models.lora import LoRADense

# Rows of the released embedding tables, for a 256000-token vocabulary.
RELEASED_VOCAB_ROWS = 256_128
_TOKENIZER_VOCAB = 256_000
# HF's multimodal Gemma 3 (4B and up) pads the 262,144-row table for its image
# tokens.
GEMMA3_HF_VOCAB_ROWS = 262_208
# Keys of the vision tower in the released multimodal Gemma 3 checkpoints.
_VISION_PREFIXES = ("SigLiPFromPatches_0/", "transformer/embedder/mm_",
                    "vision_encoder/", "transformer/vision_encoder/")


# Checking and converting, shared by the three sources.


def _raise_problems(problems: list[km.Problem], entries: list[km.Entry],
                    source: str) -> None:
  """The first problem, as the table reads: every missing and unexpected key,
  else the first entry's shape, else its dtype."""
  presence = ([f"missing {p.key!r}" for p in problems if p.kind == "missing"]
              + [f"unexpected {p.key!r}" for p in problems
                 if p.kind == "unexpected"])
  if presence:
    raise ValueError(f"{source}: " + "; ".join(presence))
  if not problems:
    return
  position = {entry.key: i for i, entry in enumerate(entries)}
  first = min(problems, key=lambda p: position[p.key])  # misshapen first
  if first.kind == "misshapen":
    raise ValueError(f"{source}: {first.key!r} has shape {first.info.shape}, "
                     f"expected {km.shapes_text(first.expected)}")
  raise ValueError(f"{source}: {first.key!r} has dtype {first.info.dtype}, "
                   f"expected a floating dtype")


def _convert(arrays: Mapping[str, Any], entries: list[km.Entry],
             config: GemmaConfig, source: str) -> dict:
  """Check ``arrays`` against ``entries`` and build our nested parameters."""
  _raise_problems(km.find_problems(km.describe(arrays, source), entries),
                  entries, source)
  dtype = np.dtype(config.param_dtype)
  # Host arrays: placing them is model_from_params's job (by the mesh).
  # copy=False: a memory-mapped cache array of the right dtype is not copied
  # (the GGUF embedding table is 671 MB).
  return km.assemble(entries, arrays.__getitem__,
                     lambda x: np.asarray(x).astype(dtype, copy=False))


def _embedding_entry(key: str, config: GemmaConfig,
                     rows: tuple[int, ...]) -> km.Entry:
  v = config.vocab_size
  return km.Entry(key, tuple((r, config.d_model) for r in rows),
                  lambda x: {("embedder", "embedding"): x[:v]})


def _norm(key: str, config: GemmaConfig, path: Path,
          dim: Optional[int] = None, offset: float = 0.0) -> km.Entry:
  # ``offset``: GGUF files store the factor ``1 + scale`` (llama.cpp's
  # convert_hf_to_gguf.py adds 1 to every Gemma norm weight); -1 undoes it.
  if not offset:
    return km.direct(key, path + ("scale",), (dim or config.d_model,))
  return km.Entry(key, ((dim or config.d_model,),),
                  lambda x: {path + ("scale",): x + np.asarray(offset,
                                                               x.dtype)})


def model_from_params(config: GemmaConfig, params: Mapping[str, Any],
                      mesh: Optional[Mesh] = None) -> Gemma:
  """A :class:`Gemma` holding ``params`` (the nested form of ``nnx.state``),
  built abstractly and placed by :func:`sharding.model_from_params`."""
  return sharding_lib.model_from_params(
      lambda: Gemma(config, rngs=nnx.Rngs(0)), params, mesh)


# The released Flax checkpoints.


def _canonical_keys(tree: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Both layouts -> ``/``-joined keys with ``mlp/gating_einsum`` unwrapped."""
  canonical: dict[str, Any] = {}
  for key, value in km.flatten(tree).items():
    if key.startswith(_VISION_PREFIXES):
      continue  # Gemma 3's vision tower: not part of the text model
    # On disk the MLP weights sit under a "w" (gemma/params.py).
    if key.endswith(("/mlp/gating_einsum/w", "/mlp/linear/w")):
      key = key[:-len("/w")]
    if key in canonical:
      raise ValueError(f"{source}: {key!r} appears twice (with and without "
                       f"its trailing 'w')")
    canonical[key] = value
  return canonical


def _gemma_entries(config: GemmaConfig) -> list[km.Entry]:
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  d, f = config.d_model, config.mlp_dim

  def heads(key: str, shape: tuple[int, ...], paths: list[Path]) -> km.Entry:
    # (heads, D, H) -> kernel (D, heads * H); stacked einsums split first.
    def convert(x):
      parts = x if len(paths) > 1 else x[None]
      return {path + ("kernel",): part.transpose(1, 0, 2).reshape(d, -1)
              for path, part in zip(paths, parts)}
    return km.Entry(key, (shape,), convert)

  def output(key: str, path: Path) -> km.Entry:  # (N, H, D) -> (N * H, D)
    return km.Entry(key, ((n, h, d),),
                    lambda x: {path + ("kernel",): x.reshape(n * h, d)})

  def gating(key: str, path: Path) -> km.Entry:  # (2, D, F) -> gate, up
    if config.transpose_gating_einsum:
      return km.Entry(key, ((2, f, d),),
                      lambda x: {path + ("gate", "kernel"): x[0].T,
                                 path + ("up", "kernel"): x[1].T})
    return km.Entry(key, ((2, d, f),),
                    lambda x: {path + ("gate", "kernel"): x[0],
                               path + ("up", "kernel"): x[1]})

  rows = (config.vocab_size,)
  if config.vocab_size == _TOKENIZER_VOCAB:
    rows += (RELEASED_VOCAB_ROWS,)
  entries = [
      _embedding_entry("transformer/embedder/input_embedding", config, rows),
      _norm("transformer/final_norm/scale", config, ("final_norm",)),
  ]
  norms = ["pre_attention_norm", "pre_ffw_norm"]
  if config.post_norms:
    norms += ["post_attention_norm", "post_ffw_norm"]
  for i in range(config.num_layers):
    prefix, layer = f"transformer/layer_{i}", ("layers", i)
    attn, mlp = layer + ("attn",), layer + ("mlp",)
    for norm in norms:
      entries.append(_norm(f"{prefix}/{norm}/scale", config, layer + (norm,)))
    if n == k:
      entries.append(heads(f"{prefix}/attn/qkv_einsum/w", (3, n, d, h),
                           [attn + (name,) for name in "qkv"]))
    else:
      entries.append(heads(f"{prefix}/attn/q_einsum/w", (n, d, h),
                           [attn + ("q",)]))
      entries.append(heads(f"{prefix}/attn/kv_einsum/w", (2, k, d, h),
                           [attn + (name,) for name in "kv"]))
    entries.append(output(f"{prefix}/attn/attn_vec_einsum/w", attn + ("o",)))
    if config.qk_norm:
      entries.append(_norm(f"{prefix}/attn/_query_norm/scale", config,
                           attn + ("q_norm",), h))
      entries.append(_norm(f"{prefix}/attn/_key_norm/scale", config,
                           attn + ("k_norm",), h))
    entries.append(gating(f"{prefix}/mlp/gating_einsum", mlp))
    entries.append(km.direct(f"{prefix}/mlp/linear", mlp + ("down", "kernel"),
                             (f, d)))
  return entries


def params_from_gemma_checkpoint(params_tree: Mapping[str, Any],
                                 config: GemmaConfig,
                                 source: str = "gemma checkpoint") -> dict:
  """Released-layout parameters -> the nested form of ``nnx.state(Gemma)``.

  Args:
    params_tree: as restored from a released checkpoint (keys flattened with
      ``/``), or nested as ``gemma.params.load_and_format_params`` returns.
    config: the architecture; decides which arrays are expected.
    source: named in error messages (the checkpoint path).

  Returns:
    ``{"embedder": {"embedding": ...}, "layers": {0: {"attn": {"q":
    {"kernel": ...}}}}, ...}`` of host arrays in ``config.param_dtype``: the
    pure-dict form of ``nnx.state(Gemma(config))``, for
    :func:`model_from_params` or ``nnx.update(model, params)``.

  Raises:
    ValueError: naming a missing, unexpected or misshapen array.
  """
  return _convert(_canonical_keys(params_tree, source),
                  _gemma_entries(config), config, source)


def _restore(path: str | os.PathLike) -> Mapping[str, Any]:
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  # As host arrays: placement is decided afterwards, by the mesh if any.
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load_gemma_checkpoint(path: str | os.PathLike, config: GemmaConfig,
                          mesh: Optional[Mesh] = None) -> Gemma:
  """Read a released-layout orbax checkpoint into a :class:`Gemma`."""
  path = os.path.abspath(os.fspath(path))
  params = params_from_gemma_checkpoint(_restore(path), config, source=path)
  return model_from_params(config, params, mesh)


def _kernel(module: nnx.Module) -> jax.Array:
  # Adapters are folded in, so an adapted model exports as a plain one.
  if isinstance(module, LoRADense):
    module = module.merged()
  return module.kernel[...]


def gemma_checkpoint_params(model: Gemma) -> dict[str, dict[str, np.ndarray]]:
  """``model``'s parameters in the released on-disk layout (host arrays).

  LoRA adapters, if any, are merged into their kernels; ``model`` is unchanged.
  """
  config = model.config
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  d = config.d_model

  def heads_out(kernel, heads):  # kernel (D, heads * H) -> (heads, D, H)
    return np.asarray(kernel).reshape(d, heads, h).transpose(1, 0, 2)

  def scale(norm):
    return {"scale": np.asarray(norm.scale[...])}

  out = {
      "transformer/embedder": {
          "input_embedding": np.asarray(model.embedder.embedding[...])},
      "transformer/final_norm": scale(model.final_norm),
  }
  for i, block in enumerate(model.layers):
    prefix = f"transformer/layer_{i}"
    attn, mlp = block.attn, block.mlp
    q, kk, v = (heads_out(_kernel(attn.q), n), heads_out(_kernel(attn.k), k),
                heads_out(_kernel(attn.v), k))
    if n == k:
      out[f"{prefix}/attn/qkv_einsum"] = {"w": np.stack([q, kk, v])}
    else:
      out[f"{prefix}/attn/q_einsum"] = {"w": q}
      out[f"{prefix}/attn/kv_einsum"] = {"w": np.stack([kk, v])}
    out[f"{prefix}/attn/attn_vec_einsum"] = {
        "w": np.asarray(_kernel(attn.o)).reshape(n, h, d)}
    if config.qk_norm:
      out[f"{prefix}/attn/_query_norm"] = scale(attn.q_norm)
      out[f"{prefix}/attn/_key_norm"] = scale(attn.k_norm)
    gating = np.stack([np.asarray(_kernel(mlp.gate)),
                       np.asarray(_kernel(mlp.up))])
    if config.transpose_gating_einsum:
      gating = gating.transpose(0, 2, 1)
    out[f"{prefix}/mlp/gating_einsum"] = {"w": gating}
    out[f"{prefix}/mlp/linear"] = {"w": np.asarray(_kernel(mlp.down))}
    out[f"{prefix}/pre_attention_norm"] = scale(block.pre_attention_norm)
    out[f"{prefix}/pre_ffw_norm"] = scale(block.pre_ffw_norm)
    if config.post_norms:
      out[f"{prefix}/post_attention_norm"] = scale(block.post_attention_norm)
      out[f"{prefix}/post_ffw_norm"] = scale(block.post_ffw_norm)
  return out


def save_gemma_checkpoint(model: Gemma, path: str | os.PathLike) -> None:
  """Write ``model`` as an orbax checkpoint in the released layout.

  ``path`` must not exist yet. LoRA adapters are merged into the weights.
  """
  path = os.path.abspath(os.fspath(path))
  ocp.PyTreeCheckpointer().save(path, gemma_checkpoint_params(model))


# HF transformers state dicts.


def _out_in_linear(key: str, path: Path, out_features: int,
                   in_features: int) -> km.Entry:
  """A kernel stored ``(out, in)``: torch.nn.Linear's layout, and the numpy
  view of GGUF's ``ne = [in, out]``; nnx.Linear's is ``(in, out)``."""
  return km.direct(key, path + ("kernel",), (out_features, in_features),
                   transpose=True)


def _hf_entries(config: GemmaConfig) -> list[km.Entry]:
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  d, f = config.d_model, config.mlp_dim
  linear = _out_in_linear

  rows = (config.vocab_size,)
  if config.qk_norm and config.vocab_size == gemma_lib.GEMMA3_VOCAB:
    rows += (GEMMA3_HF_VOCAB_ROWS,)
  entries = [
      _embedding_entry("model.embed_tokens.weight", config, rows),
      _norm("model.norm.weight", config, ("final_norm",)),
  ]
  for i in range(config.num_layers):
    prefix, layer = f"model.layers.{i}", ("layers", i)
    attn, mlp = layer + ("attn",), layer + ("mlp",)
    for hf_name, name in _hf_norm_names(config).items():
      entries.append(_norm(f"{prefix}.{hf_name}.weight", config,
                           layer + (name,)))
    entries += [
        linear(f"{prefix}.self_attn.q_proj.weight", attn + ("q",), n * h, d),
        linear(f"{prefix}.self_attn.k_proj.weight", attn + ("k",), k * h, d),
        linear(f"{prefix}.self_attn.v_proj.weight", attn + ("v",), k * h, d),
        linear(f"{prefix}.self_attn.o_proj.weight", attn + ("o",), d, n * h)]
    if config.qk_norm:
      entries.append(_norm(f"{prefix}.self_attn.q_norm.weight", config,
                           attn + ("q_norm",), h))
      entries.append(_norm(f"{prefix}.self_attn.k_norm.weight", config,
                           attn + ("k_norm",), h))
    entries += [
        linear(f"{prefix}.mlp.gate_proj.weight", mlp + ("gate",), f, d),
        linear(f"{prefix}.mlp.up_proj.weight", mlp + ("up",), f, d),
        linear(f"{prefix}.mlp.down_proj.weight", mlp + ("down",), d, f)]
  return entries


def _hf_norm_names(config: GemmaConfig) -> dict[str, str]:
  """HF's norm names -> ours. HF names them by position: in Gemma,
  "post_attention_layernorm" is the norm before the MLP; Gemma 2 has a
  separate pre_feedforward norm."""
  norms = {"input_layernorm": "pre_attention_norm"}
  if config.post_norms:
    norms.update(post_attention_layernorm="post_attention_norm",
                 pre_feedforward_layernorm="pre_ffw_norm",
                 post_feedforward_layernorm="post_ffw_norm")
  else:
    norms.update(post_attention_layernorm="pre_ffw_norm")
  return norms


def params_from_hf_gemma(state_dict: Mapping[str, Any], config: GemmaConfig,
                         source: str = "HF state dict") -> dict:
  """An HF ``Gemma{,2,3}ForCausalLM`` state dict -> our params.

  Values may be torch tensors or arrays. ``lm_head.weight`` may be present
  (``state_dict()`` lists the tied weight) but must equal the embedding.

  Returns:
    The nested form of ``nnx.state(Gemma)``, as
    :func:`params_from_gemma_checkpoint`.

  Raises:
    ValueError: naming a missing, unexpected or misshapen array, or an untied
      ``lm_head``.
  """
  arrays = dict(state_dict)
  head = arrays.pop("lm_head.weight", None)
  embedding = arrays.get("model.embed_tokens.weight")
  if head is not None and embedding is not None and not np.array_equal(
      km.to_numpy(head), km.to_numpy(embedding)):
    raise ValueError(f"{source}: 'lm_head.weight' differs from "
                     f"'model.embed_tokens.weight'; Gemma ties them")
  return _convert(arrays, _hf_entries(config), config, source)


def hf_gemma_state_dict(model: Gemma) -> dict[str, np.ndarray]:
  """``model``'s parameters under HF ``Gemma{,2,3}ForCausalLM`` names (host
  arrays, ``(out, in)`` matrices, the tied ``lm_head`` left out), the inverse
  of :func:`params_from_hf_gemma`. LoRA adapters are merged."""
  config = model.config
  out = {"model.embed_tokens.weight": np.asarray(model.embedder.embedding[...]),
         "model.norm.weight": np.asarray(model.final_norm.scale[...])}
  for i, block in enumerate(model.layers):
    prefix = f"model.layers.{i}"
    for hf_name, name in _hf_norm_names(config).items():
      out[f"{prefix}.{hf_name}.weight"] = np.asarray(
          getattr(block, name).scale[...])
    for name in "qkvo":
      out[f"{prefix}.self_attn.{name}_proj.weight"] = np.asarray(
          _kernel(getattr(block.attn, name))).T
    if config.qk_norm:
      out[f"{prefix}.self_attn.q_norm.weight"] = np.asarray(
          block.attn.q_norm.scale[...])
      out[f"{prefix}.self_attn.k_norm.weight"] = np.asarray(
          block.attn.k_norm.scale[...])
    for name in ("gate", "up", "down"):
      out[f"{prefix}.mlp.{name}_proj.weight"] = np.asarray(
          _kernel(getattr(block.mlp, name))).T
  return {key: np.ascontiguousarray(value) for key, value in out.items()}


def hf_gemma_config_dict(config: GemmaConfig) -> dict[str, Any]:
  """``config.json`` of the HF causal LM of ``config`` (``Gemma3ForCausalLM``
  for Gemma 3, with its layer types, both RoPE bases and the scaling)."""
  out = {
      "vocab_size": config.vocab_size, "hidden_size": config.d_model,
      "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_base, "hidden_activation": "gelu_pytorch_tanh",
      "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
      "bos_token_id": 2,
  }
  if not config.post_norms:
    return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma",
            **out}
  layer_types = [
      "sliding_attention" if config.attention_type(i) == gemma_lib.LOCAL
      else "full_attention" for i in range(config.num_layers)]
  out.update(
      query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
      sliding_window=config.sliding_window, layer_types=layer_types,
      attn_logit_softcapping=config.attn_logit_softcap,
      final_logit_softcapping=config.final_logit_softcap)
  if not config.qk_norm:
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
            **out}
  out["rope_local_base_freq"] = config.rope(gemma_lib.LOCAL)[0]
  if config.rope_scale_factor != 1.0:
    out["rope_scaling"] = {"rope_type": "linear",
                           "factor": config.rope_scale_factor}
  return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
          **out}


def save_hf_gemma(model: Gemma, path: str | os.PathLike) -> None:
  """Write ``model`` as HF safetensors: a ``.safetensors`` file, or a
  directory (created) with ``config.json`` and ``model.safetensors`` that
  ``Gemma3ForCausalLM.from_pretrained`` (or the Gemma/Gemma 2 class) reads.
  LoRA adapters are merged."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  arrays = hf_gemma_state_dict(model)
  path = os.fspath(path)
  metadata = {"format": "pt"}  # what HF's loader expects of a safetensors file
  if path.endswith(".safetensors"):
    save_file(arrays, path, metadata=metadata)
    return
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_gemma_config_dict(model.config), f, indent=2)
  save_file(arrays, os.path.join(path, HF_SINGLE_FILE), metadata=metadata)


def load_hf_gemma(path: str | os.PathLike, config: GemmaConfig,
                  mesh: Optional[Mesh] = None) -> Gemma:
  """A :class:`Gemma` from HF safetensors (a file, a directory holding
  ``model.safetensors`` or its shard index), e.g. a ``google/gemma-3-1b-pt``
  download with ``config=gemma.gemma3_1b()``. Errors name ``path`` and the
  key, as :func:`params_from_hf_gemma`."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  path = os.path.abspath(os.fspath(path))
  arrays: dict[str, np.ndarray] = {}
  for file in km.files_of(*km.safetensors_files(path)):
    arrays.update(load_file(file))
  params = params_from_hf_gemma(arrays, config, source=path)
  return model_from_params(config, params, mesh)


# GGUF tensors (llama.cpp's names, as gguf_loader reads them dequantized).


def _gguf_entries(config: GemmaConfig) -> list[km.Entry]:
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  d, f = config.d_model, config.mlp_dim
  linear = _out_in_linear

  def norm(key: str, path: Path, dim: Optional[int] = None) -> km.Entry:
    return _norm(key, config, path, dim, offset=-1.0)

  entries = [
      _embedding_entry("token_embd.weight", config, (config.vocab_size,)),
      norm("output_norm.weight", ("final_norm",)),
  ]
  norms = {"attn_norm": "pre_attention_norm", "ffn_norm": "pre_ffw_norm"}
  if config.post_norms:
    norms.update(post_attention_norm="post_attention_norm",
                 post_ffw_norm="post_ffw_norm")
  for i in range(config.num_layers):
    prefix, layer = f"blk.{i}", ("layers", i)
    attn, mlp = layer + ("attn",), layer + ("mlp",)
    for gguf_name, name in norms.items():
      entries.append(norm(f"{prefix}.{gguf_name}.weight", layer + (name,)))
    entries += [
        linear(f"{prefix}.attn_q.weight", attn + ("q",), n * h, d),
        linear(f"{prefix}.attn_k.weight", attn + ("k",), k * h, d),
        linear(f"{prefix}.attn_v.weight", attn + ("v",), k * h, d),
        linear(f"{prefix}.attn_output.weight", attn + ("o",), d, n * h)]
    if config.qk_norm:
      entries.append(norm(f"{prefix}.attn_q_norm.weight", attn + ("q_norm",),
                          h))
      entries.append(norm(f"{prefix}.attn_k_norm.weight", attn + ("k_norm",),
                          h))
    entries += [
        linear(f"{prefix}.ffn_gate.weight", mlp + ("gate",), f, d),
        linear(f"{prefix}.ffn_up.weight", mlp + ("up",), f, d),
        linear(f"{prefix}.ffn_down.weight", mlp + ("down",), d, f)]
  return entries


def params_from_gguf_tensors(tensors: Mapping[str, np.ndarray],
                             config: GemmaConfig,
                             source: str = "GGUF tensors") -> dict:
  """llama.cpp's dequantized Gemma tensors -> our params.

  The file's conventions: matrices ``(out, in)``, norm weights stored as
  ``1 + scale``, the output layer tied to ``token_embd`` (a separate
  ``output.weight`` is rejected as unexpected).

  Returns:
    The nested form of ``nnx.state(Gemma)``, as
    :func:`params_from_gemma_checkpoint`.
  """
  return _convert(tensors, _gguf_entries(config), config, source)
