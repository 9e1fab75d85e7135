"""The main job's preset on the released Gemma 3 270M, shortened: the base
is evaluated before training (the LoRA model at B = 0 is the released model
exactly) and the fine-tuned one after, printed side by side."""

import dataclasses
import math

from rite_optax import models
from rite_optax.train import eval as eval_lib
from rite_optax.train import finetune


def test_main_job_evaluates_the_released_base_then_fine_tunes_it(tmp_path,
                                                                 capsys):
  # Adam: the pipeline is under test here, and its step compiles in half
  # LoRA-RITE's time on the 126 adapters (test_train runs LoRA-RITE's).
  config = dataclasses.replace(
      finetune.PRESETS["gemma3_270m_arc_easy"], optimizer="adam",
      hparams="{}", steps=2,
      eval_every=2, eval_examples=6, max_len=32, warmup_steps=1,
      checkpoint_every=2, mesh="1,1,1", output_dir=str(tmp_path / "run"))
  history = finetune.run(config)
  err = capsys.readouterr().err
  assert "base (step 0)" in err and "fine-tuned" in err
  assert [s for s, _ in history["eval/loss"]] == [0, 2]
  assert len(history["train/loss"]) == 2
  assert all(math.isfinite(v) for _, v in history["train/loss"])

  # Step 0 is the released model itself, scored without any adapter.
  tokenizer = finetune.build_tokenizer(config)
  base = models.load_gguf(finetune.checkpoint_path(config))
  examples = finetune.held_out_examples(config)
  expected = eval_lib.task_metrics(base, tokenizer, "arc_easy", examples,
                                   batch_size=config.batch_size,
                                   max_len=config.max_len)
  step0 = {k.split("/")[1]: dict(v)[0] for k, v in history.items()
           if k.startswith("eval/") and k != "eval/loss"}
  assert step0 == expected


def test_finetune_builds_gemma3_from_hf_safetensors(tmp_path):
  """The official bf16 releases come as HF safetensors: --checkpoint DIR
  loads them (before LoRA is injected) into the same weights."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from rite_optax.models import gemma, gemma_loader  # pylint: disable=import-outside-toplevel
  from rite_optax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  source = gemma.Gemma(gemma.PRESETS["tiny_gemma3"](), rngs=nnx.Rngs(3))
  gemma_loader.save_hf_gemma(source, tmp_path / "hf")
  config = finetune.FinetuneConfig(model="tiny_gemma3",
                                   checkpoint=str(tmp_path / "hf"))
  mesh = finetune.build_mesh("1,1,1")
  model = finetune.build_model(config, finetune.build_tokenizer(config), mesh)
  _, _, frozen = step_lib.split_model(model)
  _, want = nnx.split(source)
  got = jax.tree.leaves(frozen)
  assert len(got) == len(jax.tree.leaves(want))
  for a, b in zip(got, jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _factor_growth(config, steps):
  """Largest ``|lora_a|`` over the adapters after ``steps`` steps on one
  batch, relative to its value at init, and the batch's loss before/after."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from rite_optax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  tokenizer = finetune.build_tokenizer(config)
  mesh = finetune.build_mesh("1,1,1")
  model = finetune.build_model(config, tokenizer, mesh)
  tx = finetune.build_optimizer(config)
  setup = step_lib.create_train_state(model, tx, mesh)
  train_step = step_lib.make_train_step(
      setup.graphdef, tx, mesh, setup.shardings, compute_dtype=jnp.float32,
      loss_fn=finetune.build_loss(config))
  examples = finetune.load_examples(config, "train")
  batch = step_lib.shard_batch(
      next(finetune.make_batches(config, tokenizer, examples, seed=0)), mesh,
      global_batch=True)

  def largest_a(params):
    return max(float(jnp.linalg.norm(x)) for path, x in
               jax.tree_util.tree_leaves_with_path(params)
               if "lora_a" in jax.tree_util.keystr(path))

  state, before = setup.state, largest_a(setup.state.params)
  losses = []
  for _ in range(steps):
    state, metrics = train_step(setup.frozen, state, batch)
    losses.append(float(metrics["loss"]))
  return largest_a(state.params) / before, losses


def test_the_main_jobs_lora_rite_keeps_the_factors_bounded_on_the_real_model():
  """LoRA-RITE with the reference's clip of the unmagnified gradients (1.0)
  diverges on Gemma 3 270M at every learning rate tried: the clip scales
  them into the regime of eps, the first preconditioned step leaves B badly
  conditioned and the next one multiplies |A| by 1000 (measured: 1509 after
  4 steps). The preset turns that clip off: A grows by a few times while the
  batch's loss falls."""
  config = dataclasses.replace(
      finetune.PRESETS["gemma3_270m_arc_easy"], warmup_steps=0,
      schedule="constant", mesh="1,1,1")
  assert config.optimizer == "lora_rite"
  growth, losses = _factor_growth(config, steps=4)
  assert growth < 10, growth
  assert losses[-1] < losses[0] - 1.0, losses
