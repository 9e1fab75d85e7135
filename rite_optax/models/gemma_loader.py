"""Loading released Gemma weights into :class:`~rite_optax.models.gemma.Gemma`.

Two sources:

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
    transformer/layer_{i}/post_ffw_norm/scale         Gemma 2

  The released tables have 256128 rows for the 256000-token vocabulary; the
  128 rows past it are never produced by the tokenizer and are dropped (as
  HF's conversion does) when the config has ``vocab_size=256000``.

* HF transformers ``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` state dicts
  (``model.layers.{i}.self_attn.q_proj.weight`` stored ``(out, in)``).

Every expected array must be present with its shape and a floating dtype, and
nothing else may be present: anything else raises a ``ValueError`` naming the
key (and the checkpoint). Arrays are cast to ``config.param_dtype``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from rite_optax.models import sharding as sharding_lib
from rite_optax.models.gemma import Gemma, GemmaConfig
from rite_optax.models.lora import LoRADense

# Rows of the released embedding tables, for a 256000-token vocabulary.
RELEASED_VOCAB_ROWS = 256_128
_TOKENIZER_VOCAB = 256_000

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
      node[path[-1]] = np.asarray(array).astype(np.dtype(config.param_dtype))
  return params


def _embedding_entry(config: GemmaConfig, rows: tuple[int, ...]) -> _Entry:
  v = config.vocab_size
  return (tuple((r, config.d_model) for r in rows),
          lambda x: {("embedder", "embedding"): x[:v]})


def _norm(config: GemmaConfig, path: Path) -> _Entry:
  return ((config.d_model,),), lambda x: {path + ("scale",): x}


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

  entries = {
      "model.embed_tokens.weight": _embedding_entry(config,
                                                    (config.vocab_size,)),
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
    mlp = layer + ("mlp",)
    entries[f"{prefix}.mlp.gate_proj.weight"] = linear(mlp + ("gate",), f, d)
    entries[f"{prefix}.mlp.up_proj.weight"] = linear(mlp + ("up",), f, d)
    entries[f"{prefix}.mlp.down_proj.weight"] = linear(mlp + ("down",), d, f)
  return entries


def params_from_hf_gemma(state_dict: Mapping[str, Any], config: GemmaConfig,
                         source: str = "HF state dict") -> dict:
  """An HF ``GemmaForCausalLM``/``Gemma2ForCausalLM`` state dict -> our params.

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
