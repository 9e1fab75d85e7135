"""Evaluation: text metrics, multiple-choice scoring and greedy decoding.

The paper's fine-tuning results are reported with three kinds of metric:

* Super-NaturalInstructions (Wang et al., 2022): exact match and ROUGE-L of
  a generated answer against the reference, as in the benchmark's
  ``compute_metrics.py`` (:func:`exact_match`, :func:`rouge_l`,
  :func:`sni_metrics`).
* GSM8K (Cobbe et al., 2021): the final number of a generated solution
  against the gold one (:func:`rite_optax.data.tasks.final_number`,
  :func:`gsm8k_exact_match`, :func:`gsm8k_accuracy`).
* Multiple choice (HellaSwag, ARC, OpenBookQA, BoolQ): the choice with the
  highest log-likelihood as a continuation of the prompt, raw (``acc``) and
  divided by the choice's length in characters (``acc_norm``), as
  lm-evaluation-harness does (:func:`score_choices`,
  :func:`multiple_choice_accuracy`).

The text metrics are plain Python on strings. The model-based functions take
a Gemma-style decoder, an ``nnx.Module`` called as ``model(tokens (B, T),
positions (B, T), attention_mask (B, T)) -> logits (B, T, vocab)``, and a
:class:`rite_optax.data.tokenizers.Tokenizer` (``encode`` adds no special
token: BOS is prepended here, and generation stops at EOS). Batches have
static shapes (rows are padded to a fixed batch size and sequence length), so
each function compiles once per shape, with ``nnx.jit`` taking the module as
an argument.
"""

from __future__ import annotations

import decimal
import functools
import re
import string
from typing import (Any, Callable, Mapping, NamedTuple, Optional, Sequence,
                    Union)

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rite_optax.data import pipeline
from rite_optax.data.tasks import final_number
from rite_optax.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from rite_optax.models.gemma import default_positions
from rite_optax.train.step import gather_loss_positions

Reference = Union[str, Sequence[str]]


# ---------------------------------------------------------------------------
# Text metrics.


def _references(reference: Reference) -> list[str]:
  refs = [reference] if isinstance(reference, str) else list(reference)
  if not refs:
    raise ValueError("no reference to compare with")
  return refs


def normalize_answer(text: str, remove_articles: bool = False) -> str:
  """Lowercase, drop ASCII punctuation, collapse whitespace.

  This is Super-NaturalInstructions' ``normalize_answer``: the SQuAD v1.1
  normalisation *without* removing articles. ``remove_articles=True`` gives
  SQuAD's own (``a``, ``an``, ``the`` dropped as whole words).
  """
  text = text.lower()
  text = "".join(ch for ch in text if ch not in string.punctuation)
  if remove_articles:
    text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, reference: Reference, *,
                remove_articles: bool = False) -> bool:
  """Whether the normalised prediction equals a normalised reference.

  Several references (as Super-NaturalInstructions instances have) count as
  a match with any of them.
  """
  normalized = normalize_answer(prediction, remove_articles)
  return any(normalized == normalize_answer(ref, remove_articles)
             for ref in _references(reference))


_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str,
                 stemmer: Optional[Callable[[str], str]] = None) -> list[str]:
  """ROUGE's tokens: lowercase alphanumeric runs, as ``rouge_score`` makes.

  ``stemmer`` (e.g. ``nltk.stem.porter.PorterStemmer().stem``) is applied to
  tokens longer than 3 characters, as ``rouge_score`` does with
  ``use_stemmer=True``.
  """
  tokens = _NON_ALPHANUMERIC.sub(" ", text.lower()).split()
  if stemmer is not None:
    tokens = [stemmer(t) if len(t) > 3 else t for t in tokens]
  return [t for t in tokens if t]


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
  """Length of the longest common subsequence; O(len(a) len(b)) time."""
  if len(b) > len(a):
    a, b = b, a
  previous = [0] * (len(b) + 1)  # one row of the DP table: O(min) memory
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y
                     else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_l(prediction: str, reference: Reference, *,
            stemmer: Optional[Callable[[str], str]] = None) -> float:
  """ROUGE-L F-measure (Lin, 2004), the best over the references.

  ``P = LCS / len(prediction)``, ``R = LCS / len(reference)`` in ROUGE
  tokens (:func:`rouge_tokens`), ``F = 2 P R / (P + R)``, 0 if either side
  has no token. Equal to ``rouge_score.rouge_scorer.RougeScorer(['rougeL'])``;
  the Super-NaturalInstructions scorer also stems (``use_stemmer=True``): pass
  ``stemmer=PorterStemmer().stem`` from nltk to reproduce it exactly. A small
  LCS here rather than the ``rouge-score`` package keeps nltk and its
  dependencies out of the library for one dynamic program.
  """
  pred_tokens = rouge_tokens(prediction, stemmer)
  best = 0.0
  for ref in _references(reference):
    ref_tokens = rouge_tokens(ref, stemmer)
    if not pred_tokens or not ref_tokens:
      continue
    lcs = lcs_length(pred_tokens, ref_tokens)
    if lcs:
      precision, recall = lcs / len(pred_tokens), lcs / len(ref_tokens)
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


def gsm8k_exact_match(prediction: str, answer: str) -> bool:
  """Whether the final numbers of prediction and answer are equal as numbers.

  ``answer`` may be GSM8K's whole solution (``"... #### 72"``) or the bare
  number. Compared as decimals, so ``"1,000"`` equals ``"1000.0"`` exactly,
  without float rounding. A prediction without a number is wrong.
  """
  predicted, gold = final_number(prediction), final_number(answer)
  if gold is None:
    raise ValueError(f"GSM8K answer {answer!r} has no number")
  if predicted is None:
    return False
  return decimal.Decimal(predicted) == decimal.Decimal(gold)


# ---------------------------------------------------------------------------
# Model-based: multiple choice by log-likelihood.


def _round_up_length(n: int) -> int:
  # Powers of two: at most log2(T) shapes, hence compilations, per process.
  return max(16, 1 << (max(n, 1) - 1).bit_length())


def _context_and_continuation(tokenizer: Tokenizer, prompt: str,
                              choice: str) -> tuple[list[int], list[int]]:
  """``[BOS] + prompt`` and choice ids, split as lm-evaluation-harness does.

  Trailing whitespace of the prompt moves to the choice, and the choice's
  ids are those of ``encode(prompt + choice)`` past the prompt's, so a
  subword tokenizer sees the text it would see in training.
  """
  spaces = len(prompt) - len(prompt.rstrip())
  if spaces:
    prompt, choice = prompt[:-spaces], prompt[-spaces:] + choice
  context = list(tokenizer.encode(prompt))
  whole = list(tokenizer.encode(prompt + choice))
  continuation = whole[len(context):]
  if not continuation:
    raise ValueError(f"choice {choice!r} of prompt {prompt[-40:]!r} has no "
                     "token of its own")
  return [BOS_ID] + context, continuation


def _choice_rows(pairs: Sequence[tuple[list[int], list[int]]],
                 seq_len: int) -> dict[str, np.ndarray]:
  """Batch-format rows for (context, continuation) pairs, right-padded.

  Rows longer than ``seq_len`` lose their first tokens, as in
  lm-evaluation-harness; the continuation itself must fit.
  """
  n = len(pairs)
  batch = {"inputs": np.zeros((n, seq_len), np.int32),
           "targets": np.zeros((n, seq_len), np.int32),
           "loss_mask": np.zeros((n, seq_len), np.float32),
           "attention_mask": np.zeros((n, seq_len), bool)}
  for row, (context, continuation) in enumerate(pairs):
    if len(continuation) > seq_len:
      raise ValueError(f"a choice of {len(continuation)} tokens does not fit "
                       f"in max_length={seq_len}")
    tokens = context + continuation
    inputs, targets = tokens[:-1][-seq_len:], tokens[1:][-seq_len:]
    mask = ([0.0] * (len(context) - 1) + [1.0] * len(continuation))[-seq_len:]
    t = len(inputs)
    batch["inputs"][row, :t] = inputs
    batch["targets"][row, :t] = targets
    batch["loss_mask"][row, :t] = mask
    batch["attention_mask"][row, :t] = True
  return batch


def _pad_rows(batch: Mapping[str, np.ndarray],
              rows: int) -> dict[str, np.ndarray]:
  """Filler rows up to ``rows``: a lone BOS, attended, scored nowhere."""
  missing = rows - len(batch["inputs"])
  padded = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}
  padded["inputs"][rows - missing:, 0] = BOS_ID
  # One attended token so that no row has every key masked.
  padded["attention_mask"][rows - missing:, 0] = True
  return padded


def score_choices(model: Callable[..., jax.Array],
                  batch: Mapping[str, jax.Array],
                  max_scored_tokens: Optional[int] = None
                  ) -> dict[str, jax.Array]:
  """Log-likelihood of each row's target tokens where ``loss_mask`` is 1.

  Pure and jit-friendly: ``nnx.jit(score_choices)(model, batch)`` for an
  ``nnx.Module`` (as :func:`multiple_choice_accuracy` does).

  Args:
    model: ``model(tokens, positions, attention_mask) -> logits (B, T, V)``.
    batch: the decoder-only batch format, one row per (example, choice):
      ``inputs``, ``targets``, ``loss_mask``, ``attention_mask``.
    max_scored_tokens: at least the most masked tokens of a row, for a model
      with ``hidden_states`` / ``logits_from_hidden`` (Gemma): only those
      positions are unembedded (:func:`rite_optax.train.step.
      gather_loss_positions`), the same scores for a fraction of the cost
      with a large vocabulary. None: every position.

  Returns:
    ``log_likelihood`` (B,): summed over the masked tokens; ``num_tokens``
    (B,); ``mean_log_likelihood`` (B,): the sum over the token count (0 for
    a row with none). Cost: one forward pass over the batch.
  """
  tokens, mask = batch["inputs"], batch["attention_mask"]
  targets, loss_mask = batch["targets"], batch["loss_mask"]
  if max_scored_tokens is None:
    logits = model(tokens, default_positions(tokens, mask), mask)
  else:
    hidden = model.hidden_states(tokens, default_positions(tokens, mask), mask)
    take = lambda x: gather_loss_positions(x, loss_mask, max_scored_tokens)
    logits = model.logits_from_hidden(take(hidden))
    targets, loss_mask = take(targets), take(loss_mask)
  logits = logits.astype(jnp.float32)
  # Gather, then logsumexp: no second (B, T, V) array for a log_softmax.
  target_logits = jnp.take_along_axis(
      logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  token_ll = target_logits - jax.nn.logsumexp(logits, axis=-1)
  loss_mask = loss_mask.astype(jnp.float32)
  log_likelihood = jnp.sum(token_ll * loss_mask, axis=-1)
  num_tokens = jnp.sum(loss_mask, axis=-1)
  return {"log_likelihood": log_likelihood, "num_tokens": num_tokens,
          "mean_log_likelihood": log_likelihood / jnp.maximum(num_tokens, 1)}


_score_choices_jit = nnx.jit(score_choices,
                             static_argnames=("max_scored_tokens",))


def _log_likelihoods(model: nnx.Module, tokenizer: Tokenizer,
                     pairs: Sequence[tuple[str, str]], batch_size: int,
                     max_length: Optional[int]) -> np.ndarray:
  """Summed log-likelihood of each (prompt, choice), in fixed-shape batches.

  Rows are batched in order of length, each batch padded to the next power
  of two (at most ``max_length``, which also cuts longer rows as before):
  a few compiled shapes instead of one, and far less padding when most rows
  are short. A model with ``hidden_states`` is unembedded at the choice
  tokens only (``score_choices(max_scored_tokens=...)``, the longest choice
  rounded up).
  """
  encoded = [_context_and_continuation(tokenizer, p, c) for p, c in pairs]
  lengths = np.array([len(ctx) + len(cont) - 1 for ctx, cont in encoded])
  cap = max_length or _round_up_length(int(lengths.max()))
  scored = None
  if hasattr(model, "hidden_states"):
    scored = min(cap, _round_up_length(
        max(len(cont) for _, cont in encoded)))
  order = np.argsort(lengths, kind="stable")
  scores = np.empty(len(encoded))
  for start in range(0, len(encoded), batch_size):
    index = order[start:start + batch_size]
    seq_len = min(cap, _round_up_length(int(lengths[index].max())))
    rows = _choice_rows([encoded[i] for i in index], seq_len)
    out = _score_choices_jit(model, _pad_rows(rows, batch_size),
                             max_scored_tokens=scored)
    scores[index] = np.asarray(out["log_likelihood"])[:len(index)]
  return scores


class ChoiceScores(NamedTuple):
  """Scores of the choices of one prompt.

  Attributes:
    log_likelihood: ``(C,)`` summed log-probability of each choice's tokens.
    normalized: ``(C,)`` the same divided by the choice's length in
      characters (lm-evaluation-harness ``acc_norm``).
  """

  log_likelihood: np.ndarray
  normalized: np.ndarray


def choice_log_likelihoods(model: nnx.Module, tokenizer: Tokenizer,
                           prompt: str, choices: Sequence[str], *,
                           batch_size: Optional[int] = None,
                           max_length: Optional[int] = None) -> ChoiceScores:
  """Log-likelihood of each choice as the continuation of ``prompt``.

  Args:
    model: a decoder, ``model(tokens, positions, attention_mask) -> logits``.
    tokenizer: see :class:`Tokenizer`; BOS is prepended here.
    prompt: the context, ``[BOS] + encode(prompt)``.
    choices: continuations, each scored on its own tokens.
    batch_size: rows per forward pass; by default all choices at once.
    max_length: static sequence length; by default the longest row rounded
      up to a power of two. Longer rows lose their first prompt tokens.
  """
  scores = _log_likelihoods(model, tokenizer, [(prompt, c) for c in choices],
                            batch_size or len(choices), max_length)
  lengths = np.array([len(c) for c in choices], np.float64)
  return ChoiceScores(scores, scores / lengths)


def multiple_choice_accuracy(model: nnx.Module, tokenizer: Tokenizer,
                             examples: Sequence[Mapping[str, Any]],
                             batch_size: int = 8, *,
                             max_length: Optional[int] = None
                             ) -> dict[str, float]:
  """``acc`` and ``acc_norm`` as in lm-evaluation-harness.

  Each example is ``{"prompt": str, "choices": [str, ...], "answer": int}``.
  ``acc``: the choice with the highest summed log-likelihood is the answer;
  ``acc_norm``: the same after dividing by the choice's length in characters
  (which undoes the bias towards short choices). Ties go to the first choice.

  Every (example, choice) is one row of the decoder-only batch format; rows
  of all examples are packed into batches of ``batch_size``, the last one
  padded. Cost: ``sum(len(choices))`` rows of one forward pass each.
  """
  if not examples:
    raise ValueError("no examples to evaluate")
  pairs = [(ex["prompt"], c) for ex in examples for c in ex["choices"]]
  scores = _log_likelihoods(model, tokenizer, pairs, batch_size, max_length)
  return _choice_accuracy(examples, scores)


# ---------------------------------------------------------------------------
# Model-based: greedy decoding.


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "eos_id",
                                             "pad_id"))
def greedy_generate(model: nnx.Module, tokens: jax.Array,
                    attention_mask: jax.Array, max_new_tokens: int,
                    eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> jax.Array:
  """Greedy continuation of left-padded prompts, ``(B, max_new_tokens)``.

  Each step runs the model over the whole ``(B, P + max_new_tokens)`` buffer
  and takes the argmax at the last written position: no KV cache, so the
  cost is ``max_new_tokens`` full forward passes, ``O(T^2)`` attention each
  (``O(T^3)`` in all for ``T = P + max_new_tokens``). This is for evaluation
  at CPU scale and for checking models, not for serving. The loop is a
  ``lax.while_loop``: it stops when every row has emitted ``eos_id``.

  Args:
    model: ``model(tokens, positions, attention_mask) -> logits``.
    tokens: ``(B, P)`` int prompts, left-padded (the last column is each
      prompt's last token).
    attention_mask: ``(B, P)`` bool, True on prompt tokens; a row with none
      is a filler: it generates nothing.
    max_new_tokens: tokens to generate at most.

  Returns:
    ``(B, max_new_tokens)`` int32: the generated ids, the first ``eos_id``
    included, ``pad_id`` after it.
  """
  batch, prompt_len = tokens.shape
  buffer = jnp.pad(tokens.astype(jnp.int32), ((0, 0), (0, max_new_tokens)),
                   constant_values=pad_id)
  mask = jnp.pad(attention_mask.astype(bool), ((0, 0), (0, max_new_tokens)))
  done = ~jnp.any(attention_mask, axis=1)

  def unfinished(state):
    step, _, _, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def generate_one(state):
    step, buffer, mask, done = state
    # Positions and padding keys follow the mask, so a left-padded row sees
    # what it would see alone; the unwritten tail is never attended to.
    logits = model(buffer, default_positions(buffer, mask), mask)
    last = jax.lax.dynamic_index_in_dim(logits, prompt_len + step - 1, axis=1,
                                        keepdims=False)
    next_token = jnp.where(done, pad_id,
                           jnp.argmax(last, axis=-1).astype(jnp.int32))
    at = prompt_len + step
    buffer = jax.lax.dynamic_update_slice_in_dim(buffer, next_token[:, None],
                                                 at, axis=1)
    mask = jax.lax.dynamic_update_slice_in_dim(mask, ~done[:, None], at,
                                               axis=1)
    return step + 1, buffer, mask, done | (next_token == eos_id)

  _, buffer, _, _ = jax.lax.while_loop(
      unfinished, generate_one, (jnp.int32(0), buffer, mask, done))
  return buffer[:, prompt_len:]


def _left_padded_prompts(tokenizer: Tokenizer, prompts: Sequence[str],
                         prompt_len: Optional[int]
                         ) -> tuple[np.ndarray, np.ndarray]:
  """``[BOS] + encode(prompt)`` left-padded (and left-truncated) to a length."""
  encoded = [[BOS_ID] + list(tokenizer.encode(p)) for p in prompts]
  length = prompt_len or _round_up_length(max(len(e) for e in encoded))
  tokens = np.full((len(prompts), length), PAD_ID, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for row, ids in enumerate(encoded):
    ids = ids[-length:]  # the end of the prompt is what the answer follows
    tokens[row, length - len(ids):] = ids
    mask[row, length - len(ids):] = True
  return tokens, mask


def greedy_decode(model: nnx.Module, tokenizer: Tokenizer,
                  prompts: Sequence[str], max_new_tokens: int, *,
                  batch_size: int = 8,
                  max_prompt_len: Optional[int] = None) -> list[str]:
  """Greedy continuations of ``prompts``, decoded up to (without) EOS.

  Prompts are ``[BOS] + encode(prompt)``, left-padded to ``max_prompt_len``
  (by default the longest rounded up to a power of two; longer prompts lose
  their beginning) and decoded ``batch_size`` at a time, the last batch
  filled with empty rows, by :func:`greedy_generate` (no KV cache; see its
  cost).
  """
  if not prompts:
    return []
  tokens, mask = _left_padded_prompts(tokenizer, prompts, max_prompt_len)
  texts = []
  for start in range(0, len(prompts), batch_size):
    rows = slice(start, start + batch_size)
    n = len(tokens[rows])
    filler = ((0, batch_size - n), (0, 0))
    generated = np.asarray(greedy_generate(
        model, np.pad(tokens[rows], filler), np.pad(mask[rows], filler),
        max_new_tokens))
    for ids in generated[:n].tolist():
      if EOS_ID in ids:
        ids = ids[:ids.index(EOS_ID)]
      texts.append(tokenizer.decode(ids))
  return texts


def gsm8k_accuracy(model: nnx.Module, tokenizer: Tokenizer,
                   examples: Sequence[Mapping[str, Any]],
                   max_new_tokens: int = 256, *, batch_size: int = 8,
                   max_prompt_len: Optional[int] = None) -> dict[str, float]:
  """Fraction of GSM8K examples whose greedy answer has the gold number.

  Each example is ``{"prompt": str, "answer": str}`` (the gold number or the
  whole ``"... #### N"`` solution); see :func:`gsm8k_exact_match`.
  """
  if not examples:
    raise ValueError("no examples to evaluate")
  predictions = greedy_decode(
      model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens,
      batch_size=batch_size, max_prompt_len=max_prompt_len)
  correct = sum(gsm8k_exact_match(p, ex["answer"])
                for p, ex in zip(predictions, examples))
  return {"accuracy": correct / len(examples)}


def sni_metrics(model: nnx.Module, tokenizer: Tokenizer,
                examples: Sequence[Mapping[str, Any]],
                max_new_tokens: int = 128, *, batch_size: int = 8,
                max_prompt_len: Optional[int] = None,
                stemmer: Optional[Callable[[str], str]] = None
                ) -> dict[str, float]:
  """Mean exact match and ROUGE-L of greedy answers, in [0, 1].

  Each example is ``{"prompt": str, "answer": str or [str, ...]}``; with
  several references an answer scores its best match, as in
  Super-NaturalInstructions. ``stemmer``: see :func:`rouge_l`.
  """
  if not examples:
    raise ValueError("no examples to evaluate")
  predictions = greedy_decode(
      model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens,
      batch_size=batch_size, max_prompt_len=max_prompt_len)
  em = sum(exact_match(p, ex["answer"]) for p, ex in zip(predictions, examples))
  rouge = sum(rouge_l(p, ex["answer"], stemmer=stemmer)
              for p, ex in zip(predictions, examples))
  return {"exact_match": em / len(examples),
          "rouge_l": rouge / len(examples)}


# ---------------------------------------------------------------------------
# Encoder-decoder (mT5): the same metrics, the prompt as the encoder input
# and a choice or the generation as the decoder's.


@nnx.jit
def _seq2seq_log_likelihood(model, batch):
  logits = model(batch["inputs"], batch["decoder_inputs"],
                 batch["encoder_mask"], batch["decoder_mask"])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  token_ll = jnp.take_along_axis(log_probs, batch["targets"][..., None],
                                 axis=-1)[..., 0]
  return jnp.sum(token_ll * batch["loss_mask"], axis=-1)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "eos_id"))
def seq2seq_generate(model, inputs, encoder_mask, max_new_tokens: int,
                     eos_id: int):
  """Greedy decoding without a KV cache: ``(B, max_new_tokens)`` ids."""
  encoded = model.encode(inputs, encoder_mask)
  batch = inputs.shape[0]
  # Column 0 is T5's start token (the pad id 0); column i + 1 is generated
  # at step i. The causal mask keeps the unwritten tail out of position i.
  buffer = jnp.zeros((batch, max_new_tokens + 1), jnp.int32)
  done = ~jnp.any(encoder_mask, axis=1)

  def unfinished(state):
    step, _, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def generate_one(state):
    step, buffer, done = state
    logits = model.decode(buffer[:, :-1], encoded, encoder_mask)
    last = jax.lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False)
    token = jnp.where(done, 0, jnp.argmax(last, axis=-1).astype(jnp.int32))
    buffer = jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None],
                                                 step + 1, axis=1)
    return step + 1, buffer, done | (token == eos_id)

  _, buffer, _ = jax.lax.while_loop(unfinished, generate_one,
                                    (jnp.int32(0), buffer, done))
  return buffer[:, 1:]


def fetch(x) -> np.ndarray:
  """A jit output on the host, also when it spans the hosts of a slice."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=all
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _seq2seq_rows(tokenizer: Tokenizer, pairs, batch_size: int, max_len: int,
                  max_target_len: int):
  """Fixed-size seq2seq batches of (prompt, target) pairs, in order."""
  buckets = pipeline.bucket_lengths(max_len)
  target_buckets = pipeline.bucket_lengths(max_target_len)
  for start in range(0, len(pairs), batch_size):
    rows = [pipeline.encode_seq2seq(tokenizer, p, t, max_len, max_target_len)
            for p, t in pairs[start:start + batch_size]]
    yield len(rows), pipeline.pad_seq2seq(
        rows,
        pipeline.bucket_for(max(len(r["inputs"]) for r in rows), buckets),
        pipeline.bucket_for(max(len(r["targets"]) for r in rows),
                            target_buckets),
        batch_size, tokenizer.eos_id)


def _choice_accuracy(examples, scores: np.ndarray) -> dict[str, float]:
  """``acc`` / ``acc_norm`` from the log-likelihood of every choice, in the
  order of ``examples`` and their choices."""
  correct = correct_norm = offset = 0
  for ex in examples:
    choices = ex["choices"]
    ll = scores[offset:offset + len(choices)]
    offset += len(choices)
    lengths = np.array([len(c) for c in choices], np.float64)
    correct += int(np.argmax(ll)) == int(ex["answer"])
    correct_norm += int(np.argmax(ll / lengths)) == int(ex["answer"])
  return {"acc": correct / len(examples),
          "acc_norm": correct_norm / len(examples)}


def seq2seq_choice_accuracy(model: nnx.Module, tokenizer: Tokenizer,
                            examples: Sequence[Mapping[str, Any]], *,
                            batch_size: int, max_len: int,
                            max_target_len: int) -> dict[str, float]:
  """:func:`multiple_choice_accuracy` of an encoder-decoder."""
  pairs = [(ex["prompt"], c) for ex in examples for c in ex["choices"]]
  scores = np.concatenate([
      fetch(_seq2seq_log_likelihood(model, batch))[:n]
      for n, batch in _seq2seq_rows(tokenizer, pairs, batch_size, max_len,
                                    max_target_len)])
  return _choice_accuracy(examples, scores)


def seq2seq_decode(model: nnx.Module, tokenizer: Tokenizer,
                   prompts: Sequence[str], max_new_tokens: int, *,
                   batch_size: int, max_len: int) -> list[str]:
  """:func:`greedy_decode` of an encoder-decoder."""
  predictions = []
  for n, batch in _seq2seq_rows(tokenizer, [(p, "") for p in prompts],
                                batch_size, max_len, max_len):
    ids = fetch(seq2seq_generate(
        model, batch["inputs"], batch["encoder_mask"],
        max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id))
    for row in ids[:n].tolist():
      if tokenizer.eos_id in row:
        row = row[:row.index(tokenizer.eos_id)]
      predictions.append(tokenizer.decode(row))
  return predictions


# ---------------------------------------------------------------------------
# One dispatch: the metric of each task kind.

# Tasks scored by answer likelihood, and by the final number of a greedy
# generation.
MULTIPLE_CHOICE_TASKS = frozenset(
    {"arc_challenge", "arc_easy", "openbookqa", "boolq", "hellaswag"})
MATH_TASKS = frozenset({"gsm8k", "mawps"})
GENERATION_TASKS = frozenset({"natural_instructions"})


def task_metrics(model: nnx.Module, tokenizer: Tokenizer, task: str,
                 examples: Sequence[Mapping[str, Any]], *,
                 seq2seq: bool = False, batch_size: int = 8,
                 max_len: Optional[int] = None,
                 max_target_len: Optional[int] = None,
                 max_new_tokens: int = 128, generate_batch_size: int = 8,
                 max_prompt_len: Optional[int] = None) -> dict[str, float]:
  """The metric of ``task`` on ``examples``, for either kind of model.

  Multiple choice: ``acc`` and ``acc_norm`` (:func:`multiple_choice_accuracy`);
  GSM8K and MAWPS: ``accuracy`` of the greedy final number
  (:func:`gsm8k_accuracy`); Super-NaturalInstructions: ``exact_match`` and
  ``rouge_l`` (:func:`sni_metrics`); any other task: ``{}``.

  Args:
    model: a Gemma-style decoder, or with ``seq2seq=True`` an mT5.
    task: a canonical task name (``rite_optax.data.tasks.canonical_task``).
    batch_size: rows per likelihood batch (and per seq2seq generation).
    max_len: the likelihood batches' static length (the seq2seq encoder's).
    max_target_len: the seq2seq decoder's length; default ``max_len``.
    max_new_tokens: generated tokens per answer.
    generate_batch_size, max_prompt_len: decoder-only generation batches.
  """
  if not examples:
    raise ValueError(f"no {task} examples to evaluate")
  if seq2seq:
    if max_len is None:
      raise ValueError("task_metrics: seq2seq needs max_len")
    if task in MULTIPLE_CHOICE_TASKS:
      return seq2seq_choice_accuracy(
          model, tokenizer, examples, batch_size=batch_size, max_len=max_len,
          max_target_len=max_target_len or max_len)
    if task not in MATH_TASKS | GENERATION_TASKS:
      return {}
    predictions = seq2seq_decode(
        model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens,
        batch_size=batch_size, max_len=max_len)
    pairs = list(zip(predictions, examples))
    if task in MATH_TASKS:
      return {"accuracy": sum(gsm8k_exact_match(p, ex["answer"])
                              for p, ex in pairs) / len(pairs)}
    return {"exact_match": sum(exact_match(p, ex["answer"])
                               for p, ex in pairs) / len(pairs),
            "rouge_l": sum(rouge_l(p, ex["answer"])
                           for p, ex in pairs) / len(pairs)}
  if task in MULTIPLE_CHOICE_TASKS:
    return multiple_choice_accuracy(model, tokenizer, examples, batch_size,
                                    max_length=max_len)
  if task in MATH_TASKS:
    return gsm8k_accuracy(model, tokenizer, examples, max_new_tokens,
                          batch_size=generate_batch_size,
                          max_prompt_len=max_prompt_len)
  if task in GENERATION_TASKS:
    return sni_metrics(model, tokenizer, examples, max_new_tokens,
                       batch_size=generate_batch_size,
                       max_prompt_len=max_prompt_len)
  return {}
