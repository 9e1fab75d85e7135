"""Data: tokenizers, task records -> raw examples, batches.

* :mod:`~rite_optax.data.tokenizers`: SentencePiece and the byte fallback.
* :mod:`~rite_optax.data.tasks`: TFDS and local LLM-Adapters records -> raw
  examples ``{"prompt", "target"[, "choices", "answer"]}``.
* :mod:`~rite_optax.data.pipeline`: raw examples -> bucketed, resumable
  batches in the decoder-only (Gemma) or seq2seq (mT5) format.
"""

from rite_optax.data.pipeline import Batches
from rite_optax.data.pipeline import RawExamples
from rite_optax.data.pipeline import bucket_lengths
from rite_optax.data.pipeline import encode_decoder_only
from rite_optax.data.pipeline import encode_seq2seq
from rite_optax.data.pipeline import padding_efficiency
from rite_optax.data.pipeline import padding_stats
from rite_optax.data.pipeline import tfds_task
from rite_optax.data.tasks import final_number
from rite_optax.data.tasks import load_local_task
from rite_optax.data.tasks import normalize_number
from rite_optax.data.tokenizers import ByteTokenizer
from rite_optax.data.tokenizers import SentencePieceTokenizer
from rite_optax.data.tokenizers import Tokenizer
from rite_optax.data.tokenizers import load_tokenizer
