"""Gemma, Gemma 2 and Gemma 3 (text): decoder-only transformers in Flax NNX.

Gemma Team, "Gemma: Open Models Based on Gemini Research and Technology", 2024;
"Gemma 2: Improving Open Language Models at a Practical Size", 2024; "Gemma 3
Technical Report", 2025. The computation follows google-deepmind/gemma
(``gemma/gm/nn/_modules.py``, ``_transformer.py``) and matches HF
``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` to float32
rounding (``tests/test_gemma.py``, ``tests/test_gemma3.py``; Gemma 3 270M
on its released weights in ``tests/test_gemma3_real.py``).

One :class:`GemmaConfig` describes the three generations. Gemma 2 is Gemma
with ``post_norms``, an ``attention_pattern`` of local (sliding window) and
global layers, attention and final logit soft-capping and its own query
scaling. Gemma 3 drops the soft-capping, adds ``qk_norm`` (an RMSNorm over
``head_dim`` on queries and keys, before RoPE), five local layers per global
one, a RoPE base per layer type (``local_rope_base`` 10k, ``rope_base`` 1M)
and, from 4B up, linear RoPE scaling of the global layers
(``rope_scale_factor`` 8), with a 262,144-token vocabulary.

Every projection that may carry a LoRA adapter is a 2-D ``nnx.Linear``
without bias, so :func:`rite_optax.models.inject_lora` finds it by path::

    layers/{i}/attn/q   (d_model, num_heads * head_dim)       embed, heads
    layers/{i}/attn/k   (d_model, num_kv_heads * head_dim)    embed, kv_heads
    layers/{i}/attn/v   (d_model, num_kv_heads * head_dim)    embed, kv_heads
    layers/{i}/attn/o   (num_heads * head_dim, d_model)       heads, embed
    layers/{i}/mlp/gate (d_model, mlp_dim)                    embed, mlp
    layers/{i}/mlp/up   (d_model, mlp_dim)                    embed, mlp
    layers/{i}/mlp/down (mlp_dim, d_model)                    mlp, embed

and Gemma 3's ``layers/{i}/attn/q_norm`` and ``k_norm`` scales ``(head_dim,)``
(``norm``, replicated).

(the last column is the logical sharding axes, mapped to a mesh by
:mod:`rite_optax.models.sharding`). The heads of ``q``, ``k`` and ``v`` are a
reshape of the output, head-major: column ``n * head_dim + h`` is dimension
``h`` of head ``n``, as in HF and in the released ``q_einsum (N, D, H)``.

Cost of one forward pass over ``B x T`` tokens: about ``2 B T P`` flops for
``P`` parameters outside the embedding, plus ``2 B T vocab d_model`` for the
tied output layer and ``4 B T^2 num_heads head_dim`` per layer for attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from rite_optax.models import lora

LOCAL = "local"    # sliding-window attention
GLOBAL = "global"  # full causal attention

# google-deepmind/gemma modules.py: the masked logit value. Finite, so a row
# with every key masked (a padding query) gives uniform weights, not NaN.
_MASKED_LOGIT = -2.3819763e38

# Regular expressions for ``inject_lora``, searched in the module paths.
ATTN_TARGETS = r"attn/(q|k|v|o)$"
MLP_TARGETS = r"mlp/(gate|up|down)$"


def lora_targets(attn: bool = True, mlp: bool = True) -> str:
  """The ``inject_lora`` regular expression for the chosen projections."""
  return lora.join_targets(([ATTN_TARGETS] if attn else [])
                           + ([MLP_TARGETS] if mlp else []))


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Hyperparameters of a Gemma or Gemma 2 model.

  Attributes:
    num_layers: decoder blocks.
    d_model: the residual stream width (``embed_dim`` in google-deepmind/gemma,
      ``hidden_size`` in HF).
    num_heads: query heads.
    num_kv_heads: key/value heads: 1 is multi-query attention, ``num_heads``
      multi-head attention, anything between grouped-query attention.
    head_dim: width of one head.
    mlp_dim: hidden width of the GeGLU MLP (``hidden_dim`` / HF
      ``intermediate_size``).
    vocab_size: rows of the tied embedding.
    rope_base: RoPE base frequency (of the ``GLOBAL`` layers, when
      ``local_rope_base`` is set).
    local_rope_base: Gemma 3: the RoPE base of the ``LOCAL`` layers; None
      means ``rope_base``.
    rope_scale_factor: linear RoPE scaling ("positional interpolation") of
      the ``GLOBAL`` layers: their positions are divided by it (Gemma 3 4B,
      12B, 27B: 8). Local layers are never scaled.
    norm_eps: RMSNorm epsilon.
    post_norms: Gemma 2 and 3: RMSNorms after attention and after the MLP,
      before each residual add.
    qk_norm: Gemma 3: RMSNorms over ``head_dim`` on the queries and keys,
      before RoPE.
    attention_pattern: attention type of each layer, cycled over the layers:
      ``(GLOBAL,)`` for Gemma, ``(LOCAL, GLOBAL)`` for Gemma 2,
      :data:`GEMMA3_PATTERN` (five local, one global) for Gemma 3.
    sliding_window: keys at distance ``>= sliding_window`` are masked in
      ``LOCAL`` layers.
    attn_logit_softcap: ``c tanh(logits / c)`` on the attention logits.
    final_logit_softcap: the same on the output logits.
    query_pre_attn_scalar: queries are scaled by ``query_pre_attn_scalar **
      -0.5``; ``None`` means ``head_dim`` (Gemma, Gemma 2 2B and 9B).
    transpose_gating_einsum: the released checkpoint stores
      ``mlp/gating_einsum`` as ``(2, mlp_dim, d_model)`` rather than
      ``(2, d_model, mlp_dim)`` (Gemma 2 9B and 27B, Gemma 3). Only the
      loader reads it.
    param_dtype: dtype of the parameters.
    dtype: dtype of the computation (softmax and norms run in float32).
  """

  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  rope_base: float = 10_000.0
  local_rope_base: Optional[float] = None
  rope_scale_factor: float = 1.0
  norm_eps: float = 1e-6
  post_norms: bool = False
  qk_norm: bool = False
  attention_pattern: tuple[str, ...] = (GLOBAL,)
  sliding_window: Optional[int] = None
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  query_pre_attn_scalar: Optional[float] = None
  transpose_gating_einsum: bool = False
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    unknown = set(self.attention_pattern) - {LOCAL, GLOBAL}
    if not self.attention_pattern or unknown:
      raise ValueError(f"attention_pattern {self.attention_pattern!r}: use "
                       f"{LOCAL!r} and {GLOBAL!r}")
    if LOCAL in self.attention_pattern and not self.sliding_window:
      raise ValueError("local attention layers need a sliding_window")
    if self.rope_scale_factor < 1:
      raise ValueError(f"rope_scale_factor must be >= 1, got "
                       f"{self.rope_scale_factor}")

  def attention_type(self, layer: int) -> str:
    return self.attention_pattern[layer % len(self.attention_pattern)]

  def rope(self, attention_type: str) -> tuple[float, float]:
    """``(base, scale_factor)`` of RoPE in layers of ``attention_type``."""
    if attention_type == LOCAL:
      base = self.rope_base if self.local_rope_base is None else (
          self.local_rope_base)
      return base, 1.0
    return self.rope_base, self.rope_scale_factor

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return scalar**-0.5


def gemma_2b(**overrides: Any) -> GemmaConfig:
  """Gemma 2B: multi-query attention (one key/value head)."""
  return dataclasses.replace(GemmaConfig(
      num_layers=18, d_model=2048, num_heads=8, num_kv_heads=1, head_dim=256,
      mlp_dim=16_384, vocab_size=256_000), **overrides)


def gemma_7b(**overrides: Any) -> GemmaConfig:
  """Gemma 7B: multi-head attention."""
  return dataclasses.replace(GemmaConfig(
      num_layers=28, d_model=3072, num_heads=16, num_kv_heads=16,
      head_dim=256, mlp_dim=24_576, vocab_size=256_000), **overrides)


def _gemma2(**fields: Any) -> GemmaConfig:
  defaults = dict(
      vocab_size=256_000, post_norms=True, attention_pattern=(LOCAL, GLOBAL),
      sliding_window=4096, attn_logit_softcap=50.0, final_logit_softcap=30.0)
  return GemmaConfig(**{**defaults, **fields})


def gemma2_2b(**overrides: Any) -> GemmaConfig:
  """Gemma 2 2B."""
  return dataclasses.replace(_gemma2(
      num_layers=26, d_model=2304, num_heads=8, num_kv_heads=4, head_dim=256,
      mlp_dim=9216, query_pre_attn_scalar=256), **overrides)


def gemma2_9b(**overrides: Any) -> GemmaConfig:
  """Gemma 2 9B."""
  return dataclasses.replace(_gemma2(
      num_layers=42, d_model=3584, num_heads=16, num_kv_heads=8, head_dim=256,
      mlp_dim=14_336, query_pre_attn_scalar=256,
      transpose_gating_einsum=True), **overrides)


def gemma2_27b(**overrides: Any) -> GemmaConfig:
  """Gemma 2 27B: queries scaled by ``(d_model / num_heads) ** -0.5``."""
  return dataclasses.replace(_gemma2(
      num_layers=46, d_model=4608, num_heads=32, num_kv_heads=16,
      head_dim=128, mlp_dim=36_864, query_pre_attn_scalar=4608 // 32,
      transpose_gating_einsum=True), **overrides)


# google-deepmind/gemma GEMMA3_ATTENTION_PATTERN; HF ``sliding_window_pattern``
# 6: layers 5, 11, 17, ... are global.
GEMMA3_PATTERN = (LOCAL,) * 5 + (GLOBAL,)
GEMMA3_VOCAB = 262_144


def _gemma3(**fields: Any) -> GemmaConfig:
  # google-deepmind/gemma gm/nn/_gemma.py Gemma3_*; HF's config.json of the
  # google/gemma-3-* releases agree (rope_scaling linear 8 from 4B up).
  defaults = dict(
      vocab_size=GEMMA3_VOCAB, post_norms=True, qk_norm=True,
      attention_pattern=GEMMA3_PATTERN, sliding_window=1024,
      rope_base=1_000_000.0, local_rope_base=10_000.0,
      transpose_gating_einsum=True)
  return GemmaConfig(**{**defaults, **fields})


def gemma3_270m(**overrides: Any) -> GemmaConfig:
  """Gemma 3 270M: 268,098,176 parameters, 168M of them the embedding."""
  return dataclasses.replace(_gemma3(
      num_layers=18, d_model=640, num_heads=4, num_kv_heads=1, head_dim=256,
      mlp_dim=2048, sliding_window=512, query_pre_attn_scalar=256),
      **overrides)


def gemma3_1b(**overrides: Any) -> GemmaConfig:
  """Gemma 3 1B (999,885,952 parameters)."""
  return dataclasses.replace(_gemma3(
      num_layers=26, d_model=1152, num_heads=4, num_kv_heads=1, head_dim=256,
      mlp_dim=6912, sliding_window=512, query_pre_attn_scalar=256),
      **overrides)


def gemma3_4b(**overrides: Any) -> GemmaConfig:
  """Gemma 3 4B, the text model (3,880,099,328 parameters)."""
  return dataclasses.replace(_gemma3(
      num_layers=34, d_model=2560, num_heads=8, num_kv_heads=4, head_dim=256,
      mlp_dim=10_240, query_pre_attn_scalar=256, rope_scale_factor=8.0),
      **overrides)


def gemma3_12b(**overrides: Any) -> GemmaConfig:
  """Gemma 3 12B, the text model (11,765,788,416 parameters)."""
  return dataclasses.replace(_gemma3(
      num_layers=48, d_model=3840, num_heads=16, num_kv_heads=8,
      head_dim=256, mlp_dim=15_360, query_pre_attn_scalar=256,
      rope_scale_factor=8.0), **overrides)


def gemma3_27b(**overrides: Any) -> GemmaConfig:
  """Gemma 3 27B, the text model: queries scaled by ``(d_model / num_heads)
  ** -0.5`` = ``168 ** -0.5`` (27,009,002,240 parameters)."""
  return dataclasses.replace(_gemma3(
      num_layers=62, d_model=5376, num_heads=32, num_kv_heads=16,
      head_dim=128, mlp_dim=21_504, query_pre_attn_scalar=5376 // 32,
      rope_scale_factor=8.0), **overrides)


def tiny(gemma2: bool = False, **overrides: Any) -> GemmaConfig:
  """A two-layer model that runs instantly on CPU; every width divides 2."""
  if gemma2:
    return tiny_gemma2(**overrides)
  return dataclasses.replace(GemmaConfig(
      num_layers=2, d_model=64, num_heads=4, num_kv_heads=1, head_dim=16,
      mlp_dim=128, vocab_size=256), **overrides)


def tiny_gemma2(**overrides: Any) -> GemmaConfig:
  """:func:`tiny` with Gemma 2's architecture and a window of 8 tokens."""
  return dataclasses.replace(_gemma2(
      num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
      mlp_dim=128, vocab_size=256, query_pre_attn_scalar=16,
      sliding_window=8), **overrides)


def tiny_gemma3(**overrides: Any) -> GemmaConfig:
  """Gemma 3's architecture at :func:`tiny`'s widths: six layers (five local,
  one global), a window of 8 tokens and the global layer's RoPE scaled by 8."""
  return dataclasses.replace(_gemma3(
      num_layers=6, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
      mlp_dim=128, vocab_size=256, query_pre_attn_scalar=16, sliding_window=8,
      rope_scale_factor=8.0), **overrides)


def small(**overrides: Any) -> GemmaConfig:
  """The byte-level base of the CPU comparison (``experiments/compare.py``).

  Gemma's architecture (multi-query attention, GeGLU, tied embedding) at
  0.4M parameters with the byte vocabulary (264,
  :class:`rite_optax.data.ByteTokenizer`), so that ``experiments/pretrain.py``
  pretrains it on two CPU cores in minutes and a checkpoint of it loads with
  ``--model small --checkpoint DIR`` like a released one.
  """
  return dataclasses.replace(GemmaConfig(
      num_layers=4, d_model=96, num_heads=2, num_kv_heads=1, head_dim=32,
      mlp_dim=256, vocab_size=264), **overrides)


def mini(**overrides: Any) -> GemmaConfig:
  """:func:`small` cut to two narrower layers: the base of quick runs and
  tests of ``experiments/compare.py``."""
  return dataclasses.replace(GemmaConfig(
      num_layers=2, d_model=64, num_heads=2, num_kv_heads=1, head_dim=32,
      mlp_dim=128, vocab_size=264), **overrides)


PRESETS = {
    "gemma_2b": gemma_2b,
    "gemma_7b": gemma_7b,
    "gemma2_2b": gemma2_2b,
    "gemma2_9b": gemma2_9b,
    "gemma2_27b": gemma2_27b,
    "gemma3_270m": gemma3_270m,
    "gemma3_1b": gemma3_1b,
    "gemma3_4b": gemma3_4b,
    "gemma3_12b": gemma3_12b,
    "gemma3_27b": gemma3_27b,
    "tiny": tiny,
    "tiny_gemma2": tiny_gemma2,
    "tiny_gemma3": tiny_gemma3,
    "small": small,
    "mini": mini,
}


def _partitioned(init: nnx.Initializer, names: tuple[Optional[str], ...]):
  # Logical axis names only; a mesh is chosen later (models/sharding.py), so
  # no sharding is applied at construction.
  return nnx.with_partitioning(init, names, eager_sharding=False)


def _linear(config: GemmaConfig, in_features: int, out_features: int,
            axes: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      in_features, out_features, use_bias=False, dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=_partitioned(nnx.initializers.lecun_normal(), axes),
      rngs=rngs)


class RMSNorm(nnx.Module):
  """``x / rms(x) * (1 + scale)`` over the last axis, ``scale`` initialised
  at zero; of width ``d_model``, or ``dim`` (Gemma 3's QK-norm: ``head_dim``).
  """

  def __init__(self, config: GemmaConfig, dim: Optional[int] = None):
    self.eps = config.norm_eps
    self.scale = nnx.Param(
        jnp.zeros((dim or config.d_model,), config.param_dtype),
        out_sharding=("norm",), eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    # In float32 for bfloat16 inputs, (1 + scale) applied before the cast
    # back, as HF's Gemma does.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True)
                                 + self.eps)
    return (normed * (1 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float,
               scale_factor: float = 1.0) -> jax.Array:
  """Rotary embedding of ``x (B, T, heads, H)`` at ``positions (B, T)``.

  Gemma's convention (``gemma/gm/math/_positional_embeddings.py``): dimension
  ``i`` of the first half is rotated with dimension ``i`` of the second half,
  at frequency ``base ** (-2 i / H) / scale_factor`` (linear scaling, HF's
  ``rope_type="linear"``).
  """
  half = x.shape[-1] // 2
  timescale = base**(2 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  angles = positions[..., None].astype(jnp.float32) / timescale  # (B, T, H/2)
  if scale_factor != 1.0:
    angles = angles / scale_factor
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate(
      [first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def _softcap(x: jax.Array, cap: Optional[float]) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nnx.Module):
  """Causal grouped-query attention with RoPE; ``q, k, v, o`` are 2-D.

  Gemma 3 normalises each query and key head (``q_norm``, ``k_norm``) before
  RoPE; the RoPE base and scaling depend on the layer's attention type.
  """

  def __init__(self, config: GemmaConfig, attention_type: str,
               rngs: nnx.Rngs):
    n, k, h, d = (config.num_heads, config.num_kv_heads, config.head_dim,
                  config.d_model)
    self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
    self.attention_type = attention_type
    self.sliding_window = (config.sliding_window if attention_type == LOCAL
                           else None)
    self.rope_base, self.rope_scale_factor = config.rope(attention_type)
    self.query_scale = config.query_scale
    self.softcap = config.attn_logit_softcap
    self.q = _linear(config, d, n * h, ("embed", "heads"), rngs)
    self.k = _linear(config, d, k * h, ("embed", "kv_heads"), rngs)
    self.v = _linear(config, d, k * h, ("embed", "kv_heads"), rngs)
    self.o = _linear(config, n * h, d, ("heads", "embed"), rngs)
    self.q_norm = RMSNorm(config, h) if config.qk_norm else None
    self.k_norm = RMSNorm(config, h) if config.qk_norm else None

  def __call__(self, x: jax.Array, positions: jax.Array,
               mask: jax.Array) -> jax.Array:
    """Attend: ``x (B, T, D)``, ``positions (B, T)``, ``mask (B, T, T)``."""
    b, t, _ = x.shape
    k_heads, group = self.num_kv_heads, self.num_heads // self.num_kv_heads
    q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k(x).reshape(b, t, k_heads, self.head_dim)
    v = self.v(x).reshape(b, t, k_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, self.rope_base,
                   self.rope_scale_factor) * jnp.asarray(self.query_scale,
                                                         q.dtype)
    k = apply_rope(k, positions, self.rope_base, self.rope_scale_factor)
    # Query head n = kv_head * group + g reads key/value head kv_head.
    q = q.reshape(b, t, k_heads, group, self.head_dim)
    logits = jnp.einsum("btkgh,bskh->btkgs", q, k).astype(jnp.float32)
    logits = _softcap(logits, self.softcap)
    if self.sliding_window is not None:
      # Gemma measures the window in positions, not in array indices.
      distance = positions[:, :, None] - positions[:, None, :]
      mask = mask & (distance < self.sliding_window)
    logits = jnp.where(mask[:, :, None, None, :], logits, _MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    encoded = jnp.einsum("btkgs,bskh->btkgh", probs, v)
    return self.o(encoded.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
  """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``."""

  def __init__(self, config: GemmaConfig, rngs: nnx.Rngs):
    d, f = config.d_model, config.mlp_dim
    self.gate = _linear(config, d, f, ("embed", "mlp"), rngs)
    self.up = _linear(config, d, f, ("embed", "mlp"), rngs)
    self.down = _linear(config, f, d, ("mlp", "embed"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.gate(x), approximate=True) * self.up(x))


class Block(nnx.Module):
  """Pre-norm attention and MLP, each wrapped in post-norms in Gemma 2 and 3."""

  def __init__(self, config: GemmaConfig, layer: int, rngs: nnx.Rngs):
    self.pre_attention_norm = RMSNorm(config)
    self.attn = Attention(config, config.attention_type(layer), rngs)
    self.post_attention_norm = RMSNorm(config) if config.post_norms else None
    self.pre_ffw_norm = RMSNorm(config)
    self.mlp = MLP(config, rngs)
    self.post_ffw_norm = RMSNorm(config) if config.post_norms else None

  def __call__(self, x: jax.Array, positions: jax.Array,
               mask: jax.Array) -> jax.Array:
    y = self.attn(self.pre_attention_norm(x), positions, mask)
    if self.post_attention_norm is not None:
      y = self.post_attention_norm(y)
    x = x + y
    y = self.mlp(self.pre_ffw_norm(x))
    if self.post_ffw_norm is not None:
      y = self.post_ffw_norm(y)
    return x + y


class Embedder(nnx.Module):
  """The tied embedding: lookup scaled by ``sqrt(d_model)``, and the logits."""

  def __init__(self, config: GemmaConfig, rngs: nnx.Rngs):
    self.dtype = config.dtype
    # Unit-variance rows after the sqrt(d_model) scaling of encode().
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                             in_axis=1, out_axis=0)
    self.embedding = nnx.Param(
        init(rngs.params(), (config.vocab_size, config.d_model),
             config.param_dtype),
        out_sharding=("vocab", "embed"), eager_sharding=False)

  def encode(self, tokens: jax.Array) -> jax.Array:
    x = self.embedding[...][tokens].astype(self.dtype)
    # The scale is rounded to the compute dtype first, as Gemma does.
    return x * jnp.sqrt(x.shape[-1]).astype(self.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    return x @ self.embedding[...].astype(self.dtype).T


def default_positions(tokens: jax.Array,
                      attention_mask: Optional[jax.Array]) -> jax.Array:
  """``0, 1, 2, ...`` counted over the valid tokens only, as Gemma's sampler.

  A left-padded row gets the positions it would have without its padding.
  """
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1,
                     0)


class Gemma(nnx.Module):
  """A Gemma decoder: ``tokens (B, T) -> logits (B, T, vocab)``.

  ``model(tokens)`` is ``model.logits_from_hidden(model.hidden_states(
  tokens))``; the two halves let a loss unembed only the positions it scores
  (with Gemma 3's 262,144-row table the logits of a whole batch are most of
  the memory of a step).
  """

  def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedder = Embedder(config, rngs)
    self.layers = nnx.List(
        [Block(config, i, rngs) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config)

  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """Logits of every position: ``(B, T, vocab_size)`` in the compute dtype.

    The arguments are those of :meth:`hidden_states`.
    """
    return self.logits_from_hidden(
        self.hidden_states(tokens, positions, attention_mask))

  def hidden_states(self, tokens: jax.Array,
                    positions: Optional[jax.Array] = None,
                    attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """The final-normed residual stream, before the tied unembedding.

    Args:
      tokens: ``(B, T)`` int token ids.
      positions: ``(B, T)`` RoPE positions; by default counted over the valid
        tokens (:func:`default_positions`).
      attention_mask: ``(B, T)`` bool, True at valid tokens. Padding keys are
        never attended to; outputs at padding positions are meaningless.

    Returns:
      ``(B, T, d_model)`` in the compute dtype: ``final_norm`` of the last
      block's output, what :meth:`logits_from_hidden` maps to logits.
    """
    if positions is None:
      positions = default_positions(tokens, attention_mask)
    t = tokens.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, :]
    mask = jnp.broadcast_to(mask, (tokens.shape[0], t, t))
    x = self.embedder.encode(tokens)
    for layer in self.layers:
      x = layer(x, positions, mask)
    return self.final_norm(x)

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """``hidden (..., d_model)`` from :meth:`hidden_states` (any subset of its
    positions) -> logits ``(..., vocab_size)``: the tied unembedding and the
    final soft-cap. Costs ``2 vocab d_model`` flops per position."""
    return _softcap(self.embedder.decode(hidden),
                    self.config.final_logit_softcap)
