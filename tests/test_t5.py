"""T5.1.1 / mT5: parity with HF MT5ForConditionalGeneration, masking, LoRA, and
the HF / T5X checkpoint loaders."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rite_optax
from rite_optax.models import lora
from rite_optax.models import t5
from rite_optax.models import t5_loader

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 256
ENC_LEN, DEC_LEN = 150, 24  # 150 > max_distance: every bucket kind is used


def _rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def hf_model():
  cfg = t5.tiny()
  torch.manual_seed(0)
  hf_config = transformers.MT5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv,
      d_ff=cfg.d_ff, num_layers=cfg.num_encoder_layers,
      num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_attention_num_buckets,
      relative_attention_max_distance=cfg.relative_attention_max_distance,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False,
      dropout_rate=0.0, attn_implementation="eager")
  model = transformers.MT5ForConditionalGeneration(hf_config).eval()
  # transformers 5 forces MT5's head to be tied to the embedding; real mT5
  # checkpoints have their own head, so give the reference one too.
  model.lm_head.weight = torch.nn.Parameter(
      torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model**-0.5)
  assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  return model


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, VOCAB, (2, ENC_LEN))
  mask = np.ones((2, ENC_LEN), np.int64)
  mask[1, 100:] = 0  # right padding on the second example
  ids[1, 100:] = 0
  dec_ids = rng.integers(1, VOCAB, (2, DEC_LEN))
  dec_mask = np.ones((2, DEC_LEN), np.int64)
  dec_mask[0, 18:] = 0
  return ids, mask, dec_ids, dec_mask


@pytest.fixture(scope="module")
def model(hf_model):
  params = t5_loader.params_from_hf_t5(hf_model.state_dict(), t5.tiny())
  return t5_loader.model_from_params(t5.tiny(), params)


@nnx.jit
def _logits(model, ids, dec_ids, mask, dec_mask):
  return model(ids, dec_ids, mask, dec_mask)


def _forward(model, ids, mask, dec_ids, dec_mask=None):
  dec_mask = None if dec_mask is None else jnp.asarray(dec_mask)
  return np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(dec_ids),
                            jnp.asarray(mask), dec_mask))


def _state(model):
  return {tuple(p): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
  sa, sb = _state(a), _state(b)
  assert sa.keys() == sb.keys()
  for path in sa:
    np.testing.assert_array_equal(sa[path], sb[path], err_msg=str(path))


# ---------------------------------------------------------------------------
# Architecture.


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_hf(bidirectional):
  from transformers.models.mt5.modeling_mt5 import MT5Attention
  relative = np.arange(-400, 401)
  ref = MT5Attention._relative_position_bucket(
      torch.tensor(relative), bidirectional=bidirectional, num_buckets=32,
      max_distance=128).numpy()
  ours = t5.relative_position_bucket(relative, bidirectional, 32, 128)
  np.testing.assert_array_equal(ours, ref)


def test_logits_match_hf_with_padding(hf_model, model, inputs):
  ids, mask, dec_ids, dec_mask = inputs
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(ids),
                   attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec_ids),
                   decoder_attention_mask=torch.tensor(dec_mask)).logits
  ours = _forward(model, ids, mask, dec_ids, dec_mask)
  assert ours.dtype == np.float32
  assert _rel_err(ours, ref.numpy()) < 1e-4


def test_bfloat16_compute_is_close(model, inputs):
  ids, mask, dec_ids, dec_mask = inputs
  ref = _forward(model, ids, mask, dec_ids, dec_mask)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  bf16 = t5_loader.model_from_params(t5.tiny(dtype=jnp.bfloat16), params)
  assert _rel_err(_forward(bf16, ids, mask, dec_ids, dec_mask), ref) < 5e-2


def test_padded_encoder_tokens_are_ignored(model, inputs):
  ids, mask, dec_ids, _ = inputs
  before = _forward(model, ids, mask, dec_ids)
  changed = ids.copy()
  changed[1, 100:] = 7
  after = _forward(model, changed, mask, dec_ids)
  np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
  # ... while a real token does matter, so the test can fail.
  changed[1, 50] = (changed[1, 50] + 1) % VOCAB
  assert not np.allclose(_forward(model, changed, mask, dec_ids)[1], before[1],
                         atol=1e-4)


def test_decoder_is_causal(model, inputs):
  ids, mask, dec_ids, _ = inputs
  before = _forward(model, ids, mask, dec_ids)
  changed = dec_ids.copy()
  changed[:, 10] = (changed[:, 10] + 1) % VOCAB
  after = _forward(model, ids, mask, changed)
  np.testing.assert_allclose(after[:, :10], before[:, :10], rtol=1e-6,
                             atol=1e-6)
  assert not np.allclose(after[:, 10:], before[:, 10:], atol=1e-4)


# ---------------------------------------------------------------------------
# LoRA.


def test_lora_zero_init_is_exact_and_merge_matches(model, inputs):
  ids, mask, dec_ids, dec_mask = inputs
  base = _forward(model, ids, mask, dec_ids, dec_mask)
  adapted = nnx.clone(model)
  wrapped = lora.inject_lora(adapted, 4, 8.0, t5.lora_targets(), nnx.Rngs(1))
  cfg = model.config
  assert len(wrapped) == (cfg.num_encoder_layers * (4 + 3)
                          + cfg.num_decoder_layers * (8 + 3))
  assert "decoder/layers/1/cross_attn/v" in wrapped
  assert "decoder/layers/0/mlp/wi_0" in wrapped
  np.testing.assert_array_equal(
      _forward(adapted, ids, mask, dec_ids, dec_mask), base)

  rng = np.random.default_rng(2)
  for _, module in nnx.iter_modules(adapted):
    if isinstance(module, lora.LoRADense):
      module.lora_b[...] = jnp.asarray(
          0.1 * rng.standard_normal(module.lora_b.shape), jnp.float32)
  with_adapters = _forward(adapted, ids, mask, dec_ids, dec_mask)
  assert _rel_err(with_adapters, base) > 1e-3
  merged = nnx.clone(adapted)
  assert len(lora.merge_lora(merged)) == len(wrapped)
  assert not nnx.to_flat_state(nnx.state(merged, nnx.LoRAParam))
  assert _rel_err(_forward(merged, ids, mask, dec_ids, dec_mask),
                  with_adapters) < 1e-5


@pytest.mark.parametrize("preset", sorted(t5.PRESETS))
def test_lora_pairs_found_for_every_preset(preset):
  config = t5.PRESETS[preset]()

  def inject(model):
    lora.inject_lora(model, 8, 16.0, t5.lora_targets(), nnx.Rngs(1))
    return model

  # Shapes only, nothing allocated. Two traces, because flax's rng updates
  # cost time linear in the trace so far: the base model's init ops would
  # make the adapters' rng calls quadratic.
  base = nnx.eval_shape(lambda: t5.T5(config, rngs=nnx.Rngs(0)))
  abstract = nnx.eval_shape(inject, base)
  trainable = nnx.state(abstract, lora.TRAINABLE)
  pairs = rite_optax.find_pairs(trainable)
  adapters = config.num_encoder_layers * 7 + config.num_decoder_layers * 11
  assert len(pairs.pairs) == adapters
  names = {p.name for p in pairs.pairs}
  assert any("cross_attn" in n and "'o'" in n for n in names), names
  # Sharding names travel to the factors.
  q = abstract.decoder.layers[0].cross_attn.q
  assert q.lora_a.get_metadata()["out_sharding"] == ("embed", None)
  assert q.lora_b.get_metadata()["out_sharding"] == (None, "heads")
  assert q.lora_b.shape == (8, config.inner_dim)


def test_parameters_carry_logical_axes():
  model = nnx.eval_shape(lambda: t5.T5(t5.mt5_small(), rngs=nnx.Rngs(0)))
  axes = {"/".join(map(str, p)): v.get_metadata().get("out_sharding")
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert axes["shared/embedding"] == ("vocab", "embed")
  assert axes["lm_head/kernel"] == ("embed", "vocab")
  assert axes["encoder/layers/3/self_attn/k/kernel"] == ("embed", "kv_heads")
  assert axes["decoder/layers/2/cross_attn/o/kernel"] == ("heads", "embed")
  assert axes["decoder/layers/0/mlp/wo/kernel"] == ("mlp", "embed")
  assert axes["encoder/final_norm/scale"] == ("norm",)
  assert axes["encoder/layers/0/self_attn/relative_attention_bias/embedding"] \
      == ("relpos_buckets", "relpos_heads")
  assert all(axes.values())


# ---------------------------------------------------------------------------
# Loaders.


@pytest.fixture(scope="module")
def random_model(model):
  # Every array random, norm scales included, so any mix-up shows.
  rng = np.random.default_rng(3)
  params = jax.tree.map(
      lambda x: rng.standard_normal(x.shape).astype(np.float32),
      nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return t5_loader.model_from_params(t5.tiny(), params)


def test_hf_save_pretrained_directory_loads(hf_model, model, tmp_path):
  # HF's own sharded writer: the names, shapes and index are the real ones.
  hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
  assert (tmp_path / t5_loader.HF_INDEX_FILE).exists()
  _assert_same_params(t5_loader.load_hf_safetensors(tmp_path, t5.tiny()),
                      model)


@pytest.mark.parametrize("layout", ["file", "directory", "sharded"])
def test_hf_safetensors_round_trip(random_model, tmp_path, layout):
  if layout == "file":
    path = tmp_path / "model.safetensors"
    t5_loader.save_hf_safetensors(random_model, path)
  else:
    path = tmp_path / "ckpt"
    t5_loader.save_hf_safetensors(random_model, path,
                                  num_shards=3 if layout == "sharded" else 1)
  if layout == "sharded":
    with open(path / t5_loader.HF_INDEX_FILE) as f:
      assert len(set(json.load(f)["weight_map"].values())) == 3
  _assert_same_params(t5_loader.load_hf_safetensors(path, t5.tiny()),
                      random_model)


def test_t5x_round_trip(random_model, tmp_path):
  path = tmp_path / "t5x"
  t5_loader.save_t5x_checkpoint(random_model, path)
  _assert_same_params(t5_loader.load_t5x_checkpoint(path, t5.tiny()),
                      random_model)
  # A nested tree the user restored, with or without the "target" wrapper.
  tree = t5_loader.to_t5x_params(random_model)
  for given in (tree, {"target": tree, "state": {"step": np.int32(3)}}):
    _assert_same_params(t5_loader.load_t5x_checkpoint(given, t5.tiny()),
                        random_model)


def test_saved_directory_loads_in_hf(model, inputs, tmp_path):
  # The export direction, checked by HF itself.
  t5_loader.save_hf_safetensors(model, tmp_path, num_shards=2)
  hf = transformers.MT5ForConditionalGeneration.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  ids, mask, dec_ids, dec_mask = inputs
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             decoder_input_ids=torch.tensor(dec_ids),
             decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
  assert _rel_err(_forward(model, ids, mask, dec_ids, dec_mask), ref) < 1e-4


def test_load_onto_a_mesh(model, inputs, tmp_path):
  from rite_optax.models import sharding
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  t5_loader.save_t5x_checkpoint(model, tmp_path / "t5x")
  placed = t5_loader.load_t5x_checkpoint(tmp_path / "t5x", t5.tiny(), mesh)
  q = placed.decoder.layers[1].cross_attn.q.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  ids, mask, dec_ids, dec_mask = inputs
  assert _rel_err(_forward(placed, ids, mask, dec_ids, dec_mask),
                  _forward(model, ids, mask, dec_ids, dec_mask)) < 1e-5


def test_t5x_and_hf_layouts_agree(random_model):
  hf = t5_loader.to_hf_state_dict(random_model)
  t5x = t5_loader._flatten(t5_loader.to_t5x_params(random_model))
  np.testing.assert_array_equal(
      t5x["encoder/layers_1/attention/query/kernel"],
      hf["encoder.block.1.layer.0.SelfAttention.q.weight"].T)
  np.testing.assert_array_equal(
      t5x["decoder/relpos_bias/rel_embedding"],
      hf["decoder.block.0.layer.0.SelfAttention.relative_attention_bias."
         "weight"].T)
  np.testing.assert_array_equal(t5x["decoder/logits_dense/kernel"],
                                hf["lm_head.weight"].T)


def test_saving_refuses_unmerged_adapters(random_model, tmp_path):
  adapted = nnx.clone(random_model)
  lora.inject_lora(adapted, 2, 2.0, t5.ATTN_TARGETS, nnx.Rngs(0))
  with pytest.raises(ValueError, match="merge_lora"):
    t5_loader.save_hf_safetensors(adapted, tmp_path / "x.safetensors")


HF_KEY = "decoder.block.1.layer.1.EncDecAttention.k.weight"
T5X_KEY = "decoder/layers_1/encoder_decoder_attention/key/kernel"


def _tamper(arrays, key, problem):
  arrays = dict(arrays)
  if problem == "missing":
    del arrays[key]
  elif problem == "extra":
    key = key.replace("k.weight", "k2.weight").replace("/key/", "/key2/")
    arrays[key] = np.zeros((3,), np.float32)
  elif problem == "misshapen":
    arrays[key] = arrays[key][:-1]
  else:  # an integer array where floats belong
    arrays[key] = arrays[key].astype(np.int32)
  return arrays, key


PROBLEMS = ["missing", "extra", "misshapen", "integer"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_hf_loader_names_bad_arrays(random_model, tmp_path, problem):
  from safetensors.numpy import save_file
  arrays = t5_loader.to_hf_state_dict(random_model)
  arrays, key = _tamper(arrays, HF_KEY, problem)
  path = tmp_path / "bad.safetensors"
  save_file(arrays, path)
  with pytest.raises(ValueError, match=problem.replace("integer", "dtype")
                     .replace("extra", "unexpected")) as error:
    t5_loader.load_hf_safetensors(path, t5.tiny())
  assert key in str(error.value) and str(path) in str(error.value)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    t5_loader.params_from_hf_t5(arrays, t5.tiny())


def test_hf_embedding_copies_must_equal_shared(random_model, tmp_path):
  from safetensors.numpy import save_file
  arrays = t5_loader.to_hf_state_dict(random_model)
  arrays["encoder.embed_tokens.weight"] = arrays["shared.weight"].copy()
  save_file(arrays, tmp_path / "copies.safetensors")
  _assert_same_params(
      t5_loader.load_hf_safetensors(tmp_path / "copies.safetensors",
                                    t5.tiny()), random_model)
  arrays["decoder.embed_tokens.weight"] = arrays["shared.weight"] + 1
  save_file(arrays, tmp_path / "differs.safetensors")
  with pytest.raises(ValueError, match="decoder.embed_tokens.weight differs"):
    t5_loader.load_hf_safetensors(tmp_path / "differs.safetensors", t5.tiny())


def test_hf_loader_names_the_shard(random_model, tmp_path):
  from safetensors import safe_open
  from safetensors.numpy import save_file
  t5_loader.save_hf_safetensors(random_model, tmp_path, num_shards=2)
  with open(tmp_path / t5_loader.HF_INDEX_FILE) as f:
    shard = json.load(f)["weight_map"][HF_KEY]
  with safe_open(tmp_path / shard, framework="numpy") as f:
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  save_file(_tamper(arrays, HF_KEY, "misshapen")[0], tmp_path / shard)
  with pytest.raises(ValueError, match=f"{HF_KEY}.*{shard}"):
    t5_loader.load_hf_safetensors(tmp_path, t5.tiny())
  # A key the index lists but the shard lacks.
  save_file(_tamper(arrays, HF_KEY, "missing")[0], tmp_path / shard)
  with pytest.raises(ValueError, match=f"{HF_KEY}.*{shard}"):
    t5_loader.load_hf_safetensors(tmp_path, t5.tiny())


@pytest.mark.parametrize("problem", PROBLEMS)
def test_t5x_loader_names_bad_arrays(random_model, tmp_path, problem):
  import orbax.checkpoint as ocp
  arrays = t5_loader._flatten(t5_loader.to_t5x_params(random_model))
  arrays, key = _tamper(arrays, T5X_KEY, problem)
  path = tmp_path / "bad_t5x"
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(os.path.abspath(path),
                    {"target": t5_loader._unflatten(arrays)})
  match = problem.replace("integer", "dtype").replace("extra", "unexpected")
  with pytest.raises(ValueError, match=match) as error:
    t5_loader.load_t5x_checkpoint(path, t5.tiny())
  assert f"target/{key}" in str(error.value)
  assert str(path) in str(error.value)
  with pytest.raises(ValueError, match=key):
    t5_loader.load_t5x_checkpoint(t5_loader._unflatten(arrays),
                                  t5.tiny())
