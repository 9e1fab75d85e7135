"""T5.1.1 / mT5 encoder-decoder in Flax NNX.

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR 2020; Xue et al., "mT5: A Massively
Multilingual Pre-trained Text-to-Text Transformer", NAACL 2021. The T5.1.1
recipe that mT5 uses: pre-norm blocks with T5's RMS layer norm (no mean, no
bias), gated-GELU feed-forward, relative position buckets instead of absolute
positions, no ``1/sqrt(d)`` on attention logits (T5 folds it into the init of
``q``), one input embedding shared by encoder and decoder, and an untied output
head that is not rescaled by ``d_model**-0.5``.

Module paths (what :func:`rite_optax.models.inject_lora` matches)::

  shared                                     (vocab, d_model) input embedding
  encoder/layers/N/self_attn/{q,k,v,o}       nnx.Linear
  encoder/layers/0/self_attn/relative_attention_bias   the stack's bias table
  encoder/layers/N/mlp/{wi_0,wi_1,wo}        nnx.Linear
  encoder/layers/N/{self_attn_norm,mlp_norm}, encoder/final_norm
  decoder/layers/N/self_attn/..., decoder/layers/N/cross_attn/{q,k,v,o}
  decoder/layers/N/{self_attn_norm,cross_attn_norm,mlp_norm}, decoder/final_norm
  lm_head                                    nnx.Linear (d_model, vocab)

Every parameter carries logical sharding axes ("vocab", "embed", "heads",
"kv_heads", "mlp", "norm", "relpos_buckets", "relpos_heads") and is created
lazily placed (``eager_sharding=False``), so no mesh is needed to build it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rite_optax.models import lora

# Regular expressions for ``inject_lora``, searched in the module paths: every
# attention projection of both stacks (cross-attention included), the MLP.
ATTN_TARGETS = r"(self_attn|cross_attn)/(q|k|v|o)$"
MLP_TARGETS = r"mlp/(wi_0|wi_1|wo)$"


def lora_targets(attn: bool = True, mlp: bool = True) -> str:
  """The ``inject_lora`` regular expression for the chosen projections."""
  return lora.join_targets(([ATTN_TARGETS] if attn else [])
                           + ([MLP_TARGETS] if mlp else []))


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of a T5.1.1 / mT5 model (the names of HF's ``MT5Config``).

  Attributes:
    vocab_size: rows of the shared embedding and of the output head.
    d_model: width of the residual stream.
    d_kv: width of one attention head; ``num_heads * d_kv`` need not equal
      ``d_model``.
    d_ff: hidden width of the gated-GELU MLP.
    num_heads: attention heads (self and cross attention alike).
    num_encoder_layers: blocks in the encoder.
    num_decoder_layers: blocks in the decoder.
    relative_attention_num_buckets: rows of each stack's bias table.
    relative_attention_max_distance: distances beyond it share one bucket.
    layer_norm_eps: added to the mean square in the RMS norm.
    dtype: compute dtype of activations (norms and softmax still run in
      float32).
    param_dtype: dtype the parameters are stored in.
  """

  vocab_size: int = 250112
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def inner_dim(self) -> int:
    """``num_heads * d_kv``: the output width of ``q``, ``k`` and ``v``."""
    return self.num_heads * self.d_kv


def mt5_small(**overrides: Any) -> T5Config:
  """google/mt5-small: 300M parameters (most of them the 250k-row vocab)."""
  return T5Config(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024,
                  num_heads=6, num_encoder_layers=8, num_decoder_layers=8,
                  **overrides)


def mt5_base(**overrides: Any) -> T5Config:
  """google/mt5-base: 580M parameters."""
  return T5Config(vocab_size=250112, d_model=768, d_kv=64, d_ff=2048,
                  num_heads=12, num_encoder_layers=12, num_decoder_layers=12,
                  **overrides)


def mt5_xxl(**overrides: Any) -> T5Config:
  """google/mt5-xxl: 13B parameters."""
  return T5Config(vocab_size=250112, d_model=4096, d_kv=64, d_ff=10240,
                  num_heads=64, num_encoder_layers=24, num_decoder_layers=24,
                  **overrides)


def tiny(**overrides: Any) -> T5Config:
  """A 200k-parameter model for tests.

  ``num_heads * d_kv = 32`` differs from ``d_model = 64``, as in mt5-small
  (384 vs 512), so a transposed projection cannot go unnoticed.
  """
  return T5Config(vocab_size=256, d_model=64, d_kv=8, d_ff=128, num_heads=4,
                  num_encoder_layers=2, num_decoder_layers=2, **overrides)


PRESETS = {
    "mt5_small": mt5_small,
    "mt5_base": mt5_base,
    "mt5_xxl": mt5_xxl,
    "tiny": tiny,
}


def _normal(stddev: float) -> nnx.Initializer:
  return nnx.initializers.normal(stddev=stddev)


def _sharded(init: nnx.Initializer, *axes: str) -> nnx.Initializer:
  # Logical names only; placement happens later, under a mesh and rules.
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def _linear(in_features: int, out_features: int, stddev: float,
            axes: tuple[str, str], config: T5Config, rngs: nnx.Rngs,
            dtype: Any = None) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=False,
                    dtype=dtype or config.dtype,
                    param_dtype=config.param_dtype,
                    kernel_init=_sharded(_normal(stddev), *axes), rngs=rngs)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucket of each ``memory_position - query_position``.

  Half of the buckets (per direction when ``bidirectional``) hold exact
  distances ``0 .. max_exact-1``; the rest grow logarithmically up to
  ``max_distance``, beyond which all distances share the last bucket. In the
  causal case a future position (positive relative position) falls in bucket 0,
  where the causal mask hides it anyway. Computed in numpy float32 with the
  operation order of mesh-tensorflow and HF, so boundary distances (16, 32, 64)
  land in the same buckets as in the released checkpoints' training.

  Args:
    relative_position: int array, ``memory_position - query_position``.
    bidirectional: encoder (True) or causal decoder (False).
    num_buckets: total buckets.
    max_distance: distances ``>= max_distance`` share a bucket.

  Returns:
    int32 array of the same shape, values in ``[0, num_buckets)``.
  """
  relative_position = np.asarray(relative_position, dtype=np.int64)
  buckets = np.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative_position)
  else:
    distance = -np.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  with np.errstate(divide="ignore"):  # log(0) for small distances, unused
    log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
  scaled = (log_ratio / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact))
  if_large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
  if_large = np.minimum(if_large, num_buckets - 1)
  buckets += np.where(is_small, distance, if_large)
  return buckets.astype(np.int32)


class T5LayerNorm(nnx.Module):
  """T5's RMS norm, no mean, no bias: ``x * rsqrt(mean(x^2) + eps) * scale``."""

  def __init__(self, config: T5Config):
    self.eps = config.layer_norm_eps
    self.dtype = config.dtype
    self.scale = nnx.Param(
        jnp.ones((config.d_model,), config.param_dtype),
        out_sharding=("norm",), eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    # The mean square in float32 whatever the compute dtype (as T5X and HF).
    x32 = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(mean_square + self.eps)).astype(self.dtype)
    return normed * self.scale[...].astype(self.dtype)


class Attention(nnx.Module):
  """Multi-head attention with T5's unscaled logits and additive position bias.

  ``q``, ``k``, ``v`` map ``d_model -> num_heads * d_kv`` and ``o`` maps back;
  heads are a reshape of the flat axis (head-major, as in HF and T5X). Only the
  first self-attention of each stack has ``relative_attention_bias``, a
  ``(num_buckets, num_heads)`` table that the stack computes once and passes to
  all its layers.
  """

  def __init__(self, config: T5Config, *, has_relative_bias: bool,
               bidirectional: bool, rngs: nnx.Rngs):
    d, inner = config.d_model, config.inner_dim
    self.num_heads = config.num_heads
    self.d_kv = config.d_kv
    self.dtype = config.dtype
    self.bidirectional = bidirectional
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    # T5 folds the 1/sqrt(d_kv) of the logits into the std of q's init.
    self.q = _linear(d, inner, (d * config.d_kv) ** -0.5, ("embed", "heads"),
                     config, rngs)
    self.k = _linear(d, inner, d ** -0.5, ("embed", "kv_heads"), config, rngs)
    self.v = _linear(d, inner, d ** -0.5, ("embed", "kv_heads"), config, rngs)
    self.o = _linear(inner, d, inner ** -0.5, ("heads", "embed"), config, rngs)
    if has_relative_bias:
      self.relative_attention_bias = nnx.Embed(
          self.num_buckets, config.num_heads, dtype=jnp.float32,
          param_dtype=config.param_dtype,
          embedding_init=_sharded(_normal(d ** -0.5), "relpos_buckets",
                                  "relpos_heads"),
          rngs=rngs)
    else:
      self.relative_attention_bias = None

  def position_bias(self, query_length: int, key_length: int) -> jax.Array:
    """``(1, num_heads, query_length, key_length)`` float32 additive bias."""
    if self.relative_attention_bias is None:
      raise ValueError("only the first layer's self-attention holds the "
                       "relative position bias table")
    relative = (np.arange(key_length)[None, :]
                - np.arange(query_length)[:, None])
    buckets = relative_position_bucket(relative, self.bidirectional,
                                       self.num_buckets, self.max_distance)
    values = self.relative_attention_bias(jnp.asarray(buckets))  # (q, k, h)
    return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

  def __call__(self, x: jax.Array, context: jax.Array,
               mask: Optional[jax.Array],
               bias: Optional[jax.Array] = None) -> jax.Array:
    """Attend from ``x (b, lq, d)`` to ``context (b, lk, d)``.

    Args:
      x: queries' inputs.
      context: keys' and values' inputs (``x`` itself for self-attention).
      mask: boolean, broadcastable to ``(b, heads, lq, lk)``; True = attend.
      bias: float32 additive bias broadcastable to ``(b, heads, lq, lk)``.

    Returns:
      ``(b, lq, d_model)`` in the compute dtype.
    """
    batch, q_len = x.shape[:2]
    k_len = context.shape[1]
    q = self.q(x).reshape(batch, q_len, self.num_heads, self.d_kv)
    k = self.k(context).reshape(batch, k_len, self.num_heads, self.d_kv)
    v = self.v(context).reshape(batch, k_len, self.num_heads, self.d_kv)
    # No 1/sqrt(d_kv): folded into q's init (T5X layers.py, HF scaling=1.0).
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return self.o(out.reshape(batch, q_len, self.num_heads * self.d_kv))


class GatedGeluMLP(nnx.Module):
  """``wo(gelu_tanh(wi_0 x) * wi_1 x)``: T5.1.1's gated-GELU feed-forward."""

  def __init__(self, config: T5Config, rngs: nnx.Rngs):
    d, ff = config.d_model, config.d_ff
    self.wi_0 = _linear(d, ff, d ** -0.5, ("embed", "mlp"), config, rngs)
    self.wi_1 = _linear(d, ff, d ** -0.5, ("embed", "mlp"), config, rngs)
    self.wo = _linear(ff, d, ff ** -0.5, ("mlp", "embed"), config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    # HF's "gelu_new" and T5X's nn.gelu are both the tanh approximation.
    hidden = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x)
    return self.wo(hidden)


class EncoderLayer(nnx.Module):
  """Pre-norm block: bidirectional self-attention, then the MLP."""

  def __init__(self, config: T5Config, *, has_relative_bias: bool,
               rngs: nnx.Rngs):
    self.self_attn_norm = T5LayerNorm(config)
    self.self_attn = Attention(config, has_relative_bias=has_relative_bias,
                               bidirectional=True, rngs=rngs)
    self.mlp_norm = T5LayerNorm(config)
    self.mlp = GatedGeluMLP(config, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array,
               bias: jax.Array) -> jax.Array:
    normed = self.self_attn_norm(x)
    x = x + self.self_attn(normed, normed, mask, bias)
    return x + self.mlp(self.mlp_norm(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: causal self-attention, cross-attention, then the MLP."""

  def __init__(self, config: T5Config, *, has_relative_bias: bool,
               rngs: nnx.Rngs):
    self.self_attn_norm = T5LayerNorm(config)
    self.self_attn = Attention(config, has_relative_bias=has_relative_bias,
                               bidirectional=False, rngs=rngs)
    self.cross_attn_norm = T5LayerNorm(config)
    # Cross-attention has no position bias in T5 (HF drops any stored one).
    self.cross_attn = Attention(config, has_relative_bias=False,
                                bidirectional=True, rngs=rngs)
    self.mlp_norm = T5LayerNorm(config)
    self.mlp = GatedGeluMLP(config, rngs)

  def __call__(self, x: jax.Array, encoder_out: jax.Array,
               self_mask: jax.Array, cross_mask: jax.Array,
               bias: jax.Array) -> jax.Array:
    normed = self.self_attn_norm(x)
    x = x + self.self_attn(normed, normed, self_mask, bias)
    x = x + self.cross_attn(self.cross_attn_norm(x), encoder_out, cross_mask)
    return x + self.mlp(self.mlp_norm(x))


class Encoder(nnx.Module):
  """The encoder stack over already-embedded tokens."""

  def __init__(self, config: T5Config, rngs: nnx.Rngs):
    self.layers = nnx.List([
        EncoderLayer(config, has_relative_bias=(i == 0), rngs=rngs)
        for i in range(config.num_encoder_layers)])
    self.final_norm = T5LayerNorm(config)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    length = x.shape[1]
    # One bias for the whole stack, from the first layer's table (as in T5).
    bias = self.layers[0].self_attn.position_bias(length, length)
    attn_mask = mask[:, None, None, :]
    for layer in self.layers:
      x = layer(x, attn_mask, bias)
    return self.final_norm(x)


class Decoder(nnx.Module):
  """The decoder stack over embedded tokens, attending to the encoder."""

  def __init__(self, config: T5Config, rngs: nnx.Rngs):
    self.layers = nnx.List([
        DecoderLayer(config, has_relative_bias=(i == 0), rngs=rngs)
        for i in range(config.num_decoder_layers)])
    self.final_norm = T5LayerNorm(config)

  def __call__(self, x: jax.Array, encoder_out: jax.Array,
               encoder_mask: jax.Array,
               decoder_mask: Optional[jax.Array]) -> jax.Array:
    length = x.shape[1]
    bias = self.layers[0].self_attn.position_bias(length, length)
    self_mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if decoder_mask is not None:
      self_mask = self_mask & decoder_mask.astype(bool)[:, None, None, :]
    cross_mask = encoder_mask.astype(bool)[:, None, None, :]
    for layer in self.layers:
      x = layer(x, encoder_out, self_mask, cross_mask, bias)
    return self.final_norm(x)


class T5(nnx.Module):
  """T5.1.1 / mT5 encoder-decoder with an untied, unscaled output head.

  Cost per token: about ``2 * params`` flops for each of encoder and decoder,
  plus attention, ``4 * length * num_heads * d_kv`` per layer and token.
  """

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.config = config
    self.shared = nnx.Embed(
        config.vocab_size, config.d_model, dtype=config.dtype,
        param_dtype=config.param_dtype,
        embedding_init=_sharded(_normal(1.0), "vocab", "embed"), rngs=rngs)
    self.encoder = Encoder(config, rngs)
    self.decoder = Decoder(config, rngs)
    # Logits in float32 for a stable softmax over a 250k vocabulary (as T5X).
    self.lm_head = _linear(config.d_model, config.vocab_size,
                           config.d_model ** -0.5, ("embed", "vocab"), config,
                           rngs, dtype=jnp.float32)

  def encode(self, input_ids: jax.Array,
             attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """``(b, l)`` tokens -> ``(b, l, d_model)``; mask True/1 = real token."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    return self.encoder(self.shared(input_ids), attention_mask.astype(bool))

  def decode(self, decoder_input_ids: jax.Array, encoder_out: jax.Array,
             encoder_mask: Optional[jax.Array],
             decoder_mask: Optional[jax.Array] = None) -> jax.Array:
    """Float32 logits ``(b, l_dec, vocab)`` of the next token at each position.

    Args:
      decoder_input_ids: ``(b, l_dec)``, the targets shifted right (T5 starts
        with the pad id 0).
      encoder_out: :meth:`encode`'s output.
      encoder_mask: ``(b, l_enc)``, True/1 where the encoder input is real;
        None attends to every encoder position.
      decoder_mask: ``(b, l_dec)`` padding of the decoder input, combined with
        the causal mask; None means no padding.
    """
    if encoder_mask is None:
      encoder_mask = jnp.ones(encoder_out.shape[:2], bool)
    hidden = self.decoder(self.shared(decoder_input_ids), encoder_out,
                          encoder_mask, decoder_mask)
    return self.lm_head(hidden)

  def __call__(self, input_ids: jax.Array, decoder_input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None,
               decoder_attention_mask: Optional[jax.Array] = None
               ) -> jax.Array:
    """Float32 logits ``(b, l_dec, vocab)``: :meth:`encode`, :meth:`decode`."""
    encoder_out = self.encode(input_ids, attention_mask)
    return self.decode(decoder_input_ids, encoder_out, attention_mask,
                       decoder_attention_mask)
