"""Evaluation: text metrics by hand, model scoring against known models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rite_optax.data.tasks import final_number
from rite_optax.data.tokenizers import ByteTokenizer
from rite_optax.models import gemma
from rite_optax.train import eval as ev


TOKENIZER = ByteTokenizer()
VOCAB = TOKENIZER.vocab_size
PEAK = 10.0


def byte_id(char):
  return TOKENIZER.encode(char)[0]


class CountingModel(nnx.Module):
  """Logit PEAK on ``token + 1`` (EOS after ``stop``), 0 on every other id."""

  def __init__(self, stop="e"):
    self.stop = byte_id(stop)

  def __call__(self, tokens, positions, attention_mask):
    next_token = jnp.where(tokens == self.stop, ev.EOS_ID, (tokens + 1) % VOCAB)
    return PEAK * jax.nn.one_hot(next_token, VOCAB)


class PositionModel(nnx.Module):
  """Logit PEAK on id ``3 + position``: shows which positions it was given."""

  def __call__(self, tokens, positions, attention_mask):
    return PEAK * jax.nn.one_hot(3 + positions, VOCAB)


# Log-probabilities of the stand-ins: the peaked id, and any other.
HIT = PEAK - math.log(math.exp(PEAK) + VOCAB - 1)
MISS = -math.log(math.exp(PEAK) + VOCAB - 1)


# --- text metrics -----------------------------------------------------------


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The Cat!", "the cat", True),
    ("  Hello,   World. ", "hello world", True),
    ("don't", "dont", True),
    ("a cat", "cat", False),  # SNI keeps articles
    ("cat", "dog", False),
    ("dog", ["cat", "Dog."], True),  # any of several references
])
def test_exact_match(prediction, reference, expected):
  assert ev.exact_match(prediction, reference) is expected


def test_exact_match_squad_articles():
  assert ev.exact_match("a cat", "the cat", remove_articles=True)
  assert ev.normalize_answer("An Apple, the  pie", remove_articles=True) == (
      "apple pie")


def test_lcs_length():
  assert ev.lcs_length("ABCBDAB", "BDCABA") == 4
  assert ev.lcs_length("abc", "") == 0
  assert ev.lcs_length("abc", "abc") == 3


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat", "the cat sat", 1.0),
    ("a b c d", "a c d e", 0.75),  # LCS a c d: P = R = 3/4
    ("the cat sat on the mat", "the cat on mat", 0.8),  # LCS 4: P 4/6, R 1
    ("Cat!", "cat", 1.0),  # lowercased, punctuation split off
    ("it's", "it s", 1.0),
    ("dog", "cat", 0.0),
    ("", "cat", 0.0),
    ("...", "cat", 0.0),  # no token at all
    ("x y", ["z", "x q"], 0.5),  # best reference: LCS 1, P 1/2, R 1/2
])
def test_rouge_l(prediction, reference, expected):
  assert ev.rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_l_stemmer_only_on_long_tokens():
  strip_s = lambda word: word.rstrip("s")
  assert ev.rouge_l("cats", "cat", stemmer=strip_s) == 1.0
  assert ev.rouge_l("its", "it", stemmer=strip_s) == 0.0  # 3 chars: kept
  assert ev.rouge_l("cats", "cat") == 0.0


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", "42"),
    ("#### 1,000", "1000"),
    ("3 apples and 5 pears. #### 8", "8"),
    ("#### 8\nbut then 9", "8"),  # the marked answer wins
    ("first #### 4 then #### 5", "5"),
    ("it is -7 degrees", "-7"),
    ("it costs $3.50.", "3.5"),
    ("x = -0.5", "-0.5"),
    ("from 10-20", "20"),  # a dash after a digit is no minus sign
    ("1,234,567 people", "1234567"),
    ("no number here", None),
    ("#### unknown", None),
])
def test_final_number(text, expected):
  # The one implementation, in the data layer, that evaluation uses.
  assert final_number(text) == expected


@pytest.mark.parametrize("prediction, answer, expected", [
    ("1,000", "1000.0", True),
    ("So she sold 72 clips.", "48 + 24 = 72 clips\n#### 72", True),
    ("-3", "-3.00", True),
    ("71", "72", False),
    ("I do not know", "3", False),
])
def test_gsm8k_exact_match(prediction, answer, expected):
  assert ev.gsm8k_exact_match(prediction, answer) is expected


def test_gsm8k_answer_without_number_raises():
  with pytest.raises(ValueError, match="no number"):
    ev.gsm8k_exact_match("3", "none")


# --- multiple choice with a known model ---------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_score_choices_by_hand(jit):
  a, b, c = byte_id("a"), byte_id("b"), byte_id("c")
  batch = {  # row 0: "ab" | "c"; row 1: "a" | "c": one miss
      "inputs": np.array([[2, a, b, 0], [2, a, 0, 0]], np.int32),
      "targets": np.array([[a, b, c, 0], [a, c, 0, 0]], np.int32),
      "loss_mask": np.array([[0, 1, 1, 0], [0, 1, 0, 0]], np.float32),
      "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool),
  }
  score = nnx.jit(ev.score_choices) if jit else ev.score_choices
  out = score(CountingModel(), batch)
  np.testing.assert_allclose(out["log_likelihood"], [2 * HIT, MISS],
                             rtol=1e-5)
  np.testing.assert_allclose(out["num_tokens"], [2, 1])
  np.testing.assert_allclose(out["mean_log_likelihood"], [HIT, MISS],
                             rtol=1e-5)


def test_choice_log_likelihoods_by_hand():
  # After "a": "bcd" follow the count (3 hits), "y" after "d" does not.
  scores = ev.choice_log_likelihoods(CountingModel(), TOKENIZER, "a",
                                     ["bcdy", "x", "bc"])
  np.testing.assert_allclose(scores.log_likelihood,
                             [3 * HIT + MISS, MISS, 2 * HIT], rtol=1e-5)
  np.testing.assert_allclose(scores.normalized,
                             [(3 * HIT + MISS) / 4, MISS, HIT], rtol=1e-5)


def test_prompt_trailing_space_moves_to_the_choice():
  # lm-evaluation-harness: "a " + "b" is scored as "a" + " b", two misses.
  scores = ev.choice_log_likelihoods(CountingModel(), TOKENIZER, "a ", ["b"])
  np.testing.assert_allclose(scores.log_likelihood, [2 * MISS], rtol=1e-5)


def test_truncated_prompt_and_too_long_choice():
  scores = ev.choice_log_likelihoods(CountingModel(), TOKENIZER, "xyzab",
                                     ["cd"], max_length=3)
  np.testing.assert_allclose(scores.log_likelihood, [2 * HIT], rtol=1e-5)
  with pytest.raises(ValueError, match="does not fit"):
    ev.choice_log_likelihoods(CountingModel(), TOKENIZER, "a", ["bcdef"],
                              max_length=4)


def test_multiple_choice_accuracy_acc_and_acc_norm():
  examples = [
      # acc picks "x" (MISS > 3 HIT + MISS); acc_norm picks "bcdy".
      {"prompt": "a", "choices": ["bcdy", "x"], "answer": 0},
      # Both pick "nop" (3 HIT > MISS).
      {"prompt": "m", "choices": ["q", "nop"], "answer": 1},
      {"prompt": "m", "choices": ["nop", "q"], "answer": 1},
  ]
  # 6 rows in batches of 4: the second batch has two filler rows.
  result = ev.multiple_choice_accuracy(CountingModel(), TOKENIZER, examples,
                                       batch_size=4)
  assert result["acc"] == pytest.approx(1 / 3)
  assert result["acc_norm"] == pytest.approx(2 / 3)


# --- greedy decoding with a known model ---------------------------------------


def test_greedy_generate_stops_at_eos_per_row():
  eos, pad = ev.EOS_ID, ev.PAD_ID
  # Left-padded prompts "a", "c", "p"; the last row is a filler.
  tokens = np.array([[0, 2, byte_id("a")], [0, 2, byte_id("c")],
                     [0, 2, byte_id("p")], [0, 0, 0]], np.int32)
  mask = tokens != 0
  out = np.asarray(ev.greedy_generate(CountingModel(), tokens, mask, 6))
  expected = [TOKENIZER.encode("bcde") + [eos, pad],
              TOKENIZER.encode("de") + [eos, pad, pad, pad],
              TOKENIZER.encode("qrstuv"),
              [pad] * 6]
  np.testing.assert_array_equal(out, expected)


def test_greedy_generate_positions_follow_the_mask():
  # Whatever the padding, the prompt's positions are 0, 1, 2 and each new
  # token is at the next position.
  for pad in (0, 3):
    tokens = np.array([[0] * pad + [2, 50, 60]], np.int32)
    out = ev.greedy_generate(PositionModel(), tokens, tokens != 0, 4)
    np.testing.assert_array_equal(out, [[3 + 2, 3 + 3, 3 + 4, 3 + 5]])


def test_greedy_decode_text():
  prompts = ["a", "c", "p", "b", "xyzab"]
  texts = ev.greedy_decode(CountingModel(), TOKENIZER, prompts, 4,
                           batch_size=2)
  assert texts == ["bcde", "de", "qrst", "cde", "cde"]


def test_gsm8k_accuracy_and_sni_metrics():
  model = CountingModel()
  gsm8k = [{"prompt": "Q: 4", "answer": "4 + 563 = 567\n#### 567"},
           {"prompt": "Q: 4", "answer": "#### 566"}]
  assert ev.gsm8k_accuracy(model, TOKENIZER, gsm8k, 3) == {"accuracy": 0.5}
  sni = [{"prompt": "a", "answer": "BCDE."},  # EM 1, ROUGE-L 1
         {"prompt": "p", "answer": "qrst uvw"}]  # EM 0, ROUGE-L 2/3
  result = ev.sni_metrics(model, TOKENIZER, sni, 4)
  assert result["exact_match"] == pytest.approx(0.5)
  assert result["rouge_l"] == pytest.approx((1 + 2 / 3) / 2)


# --- the real tiny Gemma ------------------------------------------------------


REFERENCE_LEN = 40


@nnx.jit
def unpadded_logits(model, tokens):
  """Logits of one row, no mask: the zeros after it are invisible to a
  causal model, and one fixed length compiles once."""
  filled = jnp.zeros((1, REFERENCE_LEN), jnp.int32)
  filled = filled.at[0, :tokens.shape[0]].set(tokens)
  return model(filled)[0].astype(jnp.float32)


def row_logits(model, tokens):
  assert len(tokens) <= REFERENCE_LEN
  padded = np.zeros(REFERENCE_LEN, np.int32)
  padded[:len(tokens)] = tokens
  return np.asarray(unpadded_logits(model, padded))[:len(tokens)]


def reference_log_likelihood(model, prompt, choice):
  """One row scored the obvious way."""
  context = [ev.BOS_ID] + TOKENIZER.encode(prompt)
  tokens = context + TOKENIZER.encode(choice)
  log_probs = jax.nn.log_softmax(row_logits(model, tokens))
  return sum(float(log_probs[t - 1, tokens[t]])
             for t in range(len(context), len(tokens)))


def reference_greedy(model, prompt, max_new_tokens):
  """Greedy decoding one prompt at a time, no padding, until EOS."""
  tokens = [ev.BOS_ID] + TOKENIZER.encode(prompt)
  new = []
  for _ in range(max_new_tokens):
    next_token = int(np.argmax(row_logits(model, tokens)[-1]))
    new.append(next_token)
    tokens.append(next_token)
    if next_token == ev.EOS_ID:
      break
  return new


def test_tiny_gemma_end_to_end():
  model = gemma.Gemma(gemma.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(0))
  examples = [
      {"prompt": "The sky is", "choices": [" blue", " green", " loud"],
       "answer": 0},
      {"prompt": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0},
      {"prompt": "Fire is", "choices": [" hot", " cold"], "answer": 1},
  ]
  result = ev.multiple_choice_accuracy(model, TOKENIZER, examples,
                                       batch_size=4)
  assert set(result) == {"acc", "acc_norm"}
  for value in result.values():
    assert 0 <= value <= 1 and (3 * value) == pytest.approx(round(3 * value))

  # Padded, batched scoring equals scoring each row alone.
  scores = ev.choice_log_likelihoods(model, TOKENIZER, examples[0]["prompt"],
                                     examples[0]["choices"], batch_size=2)
  expected = [reference_log_likelihood(model, examples[0]["prompt"], c)
              for c in examples[0]["choices"]]
  np.testing.assert_allclose(scores.log_likelihood, expected, rtol=1e-4)
  assert np.all(scores.log_likelihood < 0)

  # Left-padded, batched decoding equals decoding each prompt alone.
  prompts = ["Hello", "A longer prompt, padded less", "x"]
  max_new_tokens = 5
  tokens, mask = ev._left_padded_prompts(TOKENIZER, prompts, None)
  generated = np.asarray(ev.greedy_generate(model, tokens, mask,
                                            max_new_tokens))
  assert generated.shape == (3, max_new_tokens)
  assert generated.min() >= 0 and generated.max() < VOCAB
  for row, prompt in enumerate(prompts):
    expected_ids = reference_greedy(model, prompt, max_new_tokens)
    np.testing.assert_array_equal(generated[row, :len(expected_ids)],
                                  expected_ids)
  texts = ev.greedy_decode(model, TOKENIZER, prompts, max_new_tokens,
                           batch_size=2)
  assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
