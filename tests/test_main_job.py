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
      finetune.PRESETS["gemma3_270m_arc_easy"], optimizer="adam", steps=2,
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
  examples = finetune.load_examples(config, config.eval_split)
  examples = [examples[i] for i in finetune.eval_order(config, len(examples))]
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
