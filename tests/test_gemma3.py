"""Gemma 3 on random weights: parity with HF ``Gemma3ForCausalLM`` (QK-norm,
both RoPE bases, the global layers' RoPE scaling, a sliding window shorter
than the sequence, padding), the hidden-state API, and the loaders' layouts
(released Flax checkpoint, HF safetensors, GGUF tensors) both ways.

The released weights are tested in ``tests/test_gemma3_real.py``.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rite_optax.models import gemma as gemma_lib
from rite_optax.models import gemma_loader
from rite_optax.models import gguf_loader

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 20  # > the window of 8 of tiny_gemma3
CONFIG = gemma_lib.tiny_gemma3()


def _hf_config(config):
  fields = gemma_loader.hf_gemma_config_dict(config)
  assert fields.pop("architectures") == ["Gemma3ForCausalLM"]
  assert fields.pop("model_type") == "gemma3_text"
  return transformers.Gemma3TextConfig(**fields, attn_implementation="eager")


@functools.lru_cache(maxsize=None)
def _hf_state(config):
  hf_config = _hf_config(config)
  assert hf_config.layer_types == (["sliding_attention"] * 5
                                   + ["full_attention"])
  model = transformers.Gemma3ForCausalLM(hf_config)
  torch.manual_seed(0)
  with torch.no_grad():
    # HF initialises the norm scales at zero; random ones test (1 + scale),
    # the QK-norms included.
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.5 if "norm" in name else 0.15)
  return {k: v.clone() for k, v in model.state_dict().items()}


def _hf_model(config):
  model = transformers.Gemma3ForCausalLM(_hf_config(config))
  model.load_state_dict(_hf_state(config))
  return model.eval()


def _ours(config):
  return gemma_loader.model_from_params(
      config, gemma_loader.params_from_hf_gemma(_hf_state(config), config))


def _tokens(batch=2, seq=SEQ, seed=0):
  return jnp.asarray(
      np.random.RandomState(seed).randint(0, 256, (batch, seq)), jnp.int32)


@nnx.jit
def _forward(model, tokens, positions=None, attention_mask=None):
  return model(tokens, positions, attention_mask)


def _rel_err(x, ref):
  return float(np.abs(np.asarray(x) - ref).max() / np.abs(ref).max())


def _hf_logits(hf, tokens, mask=None, positions=None):
  kwargs = {}
  if mask is not None:
    kwargs = dict(attention_mask=torch.tensor(mask.astype(np.int64)),
                  position_ids=torch.tensor(np.asarray(positions)))
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens)), **kwargs).logits.numpy()


def test_logits_match_hf_with_window_scaling_and_padding():
  hf, model = _hf_model(CONFIG), _ours(CONFIG)
  tokens = _tokens()
  ref = _hf_logits(hf, tokens)
  ours = np.asarray(_forward(model, tokens))
  assert ours.shape == (2, SEQ, CONFIG.vocab_size)
  assert _rel_err(ours, ref) < 1e-4
  # Row 1 left-padded by 5: HF gets the same mask and positions.
  mask = np.ones(tokens.shape, bool)
  mask[1, :5] = False
  positions = gemma_lib.default_positions(tokens, jnp.asarray(mask))
  ref = _hf_logits(hf, tokens, mask, positions)
  ours = np.asarray(_forward(model, tokens, attention_mask=jnp.asarray(mask)))
  assert _rel_err(ours[mask], ref[mask]) < 1e-4


@pytest.mark.parametrize("fault", ["no_qk_norm", "one_rope_base",
                                   "no_rope_scaling", "no_window"])
def test_each_gemma3_difference_matters(fault):
  # The parity above would fail if any one of them were dropped.
  config = {
      "no_qk_norm": None,
      "one_rope_base": dataclasses.replace(CONFIG, local_rope_base=None),
      "no_rope_scaling": dataclasses.replace(CONFIG, rope_scale_factor=1.0),
      "no_window": dataclasses.replace(CONFIG, sliding_window=SEQ),
  }[fault]
  model = _ours(CONFIG)
  if fault == "no_qk_norm":
    for block in model.layers:
      block.attn.q_norm = block.attn.k_norm = None
  else:
    model = gemma_loader.model_from_params(config, nnx.to_pure_dict(
        nnx.state(model)))
  ref = _hf_logits(_hf_model(CONFIG), _tokens())
  assert _rel_err(_forward(model, _tokens()), ref) > 1e-3


def test_sliding_window_limits_local_layers():
  config = dataclasses.replace(CONFIG, num_layers=3)  # three local layers
  model = gemma_lib.Gemma(config, rngs=nnx.Rngs(0))
  tokens = _tokens()
  logits = _forward(model, tokens)
  other = _forward(model, tokens.at[:, 2].set((tokens[:, 2] + 1) % 256))
  changed = jnp.abs(other - logits).max(axis=-1)
  # Three layers of window 8 reach 3 * 7 = 21 > SEQ - 2 positions back...
  assert bool(jnp.all(changed[:, 2:] > 1e-5))
  one = dataclasses.replace(config, num_layers=1)  # ...one reaches 7.
  model = gemma_lib.Gemma(one, rngs=nnx.Rngs(0))
  logits = _forward(model, tokens)
  other = _forward(model, tokens.at[:, 2].set((tokens[:, 2] + 1) % 256))
  changed = jnp.abs(other - logits).max(axis=-1)
  assert bool(jnp.all(changed[:, 2:10] > 1e-5))
  chex.assert_trees_all_close(other[:, 10:], logits[:, 10:], atol=1e-6)


def test_rope_base_and_scale_per_layer_type():
  model = gemma_lib.Gemma(CONFIG, rngs=nnx.Rngs(0))
  ropes = [(b.attn.rope_base, b.attn.rope_scale_factor) for b in model.layers]
  assert ropes == [(10_000.0, 1.0)] * 5 + [(1_000_000.0, 8.0)]
  assert model.layers[0].attn.q_norm.scale.shape == (CONFIG.head_dim,)
  assert model.layers[0].attn.sliding_window == 8
  assert model.layers[5].attn.sliding_window is None
  # Linear scaling: position p at scale s is position p / s unscaled.
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 2, 16))
  positions = jnp.arange(4)[None] * 8
  chex.assert_trees_all_close(
      gemma_lib.apply_rope(x, positions, 1e6, 8.0),
      gemma_lib.apply_rope(x, positions / 8, 1e6), atol=1e-6)


def test_hidden_states_then_logits_equal_call():
  model = _ours(CONFIG)
  tokens = _tokens()
  hidden = nnx.jit(lambda m, t: m.hidden_states(t))(model, tokens)
  assert hidden.shape == (2, SEQ, CONFIG.d_model)
  full = _forward(model, tokens)
  # Unembedding a slice (what a loss on the answer tokens does).
  picked = nnx.jit(lambda m, h: m.logits_from_hidden(h))(model,
                                                         hidden[:, 5:9])
  chex.assert_trees_all_close(picked, full[:, 5:9], rtol=1e-5, atol=1e-5)
  # The hidden states are the final-normed stream, not the logits' input
  # before the norm: their RMS per position is the final norm's scale.
  scale = 1 + model.final_norm.scale[...]
  rms = jnp.sqrt(jnp.mean((hidden / scale) ** 2, axis=-1))
  chex.assert_trees_all_close(rms, jnp.ones_like(rms), rtol=1e-3)


def test_presets_match_the_releases():
  c = gemma_lib.gemma3_270m()
  assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim,
          c.mlp_dim, c.vocab_size, c.sliding_window, c.rope_scale_factor,
          c.attn_logit_softcap, c.final_logit_softcap) == (
              18, 640, 4, 1, 256, 2048, 262_144, 512, 1.0, None, None)
  assert [c.attention_type(i) for i in range(12)].count("global") == 2
  assert c.attention_type(5) == c.attention_type(11) == "global"
  assert gemma_lib.gemma3_1b().sliding_window == 512
  for preset in (gemma_lib.gemma3_4b, gemma_lib.gemma3_12b,
                 gemma_lib.gemma3_27b):
    assert preset().sliding_window == 1024
    assert preset().rope_scale_factor == 8.0
    assert preset().rope("local") == (10_000.0, 1.0)
    assert preset().rope("global") == (1_000_000.0, 8.0)
  assert gemma_lib.gemma3_27b().query_scale == 168**-0.5
  assert gemma_lib.gemma3_4b().query_scale == 256**-0.5


# Loader layouts.


def _random_model(config=CONFIG):
  model = gemma_lib.Gemma(config, rngs=nnx.Rngs(4))
  key = jax.random.PRNGKey(1)
  for _, norm in nnx.iter_modules(model):  # non-zero norms, so order matters
    if isinstance(norm, gemma_lib.RMSNorm):
      key, sub = jax.random.split(key)
      norm.scale[...] = jax.random.normal(sub, norm.scale.shape)
  return model


def _state(model):
  return nnx.to_pure_dict(nnx.state(model))


def test_flax_checkpoint_round_trip(tmp_path):
  model = _random_model()
  gemma_loader.save_gemma_checkpoint(model, tmp_path / "ckpt")
  loaded = gemma_loader.load_gemma_checkpoint(tmp_path / "ckpt", CONFIG)
  chex.assert_trees_all_equal(_state(loaded), _state(model))
  flat = gemma_loader.gemma_checkpoint_params(model)
  h, d, f = CONFIG.head_dim, CONFIG.d_model, CONFIG.mlp_dim
  # The names and shapes of google-deepmind/gemma's Gemma 3 modules.
  assert flat["transformer/layer_0/attn/_query_norm"]["scale"].shape == (h,)
  assert flat["transformer/layer_0/attn/_key_norm"]["scale"].shape == (h,)
  assert flat["transformer/layer_0/mlp/gating_einsum"]["w"].shape == (2, f, d)
  np.testing.assert_array_equal(
      flat["transformer/layer_3/attn/_key_norm"]["scale"],
      model.layers[3].attn.k_norm.scale[...])
  # A multimodal release's vision tower is skipped, a stray key is not.
  flat["SigLiPFromPatches_0/siglip_encoder/Transformer/x"] = {"w": np.ones(3)}
  flat["transformer/embedder/mm_input_projection"] = {"w": np.ones((3, d))}
  params = gemma_loader.params_from_gemma_checkpoint(flat, CONFIG)
  chex.assert_trees_all_equal(params, _state(model))
  del flat["transformer/layer_2/attn/_query_norm"]
  with pytest.raises(ValueError, match=r"missing 'transformer/layer_2/attn/"
                                       r"_query_norm/scale'"):
    gemma_loader.params_from_gemma_checkpoint(flat, CONFIG)


def test_hf_safetensors_round_trip_through_transformers(tmp_path):
  model = _random_model()
  gemma_loader.save_hf_gemma(model, tmp_path / "hf")
  hf = transformers.Gemma3ForCausalLM.from_pretrained(
      tmp_path / "hf", attn_implementation="eager", dtype=torch.float32)
  tokens = _tokens()
  assert _rel_err(_forward(model, tokens), _hf_logits(hf.eval(), tokens)) < 1e-4
  loaded = gemma_loader.load_hf_gemma(tmp_path / "hf", CONFIG)
  chex.assert_trees_all_equal(_state(loaded), _state(model))
  state = gemma_loader.hf_gemma_state_dict(model)
  del state["model.layers.4.self_attn.k_norm.weight"]
  with pytest.raises(ValueError, match="missing 'model.layers.4.self_attn."
                                       "k_norm.weight'"):
    gemma_loader.params_from_hf_gemma(state, CONFIG)


def test_hf_multimodal_vocab_rows_are_dropped():
  config = dataclasses.replace(CONFIG, vocab_size=gemma_lib.GEMMA3_VOCAB,
                               num_layers=1)
  state = {k: np.asarray(v) for k, v in
           gemma_loader.hf_gemma_state_dict(_random_model(
               dataclasses.replace(config, vocab_size=8))).items()}
  rows = gemma_loader.GEMMA3_HF_VOCAB_ROWS
  state["model.embed_tokens.weight"] = np.broadcast_to(
      np.arange(rows, dtype=np.float32)[:, None], (rows, config.d_model))
  params = gemma_loader.params_from_hf_gemma(state, config)
  assert params["embedder"]["embedding"].shape == (262_144, config.d_model)
  assert params["embedder"]["embedding"][-1, 0] == 262_143


def test_gguf_tensors_conventions():
  # What llama.cpp writes for a model: HF's (out, in) matrices, the norms
  # as 1 + w, no output layer.
  model = _random_model()
  hf_state = gemma_loader.hf_gemma_state_dict(model)
  names = {"input_layernorm": "attn_norm",
           "post_attention_layernorm": "post_attention_norm",
           "pre_feedforward_layernorm": "ffn_norm",
           "post_feedforward_layernorm": "post_ffw_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "self_attn.q_norm": "attn_q_norm",
           "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  tensors = {"token_embd.weight": hf_state.pop("model.embed_tokens.weight"),
             "output_norm.weight": hf_state.pop("model.norm.weight") + 1}
  for key, value in hf_state.items():
    _, _, i, module = key.split(".", 3)
    name = names[module.removesuffix(".weight")]
    tensors[f"blk.{i}.{name}.weight"] = value + 1 if "norm" in name else value
  params = gemma_loader.params_from_gguf_tensors(tensors, CONFIG)
  chex.assert_trees_all_close(params, _state(model), atol=1e-6)
  tensors["output.weight"] = tensors["token_embd.weight"]
  with pytest.raises(ValueError, match="my.gguf: unexpected 'output.weight'"):
    gemma_loader.params_from_gguf_tensors(tensors, CONFIG, source="my.gguf")


def _gguf_contents(tmp_path, **metadata):
  # A cache entry as read_gguf leaves it, for a 270M-shaped file.
  (tmp_path / "tensors").mkdir()
  np.save(tmp_path / "tensors" / "token_embd.weight.npy",
          np.zeros((262_144, 1), np.float32))
  fields = {"general.architecture": "gemma3", "gemma3.block_count": 18,
            "gemma3.embedding_length": 640, "gemma3.feed_forward_length": 2048,
            "gemma3.attention.head_count": 4,
            "gemma3.attention.head_count_kv": 1,
            "gemma3.attention.key_length": 256,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
            "gemma3.rope.freq_base": 1e6,
            "gemma3.attention.sliding_window": 512, **metadata}
  return gguf_loader.GGUFContents("/models/my.gguf", tmp_path, fields,
                                  {"token_embd.weight": "Q8_0"})


def test_gguf_config_from_metadata_and_preset(tmp_path):
  contents = _gguf_contents(tmp_path)
  assert gguf_loader.config_from_gguf(contents) == gemma_lib.gemma3_270m()
  # What the file says wins over the preset; what it lacks is the preset's.
  scaled = dataclasses.replace(contents, metadata={
      **contents.metadata, "gemma3.rope.scaling.type": "linear",
      "gemma3.rope.scaling.factor": 8.0,
      "gemma3.attention.sliding_window": 256})
  config = gguf_loader.config_from_gguf(scaled, dtype=jnp.bfloat16)
  assert (config.rope_scale_factor, config.sliding_window, config.dtype,
          config.local_rope_base) == (8.0, 256, jnp.bfloat16, 10_000.0)
  for metadata, message in [
      ({"general.architecture": "llama"}, "architecture is 'llama'"),
      ({"gemma3.block_count": 7}, "no Gemma 3 preset has 7 layers"),
      ({"gemma3.rope.scaling.type": "yarn"}, "'yarn' is not supported")]:
    bad = dataclasses.replace(contents,
                              metadata={**contents.metadata, **metadata})
    with pytest.raises(ValueError, match=f"/models/my.gguf: .*{message}"):
      gguf_loader.config_from_gguf(bad)
  missing = dict(contents.metadata)
  del missing["gemma3.attention.sliding_window"]
  with pytest.raises(ValueError, match="my.gguf: metadata has no 'gemma3."
                                       "attention.sliding_window'"):
    gguf_loader.config_from_gguf(dataclasses.replace(contents,
                                                     metadata=missing))
