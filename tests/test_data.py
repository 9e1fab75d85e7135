"""Tokenizers, task conversions and the batch pipeline of rite_optax.data."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from rite_optax.data import pipeline
from rite_optax.data import tasks
from rite_optax.data import tokenizers

# The copy shipped as package data (tests/test_packaging.py checks a wheel
# carries it).
LOCAL_DIR = tasks.default_local_dir()
NUM_MOCK = 12
BYTES = tokenizers.ByteTokenizer()


def _byte_text(ids) -> str:
  return BYTES.decode(np.asarray(ids).tolist())


# --- batch checks -------------------------------------------------------------


def check_decoder_only_batch(batch, batch_size, buckets):
  """Shapes, dtypes and the masks' invariants; returns the target texts."""
  assert set(batch) == {"inputs", "targets", "loss_mask", "attention_mask"}
  length = batch["inputs"].shape[1]
  assert length in buckets
  for key, dtype in [("inputs", np.int32), ("targets", np.int32),
                     ("loss_mask", np.float32), ("attention_mask", np.bool_)]:
    assert batch[key].shape == (batch_size, length), key
    assert batch[key].dtype == dtype, key
  texts = []
  for b in range(batch_size):
    inputs, targets = batch["inputs"][b], batch["targets"][b]
    loss, attend = batch["loss_mask"][b], batch["attention_mask"][b]
    real = int(attend.sum())
    assert attend[:real].all() and not attend[real:].any()  # right padding
    assert inputs[0] == tokenizers.BOS_ID
    assert (inputs[real:] == 0).all() and (targets[real:] == 0).all()
    assert (loss[real:] == 0).all()
    np.testing.assert_array_equal(targets[:real - 1], inputs[1:real])
    in_loss = np.flatnonzero(loss)
    if in_loss.size == 0:  # a filler row of the last batch
      assert real == 1
      continue
    # The loss covers one block that ends at the last real position, EOS.
    np.testing.assert_array_equal(in_loss, np.arange(in_loss[0], real))
    assert set(np.unique(loss)) == {0.0, 1.0}
    assert targets[real - 1] == tokenizers.EOS_ID
    assert tokenizers.EOS_ID not in inputs[:real]
    texts.append(_byte_text(targets[in_loss[:-1]]))
  return texts


def check_seq2seq_batch(batch, batch_size):
  assert set(batch) == {"inputs", "encoder_mask", "decoder_inputs", "targets",
                        "loss_mask", "decoder_mask"}
  for b in range(batch_size):
    enc = int(batch["encoder_mask"][b].sum())
    dec = int(batch["decoder_mask"][b].sum())
    assert batch["encoder_mask"][b, :enc].all()
    assert batch["inputs"][b, enc - 1] == tokenizers.EOS_ID
    assert (batch["inputs"][b, enc:] == 0).all()
    assert batch["decoder_inputs"][b, 0] == 0  # T5's start id is the pad id
    np.testing.assert_array_equal(batch["decoder_inputs"][b, 1:dec],
                                  batch["targets"][b, :dec - 1])
    if batch["loss_mask"][b].sum():
      assert batch["loss_mask"][b, :dec].all()
      assert batch["targets"][b, dec - 1] == tokenizers.EOS_ID
    assert not batch["loss_mask"][b, dec:].any()


# --- TFDS under mock_data -----------------------------------------------------


def _as_bytes(value):
  # array_record decoding gives text as bytes; the default mocks give str.
  if isinstance(value, dict):
    return {k: _as_bytes(v) for k, v in value.items()}
  if isinstance(value, str):
    return value.encode()
  if isinstance(value, np.ndarray) and value.dtype.kind == "U":
    return np.array([v.encode() for v in value.reshape(-1)], object)
  return value


def _repair_hellaswag(record, i):
  record["endings"] = record["endings"][:4]
  record["label"] = np.int32(i % 4)
  return record


def _repair_arc(record, i):
  n = 3 + i % 3  # ARC has 3 to 5 choices
  record["choices"] = {"text": record["choices"]["text"][:n],
                       "label": np.arange(n)}
  record["answerKey"] = np.int64(i % n)
  return record


# The random records of mock_data leave labels out of range of the random
# number of endings/choices; these tasks get records drawn the same way from
# the builder's own features, with the labels made consistent.
_REPAIRS = {"hellaswag": _repair_hellaswag, "arc_challenge": _repair_arc,
            "arc_easy": _repair_arc}


def _mock(task):
  if task not in _REPAIRS:
    return tfds.testing.mock_data(num_examples=NUM_MOCK)

  def as_data_source(builder, split, **kwargs):
    del split, kwargs
    fake = mocking.RandomFakeGenerator(builder.info.features, NUM_MOCK)
    return [_as_bytes(_REPAIRS[task](fake[i], i)) for i in range(NUM_MOCK)]

  return tfds.testing.mock_data(num_examples=NUM_MOCK,
                                as_data_source_fn=as_data_source)


_SPLITS = {"hellaswag": "validation", "natural_instructions": "train"}


@pytest.mark.parametrize("task", sorted(tasks.TFDS_BUILDERS))
def test_tfds_task_under_mock_data(task):
  with _mock(task):
    examples = list(pipeline.tfds_task(task, _SPLITS.get(task, "test")))
  assert len(examples) == NUM_MOCK
  for ex in examples:
    assert isinstance(ex["prompt"], str) and isinstance(ex["target"], str)
    if task in tasks.MULTIPLE_CHOICE:
      assert all(isinstance(c, str) for c in ex["choices"])
      assert 0 <= ex["answer"] < len(ex["choices"])
      assert ex["target"] == ex["choices"][ex["answer"]]
    else:
      assert isinstance(ex["answer"], str)
  if task.startswith("arc"):
    assert {len(ex["choices"]) for ex in examples} == {3, 4, 5}

  buckets = pipeline.bucket_lengths(256, min_len=64, per_octave=1)
  assert buckets == (64, 128, 256)
  batches = pipeline.Batches(examples, BYTES, batch_size=5, max_len=256,
                             buckets=buckets, num_epochs=1,
                             drop_remainder=False, seed=3)
  seen = []
  for batch in batches:
    seen += check_decoder_only_batch(batch, 5, buckets)
  # Every example once (12 = 5 + 5 + 2, three filler rows), targets intact.
  assert sorted(seen) == sorted(ex["target"] for ex in examples)


def test_tfds_task_accepts_builder_names():
  with _mock("arc_challenge"):
    examples = pipeline.tfds_task("ai2_arc/ARC-Challenge", "train")
    assert examples.name == "arc_challenge train"
    assert examples[0]["prompt"].startswith("Question: ")


def test_seq2seq_batches_under_mock_data():
  with _mock("gsm8k"):
    examples = list(pipeline.tfds_task("gsm8k", "train"))
  batches = pipeline.Batches(examples, BYTES, batch_size=4, max_len=64,
                             max_target_len=32, seq2seq=True, num_epochs=1,
                             drop_remainder=False)
  for batch in batches:
    check_seq2seq_batch(batch, 4)
    assert batch["inputs"].shape[1] in (32, 48, 64)
    assert batch["targets"].shape[1] == 32


# --- encoding -----------------------------------------------------------------


def test_encode_truncates_the_prompt_on_the_left():
  prompt, target = "p" * 90 + "0123456789", "answer"
  ex = pipeline.encode_decoder_only(BYTES, prompt, target, max_len=30)
  assert len(ex["inputs"]) == 30
  assert ex["inputs"][0] == tokenizers.BOS_ID
  assert ex["loss_mask"].sum() == len(target) + 1
  assert _byte_text(ex["inputs"][1:]).startswith("p" * 13 + "0123456789ans")
  assert _byte_text(ex["targets"][-7:-1]) == target
  assert ex["targets"][-1] == tokenizers.EOS_ID


def test_encode_cuts_a_target_that_alone_is_too_long():
  ex = pipeline.encode_decoder_only(BYTES, "prompt", "t" * 50, max_len=30)
  assert len(ex["inputs"]) == 30 and ex["loss_mask"].all()
  assert _byte_text(ex["targets"]) == "t" * 30  # no EOS: the text goes on
  ex = pipeline.encode_decoder_only(BYTES, "q", " yes", 16, add_eos=False)
  assert _byte_text(ex["targets"][ex["loss_mask"] == 1]) == " yes"


def test_encode_seq2seq():
  ex = pipeline.encode_seq2seq(BYTES, "x" * 20 + "question", "reply", 9, 4)
  assert _byte_text(ex["inputs"][:-1]) == "question"
  assert ex["inputs"][-1] == tokenizers.EOS_ID
  assert _byte_text(ex["targets"]) == "repl"
  np.testing.assert_array_equal(ex["decoder_inputs"][1:], ex["targets"][:-1])


# --- local LLM-Adapters files -----------------------------------------------

_COUNTS = {("arc_challenge", "train"): 1119, ("arc_challenge", "test"): 1172,
           ("arc_easy", "train"): 2251, ("arc_easy", "test"): 2376,
           ("openbookqa", "train"): 4957, ("openbookqa", "test"): 500,
           ("boolq", "train"): 9427, ("boolq", "test"): 3270}


@pytest.mark.parametrize("task,split", sorted(_COUNTS))
def test_local_multiple_choice_files(task, split):
  examples = tasks.load_local_task(task, split, LOCAL_DIR)
  assert len(examples) == _COUNTS[task, split]
  sizes = set()
  for ex in examples:
    n = len(ex["choices"])
    sizes.add(n)
    assert len(ex["choice_texts"]) == n and all(ex["choice_texts"])
    assert 0 <= ex["answer"] < n
    assert ex["target"] == ex["choices"][ex["answer"]]
    assert ex["prompt"].endswith("### Response:\n")
  if task == "boolq":
    assert sizes == {2}
  elif task == "openbookqa":
    assert sizes == {4}
  else:
    assert sizes == {3, 4, 5}  # ARC has a few 3- and 5-way questions


def test_local_arc_known_examples():
  examples = tasks.load_local_task("arc-challenge", "test", LOCAL_DIR)
  first = examples[0]
  assert first["question"] == (
      "An astronomer observes that a planet rotates faster after a meteorite "
      "impact. Which is the most likely effect of this increase in rotation?")
  assert first["choice_texts"] == [
      "Planetary density will decrease.",
      "Planetary years will become longer.",
      "Planetary days will become shorter.",
      "Planetary gravity will become stronger."]
  assert first["answer"] == 2
  assert first["target"] == "the correct answer is answer3"
  five = [ex for ex in examples if len(ex["choices"]) == 5]
  assert len(five) == 3
  assert five[0]["choices"][4] == "the correct answer is answer5"


def test_parse_choices_rejects_malformed_options():
  with pytest.raises(ValueError, match="cannot parse"):
    tasks.parse_choices("Please choose the correct answer to the question: "
                        "Q?\n\nAnswer1: a Answer3: b\n\n"
                        "Answer format: answer1/answer2")


def test_local_math_files():
  test = tasks.load_local_task("gsm8k", "test", LOCAL_DIR)
  train = tasks.load_local_task("gsm8k", "train", LOCAL_DIR)  # math_data.json
  assert (len(test), len(train)) == (1319, 3260)
  assert test[0]["answer"] == "576"
  for ex in test:
    float(ex["answer"])
  mawps = tasks.load_local_task("mawps", "train", LOCAL_DIR)
  assert len(mawps) == 1898
  assert tasks.final_number(mawps[0]["target"]) == mawps[0]["answer"]


def test_numbers():
  assert tasks.normalize_number("576.0") == "576"
  assert tasks.normalize_number(" 1,234 ") == "1234"
  assert tasks.normalize_number(1.8333333333333335) == "1.8333333333333335"
  assert tasks.normalize_number("C") == "C"
  assert tasks.final_number("so 3 + 4 = 7.\n#### 1,000") == "1000"
  assert tasks.final_number("... = 60 animals. The answer is 60.") == "60"
  assert tasks.final_number("it is 12 or maybe -3.5") == "-3.5"
  assert tasks.final_number("no digits") is None


def test_bucketing_pads_less_than_max_len_on_real_data():
  examples = tasks.load_local_task("arc_challenge", "train", LOCAL_DIR)
  max_len = 1024
  batches = list(pipeline.Batches(examples, BYTES, batch_size=16,
                                  max_len=max_len, num_epochs=1, seed=0))
  stats = pipeline.padding_stats(batches)
  full = stats["real_tokens"] / (len(batches) * 16 * max_len)
  # Measured: 0.80 bucketed (default buckets and window), 0.54 padded to
  # max_len; 4 shapes (48 batches).
  assert stats["efficiency"] > 0.75
  assert stats["efficiency"] > 1.4 * full
  assert len({b["inputs"].shape for b in batches}) <= 5
  assert pipeline.padding_efficiency(batches[0]) == pytest.approx(
      pipeline.padding_stats(batches[0])["efficiency"])


# --- resuming -----------------------------------------------------------------


@pytest.mark.parametrize("seq2seq", [False, True])
def test_restored_iterator_continues_exactly(seq2seq):
  examples = tasks.load_local_task("openbookqa", "test", LOCAL_DIR)[:40]

  def make():
    # 10 batches an epoch in windows of 3: the run crosses both boundaries.
    return pipeline.Batches(examples, BYTES, batch_size=4, max_len=512,
                            seed=7, window=3, seq2seq=seq2seq,
                            max_target_len=64)

  uninterrupted = make()
  expected = [next(uninterrupted) for _ in range(22)]
  first = make()
  for _ in range(7):
    next(first)
  state = json.loads(json.dumps(first.state()))
  assert state == {"epoch": 0, "position": 7, "seed": 7, "num_examples": 40}
  resumed = make()
  resumed.restore(state)
  for want in expected[7:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert resumed.state()["epoch"] == 2


def test_epochs_cover_each_example_once_in_a_new_order():
  examples = [{"prompt": f"q{i}:", "target": f" {i:03d}"} for i in range(24)]

  def epoch_targets(seed, epoch):
    batches = pipeline.Batches(examples, BYTES, batch_size=4, max_len=32,
                               seed=seed, num_epochs=epoch + 1, window=2)
    batches.restore({"epoch": epoch, "position": 0, "seed": seed,
                     "num_examples": 24})
    return [t for b in batches for t in check_decoder_only_batch(b, 4, (32,))]

  epoch0, epoch1 = epoch_targets(0, 0), epoch_targets(0, 1)
  assert sorted(epoch0) == sorted(epoch1) == [f" {i:03d}" for i in range(24)]
  assert epoch0 != epoch1 and epoch0 != epoch_targets(1, 0)
  with pytest.raises(ValueError, match="24 examples"):
    pipeline.Batches(examples[:20], BYTES, batch_size=4, max_len=32).restore(
        {"epoch": 0, "position": 0, "seed": 0, "num_examples": 24})


# --- tokenizers ---------------------------------------------------------------


def test_byte_tokenizer_round_trip():
  text = "héllo wörld ✓ 🚀\n\ttabs and  spaces"
  ids = BYTES.encode(text)
  assert BYTES.decode(ids) == text
  assert min(ids) >= 3 and max(ids) < 259
  assert BYTES.vocab_size % 8 == 0 and BYTES.vocab_size >= 259
  assert (BYTES.pad_id, BYTES.eos_id, BYTES.bos_id) == (0, 1, 2)
  assert BYTES.decode([2] + ids + [1, 0, 0]) == text
  assert isinstance(tokenizers.load_tokenizer(None), tokenizers.ByteTokenizer)
  assert isinstance(BYTES, tokenizers.Tokenizer)


def test_sentencepiece_tokenizer_trained_here(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  lines = ["The quick brown fox jumps over the lazy dog.",
           "Question: which planet is the largest? Answer: Jupiter.",
           "A farmer has 12 cows and buys 30 more; how many cows now?"] * 20
  # Gemma's conventions: ids 0/1/2/3 = pad/eos/bos/unk, bytes for unseen
  # characters, whitespace kept as it is.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"),
      vocab_size=320, model_type="bpe", pad_id=0, eos_id=1, bos_id=2,
      unk_id=3, byte_fallback=True, character_coverage=1.0,
      add_dummy_prefix=False, remove_extra_whitespaces=False,
      normalization_rule_name="identity", hard_vocab_limit=False,
      minloglevel=2)
  tok = tokenizers.load_tokenizer(tmp_path)  # finds tokenizer.model
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert isinstance(tok, tokenizers.Tokenizer)
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  for text in ["The lazy fox has 42 cows.", " Jupiter", "naïve  café ✓"]:
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
  ex = pipeline.encode_decoder_only(tok, "Question: largest planet?\nAnswer:",
                                    " Jupiter", max_len=64)
  assert ex["inputs"][0] == 2 and ex["targets"][-1] == 1
  assert tok.decode(ex["targets"][ex["loss_mask"] == 1].tolist()) == " Jupiter"
  same = tokenizers.load_tokenizer(tmp_path / "tokenizer.model")
  assert same.encode("cows") == tok.encode("cows")


def test_missing_local_data_names_the_file_and_the_remedy(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"arc-challenge_test\.json: "
                     r"LLM-Adapters file not found; pass data_dir"):
    tasks.load_local_task("arc_challenge", "test", tmp_path)
