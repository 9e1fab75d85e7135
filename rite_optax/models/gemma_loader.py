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
key (and the checkpoint). Arrays are cast to ``config.param_dtype``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from rite_optax.models import sharding as sharding_lib
from rite_optax.models import gemma as gemma_lib
from rite_optax.models.gemma import Gemma, GemmaConfig
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

Path = tuple[Any, ...]  # in our model's state: ("layers", 0, "attn", "q")
# A source array's accepted shapes, and its conversion to our parameters.
_Entry = tuple[tuple[tuple[int, ...], ...], Callable[[np.ndarray], dict]]


# Checking and converting, shared by both sources.


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy view
    value = value.detach().cpu()
    if not value.is_floating_point():
      return value.numpy()
    return value.float().numpy()
  return np.asarray(value)


def _dtype(value: Any) -> np.dtype:
  if hasattr(value, "detach") and value.is_floating_point():
    return np.dtype(np.float32)  # every torch float converts to float32
  return _to_numpy(value).dtype if hasattr(value, "detach") else value.dtype


def _convert(arrays: Mapping[str, Any], entries: Mapping[str, _Entry],
             config: GemmaConfig, source: str) -> dict:
  """Check ``arrays`` against ``entries`` and build our nested parameters."""
  missing = sorted(set(entries) - set(arrays))
  extra = sorted(set(arrays) - set(entries))
  if missing or extra:
    problems = ([f"missing {key!r}" for key in missing]
                + [f"unexpected {key!r}" for key in extra])
    raise ValueError(f"{source}: " + "; ".join(problems))
  params: dict = {}
  for key, (shapes, convert) in entries.items():
    value = arrays[key]
    shape = tuple(value.shape)
    if shape not in shapes:
      wanted = " or ".join(str(s) for s in shapes)
      raise ValueError(f"{source}: {key!r} has shape {shape}, expected "
                       f"{wanted}")
    if not jnp.issubdtype(_dtype(value), jnp.floating):
      raise ValueError(f"{source}: {key!r} has dtype {_dtype(value)}, "
                       f"expected a floating dtype")
    for path, array in convert(_to_numpy(value)).items():
      node = params
      for name in path[:-1]:
        node = node.setdefault(name, {})
      # Host arrays: placing them is model_from_params's job (by the mesh).
      # copy=False: a memory-mapped cache array of the right dtype is not
      # copied (the GGUF embedding table is 671 MB).
      node[path[-1]] = np.asarray(array).astype(np.dtype(config.param_dtype),
                                                copy=False)
  return params


def _embedding_entry(config: GemmaConfig, rows: tuple[int, ...]) -> _Entry:
  v = config.vocab_size
  return (tuple((r, config.d_model) for r in rows),
          lambda x: {("embedder", "embedding"): x[:v]})


def _norm(config: GemmaConfig, path: Path, dim: Optional[int] = None,
          offset: float = 0.0) -> _Entry:
  # ``offset``: GGUF files store the factor ``1 + scale`` (llama.cpp's
  # convert_hf_to_gguf.py adds 1 to every Gemma norm weight); -1 undoes it.
  shapes = ((dim or config.d_model,),)
  if not offset:
    return shapes, lambda x: {path + ("scale",): x}
  return shapes, lambda x: {path + ("scale",): x + np.asarray(offset, x.dtype)}


def model_from_params(config: GemmaConfig, params: Mapping[str, Any],
                      mesh: Optional[Mesh] = None) -> Gemma:
  """A :class:`Gemma` holding ``params`` (the nested form of ``nnx.state``),
  built abstractly and placed by :func:`sharding.model_from_params`."""
  return sharding_lib.model_from_params(
      lambda: Gemma(config, rngs=nnx.Rngs(0)), params, mesh)


# The released Flax checkpoints.


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name))
    else:
      flat[name] = value
  return flat


def _canonical_keys(tree: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Both layouts -> ``/``-joined keys with ``mlp/gating_einsum`` unwrapped."""
  canonical: dict[str, Any] = {}
  for key, value in _flatten(tree).items():
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


def _gemma_entries(config: GemmaConfig) -> dict[str, _Entry]:
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  d, f = config.d_model, config.mlp_dim

  def heads(shape: tuple[int, ...], paths: list[Path]) -> _Entry:
    # (heads, D, H) -> kernel (D, heads * H); stacked einsums split first.
    def convert(x):
      parts = x if len(paths) > 1 else x[None]
      return {path + ("kernel",): part.transpose(1, 0, 2).reshape(d, -1)
              for path, part in zip(paths, parts)}
    return (shape,), convert

  def output(path: Path) -> _Entry:  # (N, H, D) -> kernel (N * H, D)
    return ((n, h, d),), lambda x: {path + ("kernel",): x.reshape(n * h, d)}

  def gating(path: Path) -> _Entry:  # (2, D, F) -> gate and up (D, F)
    if config.transpose_gating_einsum:
      return ((2, f, d),), lambda x: {path + ("gate", "kernel"): x[0].T,
                                       path + ("up", "kernel"): x[1].T}
    return ((2, d, f),), lambda x: {path + ("gate", "kernel"): x[0],
                                     path + ("up", "kernel"): x[1]}

  def down(path: Path) -> _Entry:
    return ((f, d),), lambda x: {path + ("down", "kernel"): x}

  rows = (config.vocab_size,)
  if config.vocab_size == _TOKENIZER_VOCAB:
    rows += (RELEASED_VOCAB_ROWS,)
  entries = {
      "transformer/embedder/input_embedding": _embedding_entry(config, rows),
      "transformer/final_norm/scale": _norm(config, ("final_norm",)),
  }
  norms = ["pre_attention_norm", "pre_ffw_norm"]
  if config.post_norms:
    norms += ["post_attention_norm", "post_ffw_norm"]
  for i in range(config.num_layers):
    prefix, layer = f"transformer/layer_{i}", ("layers", i)
    attn = layer + ("attn",)
    for norm in norms:
      entries[f"{prefix}/{norm}/scale"] = _norm(config, layer + (norm,))
    if n == k:
      entries[f"{prefix}/attn/qkv_einsum/w"] = heads(
          (3, n, d, h), [attn + (name,) for name in "qkv"])
    else:
      entries[f"{prefix}/attn/q_einsum/w"] = heads((n, d, h), [attn + ("q",)])
      entries[f"{prefix}/attn/kv_einsum/w"] = heads(
          (2, k, d, h), [attn + (name,) for name in "kv"])
    entries[f"{prefix}/attn/attn_vec_einsum/w"] = output(attn + ("o",))
    if config.qk_norm:
      entries[f"{prefix}/attn/_query_norm/scale"] = _norm(
          config, attn + ("q_norm",), h)
      entries[f"{prefix}/attn/_key_norm/scale"] = _norm(
          config, attn + ("k_norm",), h)
    entries[f"{prefix}/mlp/gating_einsum"] = gating(layer + ("mlp",))
    entries[f"{prefix}/mlp/linear"] = down(layer + ("mlp",))
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


def _hf_entries(config: GemmaConfig) -> dict[str, _Entry]:
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  d, f = config.d_model, config.mlp_dim

  def linear(path: Path, out_features: int, in_features: int) -> _Entry:
    # torch.nn.Linear stores (out, in); nnx.Linear (in, out).
    return (((out_features, in_features),),
            lambda x: {path + ("kernel",): x.T})

  rows = (config.vocab_size,)
  if config.qk_norm and config.vocab_size == gemma_lib.GEMMA3_VOCAB:
    rows += (GEMMA3_HF_VOCAB_ROWS,)
  entries = {
      "model.embed_tokens.weight": _embedding_entry(config, rows),
      "model.norm.weight": _norm(config, ("final_norm",)),
  }
  # HF names the norms by position: in Gemma, "post_attention_layernorm" is
  # the norm before the MLP; Gemma 2 has a separate pre_feedforward norm.
  norms = {"input_layernorm": "pre_attention_norm"}
  if config.post_norms:
    norms.update(post_attention_layernorm="post_attention_norm",
                 pre_feedforward_layernorm="pre_ffw_norm",
                 post_feedforward_layernorm="post_ffw_norm")
  else:
    norms.update(post_attention_layernorm="pre_ffw_norm")
  for i in range(config.num_layers):
    prefix, layer = f"model.layers.{i}", ("layers", i)
    for hf_name, name in norms.items():
      entries[f"{prefix}.{hf_name}.weight"] = _norm(config, layer + (name,))
    attn = layer + ("attn",)
    entries[f"{prefix}.self_attn.q_proj.weight"] = linear(attn + ("q",),
                                                          n * h, d)
    entries[f"{prefix}.self_attn.k_proj.weight"] = linear(attn + ("k",),
                                                          k * h, d)
    entries[f"{prefix}.self_attn.v_proj.weight"] = linear(attn + ("v",),
                                                          k * h, d)
    entries[f"{prefix}.self_attn.o_proj.weight"] = linear(attn + ("o",),
                                                          d, n * h)
    if config.qk_norm:
      entries[f"{prefix}.self_attn.q_norm.weight"] = _norm(
          config, attn + ("q_norm",), h)
      entries[f"{prefix}.self_attn.k_norm.weight"] = _norm(
          config, attn + ("k_norm",), h)
    mlp = layer + ("mlp",)
    entries[f"{prefix}.mlp.gate_proj.weight"] = linear(mlp + ("gate",), f, d)
    entries[f"{prefix}.mlp.up_proj.weight"] = linear(mlp + ("up",), f, d)
    entries[f"{prefix}.mlp.down_proj.weight"] = linear(mlp + ("down",), d, f)
  return entries


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
      _to_numpy(head), _to_numpy(embedding)):
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
  norms = {"input_layernorm": "pre_attention_norm"}
  if config.post_norms:
    norms.update(post_attention_layernorm="post_attention_norm",
                 pre_feedforward_layernorm="pre_ffw_norm",
                 post_feedforward_layernorm="post_ffw_norm")
  else:
    norms.update(post_attention_layernorm="pre_ffw_norm")
  for i, block in enumerate(model.layers):
    prefix = f"model.layers.{i}"
    for hf_name, name in norms.items():
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


HF_SINGLE_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"


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


def _hf_files(path: str) -> list[str]:
  """The safetensors files of a file, a directory, or a shard index."""
  if os.path.isdir(path):
    index = os.path.join(path, HF_INDEX_FILE)
    single = os.path.join(path, HF_SINGLE_FILE)
    if os.path.exists(index):
      path = index
    elif os.path.exists(single):
      return [single]
    else:
      raise ValueError(f"{path}: neither {HF_INDEX_FILE} nor {HF_SINGLE_FILE}")
  if path.endswith(".json"):
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    folder = os.path.dirname(path)
    return sorted({os.path.join(folder, v) for v in weight_map.values()})
  return [path]


def load_hf_gemma(path: str | os.PathLike, config: GemmaConfig,
                  mesh: Optional[Mesh] = None) -> Gemma:
  """A :class:`Gemma` from HF safetensors (a file, a directory holding
  ``model.safetensors`` or its shard index), e.g. a ``google/gemma-3-1b-pt``
  download with ``config=gemma.gemma3_1b()``. Errors name ``path`` and the
  key, as :func:`params_from_hf_gemma`."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  path = os.path.abspath(os.fspath(path))
  arrays: dict[str, np.ndarray] = {}
  for file in _hf_files(path):
    arrays.update(load_file(file))
  params = params_from_hf_gemma(arrays, config, source=path)
  return model_from_params(config, params, mesh)


# GGUF tensors (llama.cpp's names, as gguf_loader reads them dequantized).


def _gguf_entries(config: GemmaConfig) -> dict[str, _Entry]:
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  d, f = config.d_model, config.mlp_dim

  def linear(path: Path, out_features: int, in_features: int) -> _Entry:
    # GGUF's ne = [in, out]: the numpy view is (out, in), as torch's.
    return (((out_features, in_features),),
            lambda x: {path + ("kernel",): x.T})

  def norm(path: Path, dim: Optional[int] = None) -> _Entry:
    return _norm(config, path, dim, offset=-1.0)

  entries = {
      "token_embd.weight": _embedding_entry(config, (config.vocab_size,)),
      "output_norm.weight": norm(("final_norm",)),
  }
  norms = {"attn_norm": "pre_attention_norm", "ffn_norm": "pre_ffw_norm"}
  if config.post_norms:
    norms.update(post_attention_norm="post_attention_norm",
                 post_ffw_norm="post_ffw_norm")
  for i in range(config.num_layers):
    prefix, layer = f"blk.{i}", ("layers", i)
    attn, mlp = layer + ("attn",), layer + ("mlp",)
    for gguf_name, name in norms.items():
      entries[f"{prefix}.{gguf_name}.weight"] = norm(layer + (name,))
    entries[f"{prefix}.attn_q.weight"] = linear(attn + ("q",), n * h, d)
    entries[f"{prefix}.attn_k.weight"] = linear(attn + ("k",), k * h, d)
    entries[f"{prefix}.attn_v.weight"] = linear(attn + ("v",), k * h, d)
    entries[f"{prefix}.attn_output.weight"] = linear(attn + ("o",), d, n * h)
    if config.qk_norm:
      entries[f"{prefix}.attn_q_norm.weight"] = norm(attn + ("q_norm",), h)
      entries[f"{prefix}.attn_k_norm.weight"] = norm(attn + ("k_norm",), h)
    entries[f"{prefix}.ffn_gate.weight"] = linear(mlp + ("gate",), f, d)
    entries[f"{prefix}.ffn_up.weight"] = linear(mlp + ("up",), f, d)
    entries[f"{prefix}.ffn_down.weight"] = linear(mlp + ("down",), d, f)
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
