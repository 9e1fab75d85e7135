"""The main job, experiments/finetune.py over rite_optax.train.finetune, end
to end in a shortened form."""

import dataclasses
import json

import jax
import pytest

import finetune as finetune_cli  # experiments/finetune.py
from rite_optax.train import finetune

SHORT = ["--steps", "24", "--eval-every", "12", "--eval-examples", "8",
         "--batch-size", "8", "--max-len", "96", "--warmup-steps", "4",
         "--checkpoint-every", "12"]


def _metrics(output_dir):
  return [json.loads(line) for line in
          (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_main_job_trains_evaluates_and_writes_its_outputs(tmp_path):
  out = tmp_path / "run"
  history = finetune_cli.main(SHORT + ["--output-dir", str(out)])
  train = [v for _, v in history["train/loss"]]
  assert len(train) == 24 and train[-1] < 0.5 * train[0]
  assert [s for s, _ in history["eval/loss"]] == [12, 24]
  assert all(0.0 <= v <= 1.0 for _, v in history["eval/acc"])
  assert (out / "loss.png").stat().st_size > 1000
  assert list((out / "tb").glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (out / "checkpoints").iterdir()
                if p.name.isdigit()) == ["12", "24"]
  assert json.loads((out / "config.json").read_text())["optimizer"] == "lora_rite"


def test_main_job_resumes_exactly_after_a_preemption(tmp_path, capsys,
                                                   monkeypatch):
  """Preempted at step 12 (the SIGTERM path), then restarted: the loss
  sequence equals an uninterrupted run's exactly."""
  straight, split = tmp_path / "straight", tmp_path / "split"
  finetune_cli.main(SHORT + ["--output-dir", str(straight)])
  with monkeypatch.context() as patch:
    patch.setattr(finetune.ckpt_lib.PreemptionGuard, "should_stop",
                  lambda self, step: step >= 12)
    finetune_cli.main(SHORT + ["--output-dir", str(split)])
  assert "preempted: checkpoint saved at step 12" in capsys.readouterr().err
  finetune_cli.main(SHORT + ["--output-dir", str(split)])
  assert "resumed from step 12" in capsys.readouterr().err
  loss = lambda d: [(m["step"], m["train/loss"]) for m in _metrics(d)
                    if "train/loss" in m]
  assert len(loss(straight)) == 24
  assert loss(split) == loss(straight)


def test_a_run_with_another_optimizer_does_not_resume_its_checkpoints(tmp_path):
  out = tmp_path / "run"
  finetune_cli.main(["--steps", "6", "--eval-every", "6", "--eval-examples", "4",
                 "--batch-size", "8", "--max-len", "64",
                 "--warmup-steps", "2", "--output-dir", str(out)])
  with pytest.raises(ValueError, match="holds checkpoints of a run with other "
                     "optimizer='lora_rite'"):
    finetune_cli.main(["--steps", "6", "--optimizer", "adam", "--output-dir",
                   str(out)])
  assert (out / "checkpoints" / "6").exists()  # nothing was moved aside


def test_a_batch_that_does_not_split_over_the_mesh_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"--batch-size 4 must be a multiple of "
                     r"data x fsdp x grad_accum_steps = 8"):
    finetune_cli.main(["--batch-size", "4", "--mesh", "8,1,1", "--output-dir",
                   str(tmp_path)])


def test_the_schedules_warm_up_linearly_then_decay_or_stay():
  def at(schedule, *steps):
    config = finetune.FinetuneConfig(learning_rate=1.0, warmup_steps=10,
                                     steps=110, schedule=schedule)
    return [float(finetune.build_schedule(config)(s)) for s in steps]

  assert at("linear", 0, 5, 10, 60, 110) == pytest.approx([0, .5, 1, .5, 0])
  assert at("cosine", 5, 10, 60, 110) == pytest.approx([.5, 1, .5, 0])
  assert at("constant", 5, 10, 60, 110) == pytest.approx([.5, 1, 1, 1])


def test_checkpoints_saved_before_the_family_field_still_resume(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  config = finetune.FinetuneConfig()
  saved = dataclasses.asdict(config)
  del saved["family"]  # a config.json written before the field existed
  (tmp_path / "config.json").write_text(json.dumps(saved))
  finetune.check_resumable(config, tmp_path)
  with pytest.raises(ValueError, match="other family='gemma'"):
    finetune.check_resumable(
        dataclasses.replace(config, family="t5"), tmp_path)


def test_mesh_specs():
  assert finetune.mesh_sizes("auto", 8) == (8, 1, 1)
  assert finetune.mesh_sizes("2,-1,1", 8) == (2, 4, 1)
  for bad in ("2,2", "-1,-1,1", "0,1,1", "a,b,c"):
    with pytest.raises(ValueError, match="mesh must be"):
      finetune.mesh_sizes(bad, 8)
  with pytest.raises(ValueError, match="do not divide"):
    finetune.mesh_sizes("3,-1,1", 8)


def test_lora_init_scale_scales_lora_a_and_leaves_b_zero():
  import numpy as np  # pylint: disable=import-outside-toplevel
  from rite_optax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  def factors(scale):
    config = finetune.FinetuneConfig(model="tiny", lora_init_scale=scale)
    model = finetune.build_model(config, finetune.build_tokenizer(config),
                                 finetune.build_mesh("1,1,1"))
    _, params, _ = step_lib.split_model(model)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
            jax.tree_util.tree_leaves_with_path(params)}

  one, hundred = factors(1.0), factors(100.0)
  assert one.keys() == hundred.keys()
  for path, a in one.items():
    if "lora_a" in path:
      np.testing.assert_allclose(hundred[path], 100.0 * a, rtol=1e-6)
    else:
      assert not hundred[path].any()
  with pytest.raises(ValueError, match="lora_init_scale"):
    finetune.validate(finetune.FinetuneConfig(lora_init_scale=0.0))


def test_eval_task_metrics_false_evaluates_the_loss_only(tmp_path):
  config = finetune.FinetuneConfig(
      steps=2, eval_every=2, eval_examples=4, batch_size=2, max_len=192,
      eval_task_metrics=False, source="mock", task="arc_easy",
      output_dir=str(tmp_path / "run"), mesh="1,1,1")
  history = finetune.run(config)
  assert sorted(k for k in history if k.startswith("eval/")) == ["eval/loss"]
