"""The loss and the choice scores with the unembedding on the target
positions only equal those computed over every position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rite_optax import data as data_lib
from rite_optax.models import gemma
from rite_optax.train import eval as eval_lib
from rite_optax.train import step as step_lib

BYTES = data_lib.ByteTokenizer()


@pytest.fixture(scope="module")
def model():
  config = gemma.PRESETS["tiny"](vocab_size=BYTES.vocab_size)
  return gemma.Gemma(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
  examples = data_lib.load_local_task("arc_easy", "test")[:8]
  # Targets of different lengths in one batch (answers of 1..4 digits).
  examples = [dict(ex, target="x" * (1 + i % 4)) for i, ex in
              enumerate(examples)]
  batches = data_lib.Batches(examples, BYTES, batch_size=8, max_len=96,
                             buckets=(96,), shuffle=False)
  return {k: jnp.asarray(v) for k, v in next(batches).items()}


def test_gather_loss_positions_takes_the_first_masked_positions_in_order():
  mask = jnp.array([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], jnp.float32)
  values = jnp.arange(10).reshape(2, 5)
  got = step_lib.gather_loss_positions(values, mask, 2)
  np.testing.assert_array_equal(got, [[1, 3], [5, 6]])
  np.testing.assert_array_equal(
      step_lib.gather_loss_positions(mask, mask, 3), [[1, 1, 1], [1, 0, 0]])


def test_answer_loss_equals_the_full_loss(model, batch):
  per_row = np.asarray(batch["loss_mask"]).sum(axis=1)
  assert per_row.max() == 5 and per_row.min() == 2  # x.. + EOS
  full = step_lib.decoder_loss_sums(model, batch)
  for k in (5, 8):
    sliced = step_lib.decoder_answer_loss_sums(k)(model, batch)
    np.testing.assert_allclose(sliced[0], full[0], rtol=1e-5)
    np.testing.assert_array_equal(sliced[1], full[1])


def test_answer_loss_keeps_the_first_target_tokens_only(model, batch):
  mask = np.asarray(batch["loss_mask"])
  first2 = (np.cumsum(mask, axis=1) <= 2) * mask
  expected = step_lib.decoder_loss_sums(
      model, dict(batch, loss_mask=jnp.asarray(first2)))
  got = step_lib.decoder_answer_loss_sums(2)(model, batch)
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
  np.testing.assert_array_equal(got[1], expected[1])
  with pytest.raises(ValueError, match="max_loss_tokens"):
    step_lib.decoder_answer_loss_sums(0)


def test_choice_scores_on_the_choice_positions_equal_full_scores(model, batch):
  full = eval_lib.score_choices(model, batch)
  sliced = jax.jit(lambda b: eval_lib.score_choices(
      model, b, max_scored_tokens=8))(batch)
  for key in full:
    np.testing.assert_allclose(sliced[key], full[key], rtol=1e-5, atol=1e-6)


def test_multiple_choice_accuracy_is_the_same_with_and_without_slicing(model):
  examples = [data_lib.tasks.question_answer_form(ex) for ex in
              data_lib.load_local_task("arc_easy", "test")[:6]]
  # The same model without hidden_states: every position is unembedded.
  plain = lambda tokens, positions, mask: model(tokens, positions, mask)
  pairs = [(ex["prompt"], c) for ex in examples for c in ex["choices"]]
  sliced = eval_lib._log_likelihoods(model, BYTES, pairs, 8, None)  # pylint: disable=protected-access
  encoded = [eval_lib._context_and_continuation(BYTES, p, c) for p, c in pairs]  # pylint: disable=protected-access
  seq_len = eval_lib._round_up_length(  # pylint: disable=protected-access
      max(len(a) + len(b) - 1 for a, b in encoded))
  full = np.concatenate([
      np.asarray(eval_lib.score_choices(plain, eval_lib._pad_rows(  # pylint: disable=protected-access
          eval_lib._choice_rows(encoded[i:i + 8], seq_len), 8))[  # pylint: disable=protected-access
              "log_likelihood"])[:len(encoded[i:i + 8])]
      for i in range(0, len(encoded), 8)])
  np.testing.assert_allclose(sliced, full, rtol=1e-5)
