"""Gemma and Gemma 2: parity with HF transformers, masking, LoRA, loaders."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rite_optax
from rite_optax.models import inject_lora, merge_lora
from rite_optax.models import gemma as gemma_lib
from rite_optax.models import gemma_loader

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 12


def _configs():
  # Gemma 2 with a window shorter than the sequence, soft caps small enough to
  # bend the logits, and a query scalar other than head_dim.
  return {
      "gemma": gemma_lib.tiny(),
      "gemma2": gemma_lib.tiny_gemma2(
          sliding_window=4, attn_logit_softcap=3.0, final_logit_softcap=5.0,
          query_pre_attn_scalar=24),
  }


def _hf_model(config: gemma_lib.GemmaConfig):
  common = dict(
      vocab_size=config.vocab_size, hidden_size=config.d_model,
      intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      rms_norm_eps=config.norm_eps, attn_implementation="eager")
  if config.post_norms:
    hf_config = transformers.Gemma2Config(
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        sliding_window=config.sliding_window,
        attn_logit_softcapping=config.attn_logit_softcap,
        final_logit_softcapping=config.final_logit_softcap, **common)
    assert hf_config.layer_types == ["sliding_attention", "full_attention"]
    model = transformers.Gemma2ForCausalLM(hf_config)
  else:
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common))
  torch.manual_seed(0)
  with torch.no_grad():
    # HF initialises the norm scales at zero; random ones test (1 + scale).
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.5 if "norm" in name else 0.15)
  return model.eval()


def _tokens(batch=2, seq=SEQ, seed=0):
  return jnp.asarray(
      np.random.RandomState(seed).randint(0, 256, (batch, seq)), jnp.int32)


@functools.lru_cache(maxsize=None)
def _initial_model(config, seed):
  return gemma_lib.Gemma(config, rngs=nnx.Rngs(seed))


def _model(config, seed=0):
  # XLA compiles every op of a new shape once (slow on CPU); reuse inits.
  return nnx.clone(_initial_model(config, seed))


@nnx.jit
def _forward(model, tokens, positions=None, attention_mask=None):
  return model(tokens, positions, attention_mask)


def _rel_err(x, ref):
  return float(np.abs(np.asarray(x) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_logits_match_hf(name):
  config = _configs()[name]
  hf = _hf_model(config)
  model = gemma_loader.model_from_params(
      config, gemma_loader.params_from_hf_gemma(hf.state_dict(), config))
  tokens = _tokens()
  # Row 1 is left-padded by 3: HF gets the same mask and positions.
  mask = np.ones(tokens.shape, bool)
  mask[1, :3] = False
  positions = gemma_lib.default_positions(tokens, jnp.asarray(mask))
  with torch.no_grad():
    ref = hf(torch.tensor(np.asarray(tokens)),
             attention_mask=torch.tensor(mask.astype(np.int64)),
             position_ids=torch.tensor(np.asarray(positions))).logits.numpy()
  ours = np.asarray(_forward(model, tokens, attention_mask=jnp.asarray(mask)))
  assert ours.shape == (2, SEQ, config.vocab_size)
  assert _rel_err(ours[mask], ref[mask]) < 1e-4
  # Without a mask: positions 0..T-1, as HF's default.
  with torch.no_grad():
    ref = hf(torch.tensor(np.asarray(tokens))).logits.numpy()
  assert _rel_err(_forward(model, tokens), ref) < 1e-4


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_causality(name):
  model = _model(_configs()[name])
  tokens = _tokens()
  logits = _forward(model, tokens)
  future = _forward(model, tokens.at[:, 7].set((tokens[:, 7] + 1) % 256))
  chex.assert_trees_all_close(future[:, :7], logits[:, :7], atol=1e-6)
  past = _forward(model, tokens.at[:, 2].set((tokens[:, 2] + 1) % 256))
  chex.assert_trees_all_close(past[:, :2], logits[:, :2], atol=1e-6)
  changed = jnp.abs(past - logits).max(axis=-1)  # (B, T)
  # Every later position sees the change (in Gemma 2 through the global layer).
  assert bool(jnp.all(changed[:, 2:] > 1e-4))


def test_sliding_window_limits_a_local_only_model():
  config = dataclasses.replace(_configs()["gemma2"], num_layers=1)
  model = _model(config)  # one local layer, window 4
  tokens = _tokens()
  logits = _forward(model, tokens)
  other = _forward(model, tokens.at[:, 2].set((tokens[:, 2] + 1) % 256))
  changed = jnp.abs(other - logits).max(axis=-1)
  assert bool(jnp.all(changed[:, 2:6] > 1e-4))  # distance 0..3: in the window
  chex.assert_trees_all_close(other[:, 6:], logits[:, 6:], atol=1e-6)


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_padding_mask(name):
  model = _model(_configs()[name])
  tokens = _tokens(batch=1, seq=9)
  alone = _forward(model, tokens)
  pad = 3
  padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), tokens], axis=1)
  mask = jnp.arange(9 + pad)[None] >= pad
  left = _forward(model, padded, attention_mask=mask)
  chex.assert_trees_all_close(left[:, pad:], alone, rtol=1e-5, atol=1e-5)
  # The padding's content is never read.
  junk = _forward(model, padded.at[:, :pad].set(77), attention_mask=mask)
  chex.assert_trees_all_close(junk[:, pad:], left[:, pad:], atol=1e-6)
  right_padded = jnp.concatenate([tokens, jnp.full((1, pad), 5, jnp.int32)], 1)
  right = _forward(model, right_padded,
                attention_mask=mask[:, ::-1])
  chex.assert_trees_all_close(right[:, :9], alone, rtol=1e-5, atol=1e-5)
  # Without the mask the padding would be attended to.
  assert float(jnp.abs(_forward(model, padded)[:, pad:] - alone).max()) > 1e-3


def test_bfloat16_compute():
  config = dataclasses.replace(_configs()["gemma2"], dtype=jnp.bfloat16)
  model = _model(config)
  logits = _forward(model, _tokens())
  assert logits.dtype == jnp.bfloat16
  assert model.layers[0].attn.q.kernel[...].dtype == jnp.float32
  reference = _forward(_model(_configs()["gemma2"]), _tokens())
  assert _rel_err(logits.astype(jnp.float32), np.asarray(reference)) < 5e-2


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_lora_starts_at_base_and_merges(name):
  config = _configs()[name]
  model = _model(config)
  tokens = _tokens()
  base = _forward(model, tokens)
  wrapped = inject_lora(model, 4, 8.0, gemma_lib.lora_targets(), nnx.Rngs(1))
  assert len(wrapped) == 7 * config.num_layers
  assert "layers/1/attn/q" in wrapped and "layers/0/mlp/down" in wrapped
  chex.assert_trees_all_equal(_forward(model, tokens), base)  # lora_b = 0
  key = jax.random.PRNGKey(3)
  for path, module in nnx.iter_modules(model):
    if hasattr(module, "lora_b"):
      key, sub = jax.random.split(key)
      module.lora_b[...] = 0.1 * jax.random.normal(sub, module.lora_b.shape)
  adapted = _forward(model, tokens)
  assert float(jnp.abs(adapted - base).max()) > 1e-2
  assert len(merge_lora(model)) == 7 * config.num_layers
  chex.assert_trees_all_close(_forward(model, tokens), adapted, rtol=1e-4,
                              atol=1e-4)


def test_lora_target_helpers():
  model = _model(gemma_lib.tiny())
  attn = inject_lora(model, 2, 2.0, gemma_lib.lora_targets(mlp=False),
                     nnx.Rngs(1))
  assert sorted(attn) == sorted(f"layers/{i}/attn/{p}"
                                for i in range(2) for p in "qkvo")
  mlp = inject_lora(model, 2, 2.0, gemma_lib.MLP_TARGETS, nnx.Rngs(1))
  assert sorted(mlp) == sorted(f"layers/{i}/mlp/{p}" for i in range(2)
                               for p in ("gate", "up", "down"))


# Published parameter counts (the tied embedding counted once).
_PARAMETERS = {
    "gemma_2b": 2_506_172_416,
    "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320,
    # Gemma 3, text only (270M: as the released GGUF file counts it).
    "gemma3_270m": 268_098_176,
    "gemma3_1b": 999_885_952,
    "gemma3_4b": 3_880_099_328,
    "gemma3_12b": 11_765_788_416,
    "gemma3_27b": 27_009_002_240,
}
# Tracing an init costs time quadratic in the number of layers (a flax RNG
# counter update inspects every traced op), so the largest presets are
# checked at two layers, their full size extrapolated from the layer count.
_TRUNCATED = ("gemma2_9b", "gemma2_27b", "gemma3_4b", "gemma3_12b",
              "gemma3_27b")


def _abstract_lora_model(config):
  def build():
    model = gemma_lib.Gemma(config, rngs=nnx.Rngs(0))
    inject_lora(model, 8, 16.0, gemma_lib.lora_targets(), nnx.Rngs(1))
    return model
  return nnx.eval_shape(build)  # nothing is allocated


@pytest.mark.parametrize("preset", sorted(gemma_lib.PRESETS))
def test_presets_pair_every_adapter_without_allocating(preset):
  config = gemma_lib.PRESETS[preset]()
  full_layers = config.num_layers
  if preset in _TRUNCATED:
    config = dataclasses.replace(config, num_layers=2)
  model = _abstract_lora_model(config)
  frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  if preset in _PARAMETERS:
    per_layer = sum(x.size for x in jax.tree.leaves(frozen["layers"]))
    per_layer //= config.num_layers
    total = sum(x.size for x in jax.tree.leaves(frozen))
    total += (full_layers - config.num_layers) * per_layer
    assert total == _PARAMETERS[preset]
  pairs = rite_optax.find_pairs(nnx.state(model, nnx.LoRAParam)).pairs
  assert len(pairs) == 7 * config.num_layers
  names = [p.name for p in pairs]
  q = pairs[names.index("params['layers'][0]['attn']['q']")]
  assert q.a.shape == (config.d_model, 8)
  assert q.b.shape == (8, config.num_heads * config.head_dim)
  down = pairs[names.index("params['layers'][1]['mlp']['down']")]
  assert (down.a.shape, down.b.shape) == ((config.mlp_dim, 8),
                                          (8, config.d_model))


def test_preset_hyperparameters():
  c = gemma_lib.gemma_2b()
  assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim,
          c.mlp_dim, c.vocab_size) == (18, 2048, 8, 1, 256, 16384, 256000)
  c = gemma_lib.gemma_7b()
  assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads,
          c.mlp_dim) == (28, 3072, 16, 16, 24576)
  c = gemma_lib.gemma2_2b()
  assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.mlp_dim,
          c.sliding_window, c.attn_logit_softcap, c.final_logit_softcap,
          c.query_pre_attn_scalar) == (26, 2304, 8, 4, 9216, 4096, 50.0, 30.0,
                                       256)
  assert [c.attention_type(i) for i in range(3)] == ["local", "global", "local"]
  assert gemma_lib.tiny(gemma2=True) == gemma_lib.tiny_gemma2()
  assert gemma_lib.gemma_2b(dtype=jnp.bfloat16).dtype == jnp.bfloat16


# Loader round trips and errors.


def _state_arrays(model):
  return nnx.to_pure_dict(nnx.state(model))


_ROUND_TRIP = {
    "mqa": gemma_lib.tiny(),
    "mha_qkv_einsum": gemma_lib.tiny(num_kv_heads=4),
    "gemma2_transposed_gating": gemma_lib.tiny_gemma2(
        transpose_gating_einsum=True),
}


@pytest.mark.parametrize("name", sorted(_ROUND_TRIP))
def test_checkpoint_round_trip(name, tmp_path):
  config = _ROUND_TRIP[name]
  model = _model(config, seed=4)
  for _, norm in nnx.iter_modules(model):  # non-zero norms, so order matters
    if isinstance(norm, gemma_lib.RMSNorm):
      norm.scale[...] = jax.random.normal(jax.random.PRNGKey(id(norm) % 997),
                                          norm.scale.shape)
  path = tmp_path / "ckpt"
  gemma_loader.save_gemma_checkpoint(model, path)
  loaded = gemma_loader.load_gemma_checkpoint(path, config)
  chex.assert_trees_all_equal(_state_arrays(loaded), _state_arrays(model))
  # The released layout, checked against the shapes of gemma/modules.py.
  flat = gemma_loader.gemma_checkpoint_params(model)
  n, k, h, d, f = (config.num_heads, config.num_kv_heads, config.head_dim,
                   config.d_model, config.mlp_dim)
  def shape(module):
    return flat[f"transformer/layer_1/{module}"]["w"].shape
  if n == k:
    assert shape("attn/qkv_einsum") == (3, n, d, h)
  else:
    assert shape("attn/q_einsum") == (n, d, h)
    assert shape("attn/kv_einsum") == (2, k, d, h)
  assert shape("attn/attn_vec_einsum") == (n, h, d)
  gating = (2, f, d) if config.transpose_gating_einsum else (2, d, f)
  assert shape("mlp/gating_einsum") == gating
  assert shape("mlp/linear") == (f, d)
  assert ("transformer/layer_0/post_ffw_norm" in flat) == config.post_norms
  # The nested form of gemma.params.load_and_format_params (the MLP's "w"
  # dropped) loads the same.
  nested = {}
  for module, leaves in flat.items():
    for leaf, array in leaves.items():
      key = f"{module}/{leaf}"
      if "/mlp/" in key:
        key = key.removesuffix("/w")
      *parents, name = key.split("/")
      node = nested
      for part in parents:
        node = node.setdefault(part, {})
      node[name] = array
  params = gemma_loader.params_from_gemma_checkpoint(nested, config)
  chex.assert_trees_all_equal(params, _state_arrays(model))


def test_export_merges_lora(tmp_path):
  config = gemma_lib.tiny()
  model = _model(config)
  inject_lora(model, 2, 4.0, gemma_lib.lora_targets(), nnx.Rngs(1))
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "lora_b"):
      module.lora_b[...] = 0.1 * jnp.ones(module.lora_b.shape)
  tokens = _tokens()
  adapted = _forward(model, tokens)
  gemma_loader.save_gemma_checkpoint(model, tmp_path / "merged")
  loaded = gemma_loader.load_gemma_checkpoint(tmp_path / "merged", config)
  chex.assert_trees_all_close(_forward(loaded, tokens), adapted, rtol=1e-4,
                              atol=1e-4)


def _checkpoint(config):
  return gemma_loader.gemma_checkpoint_params(_model(config))


def test_checkpoint_errors_name_the_key(tmp_path):
  config = gemma_lib.tiny()
  missing = _checkpoint(config)
  del missing["transformer/layer_1/attn/kv_einsum"]
  with pytest.raises(ValueError, match=r"missing 'transformer/layer_1/attn/"
                                       r"kv_einsum/w'"):
    gemma_loader.params_from_gemma_checkpoint(missing, config)
  extra = _checkpoint(config)
  extra["transformer/layer_2/pre_ffw_norm"] = {"scale": np.zeros(64)}
  with pytest.raises(ValueError, match=r"unexpected 'transformer/layer_2/"
                                       r"pre_ffw_norm/scale'"):
    gemma_loader.params_from_gemma_checkpoint(extra, config)
  misshapen = _checkpoint(config)
  misshapen["transformer/layer_0/mlp/linear"]["w"] = np.zeros((64, 128))
  with pytest.raises(ValueError, match=r"'transformer/layer_0/mlp/linear' has "
                                       r"shape \(64, 128\), expected "
                                       r"\(128, 64\)"):
    gemma_loader.params_from_gemma_checkpoint(misshapen, config)
  integer = _checkpoint(config)
  integer["transformer/final_norm"]["scale"] = np.zeros(64, np.int32)
  with pytest.raises(ValueError, match="final_norm/scale' has dtype int32"):
    gemma_loader.params_from_gemma_checkpoint(integer, config)
  # A Gemma 2 checkpoint is not a Gemma 1 one: the post norms are extra.
  with pytest.raises(ValueError, match="unexpected .*post_attention_norm"):
    gemma_loader.params_from_gemma_checkpoint(
        _checkpoint(gemma_lib.tiny_gemma2(num_kv_heads=1)), config)
  # From a file, the error names the checkpoint too.
  path = tmp_path / "ckpt"
  import orbax.checkpoint as ocp
  ocp.PyTreeCheckpointer().save(str(path), missing)
  with pytest.raises(ValueError, match=f"{path}: missing "):
    gemma_loader.load_gemma_checkpoint(path, config)


def test_released_vocab_padding_is_dropped():
  # Only the embedding depends on the vocabulary: reuse a tiny checkpoint.
  config = gemma_lib.tiny(vocab_size=256_000)
  flat = _checkpoint(gemma_lib.tiny())
  rows = gemma_loader.RELEASED_VOCAB_ROWS
  table = np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None],
                          (rows, config.d_model))
  flat["transformer/embedder"]["input_embedding"] = table
  params = gemma_loader.params_from_gemma_checkpoint(flat, config)
  np.testing.assert_array_equal(params["embedder"]["embedding"],
                                table[:256_000])
  flat["transformer/embedder"]["input_embedding"] = table[:-1]
  with pytest.raises(ValueError, match="input_embedding' has shape"):
    gemma_loader.params_from_gemma_checkpoint(flat, config)


def test_hf_state_dict_errors():
  config = gemma_lib.tiny()
  state = {k: v.clone() for k, v in _hf_model(config).state_dict().items()}
  del state["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="missing 'model.layers.1.mlp.up_proj"):
    gemma_loader.params_from_hf_gemma(state, config)
  state = dict(_hf_model(config).state_dict())
  state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
  with pytest.raises(ValueError, match="lm_head.weight"):
    gemma_loader.params_from_hf_gemma(state, config)
