"""Tokenizers: SentencePiece (the models' own) and a byte-level fallback.

Every tokenizer here shares Gemma's special ids: pad 0, EOS 1, BOS 2, which is
what the batch format of :mod:`rite_optax.data.pipeline` assumes (padding is
id 0 and is never attended to). ``encode`` adds no special tokens: the pipeline
places BOS and EOS itself, so that prompt and target can be tokenized apart and
joined.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline needs of a tokenizer.

  Attributes:
    vocab_size: number of ids; every id ``encode`` returns is below it.
    pad_id: padding id, 0.
    eos_id: end-of-sequence id, 1.
    bos_id: beginning-of-sequence id, 2; None for a vocabulary without one
      (mT5's, whose id 2 is UNK), which only the seq2seq format accepts.
  """

  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: Optional[int]

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without BOS or EOS."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids``; special ids decode to nothing."""


class ByteTokenizer:
  """UTF-8 bytes as tokens: byte ``b`` is id ``b + 3``, ids 0/1/2 special.

  The fallback for tiny runs and tests: no model file, lossless on any text.
  ``vocab_size`` is 259 rounded up to a multiple of 8 (264) so that the
  embedding and output head shard evenly; ids 259..263 are never produced.
  """

  pad_id = PAD_ID
  eos_id = EOS_ID
  bos_id = BOS_ID
  byte_offset = 3

  def __init__(self) -> None:
    self.vocab_size = -(-(256 + self.byte_offset) // 8) * 8

  def encode(self, text: str) -> list[int]:
    return [b + self.byte_offset for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self.byte_offset for i in ids
                 if self.byte_offset <= int(i) < 256 + self.byte_offset)
    # A cut-off generation can end inside a multi-byte character.
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return f"ByteTokenizer(vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
  """A SentencePiece model file, e.g. Gemma's ``tokenizer.model``.

  The special ids are read from the model and checked against the pipeline's
  convention (pad 0, EOS 1); a model without BOS (mT5) gets ``bos_id=None``.

  Args:
    model_path: path of the ``.model`` file.
  """

  def __init__(self, model_path: Union[str, os.PathLike]) -> None:
    import sentencepiece  # pylint: disable=import-outside-toplevel

    self.model_path = os.fspath(model_path)
    self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id())
    self.eos_id = int(self._sp.eos_id())
    bos = int(self._sp.bos_id())
    self.bos_id = bos if bos >= 0 else None
    if (self.pad_id, self.eos_id) != (PAD_ID, EOS_ID):
      raise ValueError(
          f"{self.model_path}: pad/eos ids are {self.pad_id}/{self.eos_id}, "
          f"the batch format needs {PAD_ID}/{EOS_ID}")
    if self.bos_id not in (None, BOS_ID):
      raise ValueError(f"{self.model_path}: bos id is {self.bos_id}, the "
                       f"batch format needs {BOS_ID}")

  @classmethod
  def from_gguf(cls, path: Union[str, os.PathLike]) -> "SentencePieceTokenizer":
    """The SentencePiece model of a llama.cpp GGUF file's vocabulary.

    Rebuilt from ``tokenizer.ggml.tokens``, ``scores`` and ``token_type``
    (:func:`gguf_model_proto`) and serialized into the file's cache entry
    (:func:`rite_optax.models.gguf_loader.read_gguf`), so that a second call
    only loads the ``.model`` file. Gemma 3 270M on 2 CPU cores: 0.6 s the
    first time once the weights' entry exists (about 40 s to write that
    entry if not), 0.1 s after.

    As every tokenizer here, :meth:`encode` adds no BOS; the model expects
    the BOS (id 2) that the pipeline places first (the file's
    ``add_bos_token``).
    """
    # pylint: disable-next=import-outside-toplevel
    from rite_optax.models import gguf_loader

    contents = gguf_loader.read_gguf(path)
    model_file = contents.cache_dir / "tokenizer.model"
    if not model_file.exists():
      proto = gguf_model_proto(*contents.vocab(), contents.metadata,
                               source=contents.path)
      fd, tmp = tempfile.mkstemp(dir=contents.cache_dir, suffix=".partial")
      with os.fdopen(fd, "wb") as f:
        f.write(proto.SerializeToString())
      os.replace(tmp, model_file)  # atomic: concurrent readers see all or none
    return cls(model_file)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __repr__(self) -> str:
    return (f"SentencePieceTokenizer({self.model_path!r}, "
            f"vocab_size={self.vocab_size})")


# llama.cpp's token types, which are SentencePiece's piece types (1 normal,
# 5 unused and 6 byte are kept as they are).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def gguf_model_proto(tokens: Sequence[str], scores: Sequence[float],
                     token_types: Sequence[int], metadata: dict[str, Any],
                     source: str = "GGUF vocabulary") -> Any:
  """A SentencePiece ``ModelProto`` from a GGUF ``llama`` (SentencePiece)
  vocabulary: the pieces, scores and types of the file, as Gemma's
  ``tokenizer.model`` has them.

  BPE with byte fallback, the identity normaliser with spaces escaped to
  ``U+2581`` and no dummy prefix (``tokenizer.ggml.add_space_prefix``
  false), the special ids of the file. Two things llama.cpp changed are
  undone: user-defined pieces have their ``U+2581`` written back (llama.cpp
  "pre-normalizes" them to spaces, so Gemma's whitespace runs ``"  "``...
  are ``"▁▁"``... again), and the unknown piece, which the file marks as
  control, is ``UNKNOWN`` again (SentencePiece needs exactly one).

  Raises:
    ValueError: naming ``source``, for another tokenizer model or mismatched
      lengths.
  """
  # pylint: disable-next=import-outside-toplevel
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2

  kind = metadata.get("tokenizer.ggml.model")
  if kind != "llama":
    raise ValueError(f"{source}: tokenizer.ggml.model is {kind!r}; only "
                     f"SentencePiece vocabularies ('llama') are rebuilt")
  if not len(tokens) == len(scores) == len(token_types):
    raise ValueError(f"{source}: {len(tokens)} tokens, {len(scores)} scores "
                     f"and {len(token_types)} token types")
  special = {name: int(metadata[f"tokenizer.ggml.{name}_token_id"])
             for name in ("unknown", "bos", "eos", "padding")
             if f"tokenizer.ggml.{name}_token_id" in metadata}
  if "unknown" not in special:
    raise ValueError(f"{source}: no tokenizer.ggml.unknown_token_id")
  proto = sp_pb2.ModelProto()
  for i, (piece, score, kind) in enumerate(zip(tokens, scores, token_types)):
    kind = int(kind)
    if kind == _USER_DEFINED:
      piece = piece.replace(" ", "\u2581")
    if i == special["unknown"]:
      kind = _UNKNOWN
    elif kind == _UNKNOWN:
      kind = _CONTROL
    proto.pieces.add(piece=piece, score=float(score), type=kind)
  trainer = proto.trainer_spec
  trainer.model_type = sp_pb2.TrainerSpec.BPE
  trainer.vocab_size = len(tokens)
  trainer.byte_fallback = True
  trainer.unk_id = special["unknown"]
  trainer.bos_id = special.get("bos", -1)
  trainer.eos_id = special.get("eos", -1)
  trainer.pad_id = special.get("padding", -1)
  for name, field in (("unknown", "unk_piece"), ("bos", "bos_piece"),
                      ("eos", "eos_piece"), ("padding", "pad_piece")):
    if name in special:
      setattr(trainer, field, tokens[special[name]])
  normalizer = proto.normalizer_spec
  normalizer.name = "identity"
  normalizer.add_dummy_prefix = bool(
      metadata.get("tokenizer.ggml.add_space_prefix", False))
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  return proto


def load_tokenizer(
    path: Union[str, os.PathLike, None] = None) -> Tokenizer:
  """The tokenizer at ``path``: a ``.model`` file or a folder holding
  ``tokenizer.model``; None or ``"byte"`` gives :class:`ByteTokenizer`."""
  if path is None or os.fspath(path) == "byte":
    return ByteTokenizer()
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.model")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no SentencePiece model at {path}")
  return SentencePieceTokenizer(path)
