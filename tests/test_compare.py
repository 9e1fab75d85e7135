"""experiments/compare.py, pretrain.py and synthetic.py, in micro versions.

A ``mini`` base is pretrained for a few steps from a copy of the train files
next to poisoned test files; the comparison, the reused-compiled-step
protocol and the synthetic setting then run for a handful of steps.
"""

import json
import math
import pathlib
import re
import shlex

import compare  # sets OMP_NUM_THREADS before JAX runs LAPACK
import jax
import numpy as np
import pretrain
import pytest

from rite_optax import data as data_lib
from rite_optax.data import tasks as tasks_lib
from rite_optax.train import finetune
from rite_optax.train import step as step_lib
from rite_optax.train import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]

DATA = tasks_lib.default_local_dir()
POISON = "POISON: a test split was read"


@pytest.fixture(scope="module")
def poisoned_data(tmp_path_factory):
  """The first 120 records of each train file; every test file poisoned."""
  folder = tmp_path_factory.mktemp("llm_adapters")
  for (task, split), name in tasks_lib.LOCAL_FILES.items():
    if split == "train":
      records = json.loads((DATA / name).read_text())[:120]
      (folder / name).write_text(json.dumps(records))
    else:
      (folder / name).write_text(POISON)  # not JSON: reading it raises
  return folder


PRETRAIN = dict(model="mini", steps=30, batch_size=8, max_len=96,
                learning_rate=1e-2, warmup_steps=3, val_windows=32,
                log_every=10)


@pytest.fixture(scope="module")
def base(tmp_path_factory, poisoned_data):
  """A mini base pretrained from the poisoned folder; the files it opened."""
  out = tmp_path_factory.mktemp("pretrain") / "mini"
  config = pretrain.PretrainConfig(**PRETRAIN, data_dir=str(poisoned_data))
  opened = []
  real_open = open

  def spy(path, *args, **kwargs):
    opened.append(pathlib.Path(path).name)
    return real_open(path, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tasks_lib, "open", spy, raising=False)
    info = pretrain.ensure_base(out, config, verbose=False)
  return {"dir": out, "info": info, "config": config, "opened": opened}


def test_pretraining_reads_only_train_files_and_lowers_held_out_loss(base):
  train_names = {tasks_lib.LOCAL_FILES[t, "train"]
                 for t in pretrain.TRAIN_TASKS}
  assert set(base["opened"]) == train_names
  assert not any("test" in name for name in base["opened"])
  assert "gsm8k_test.json" not in base["opened"]
  loss = base["info"]["held_out_loss"]
  # Random init is above ln(264) = 5.6 nats; 30 steps of bytes get far below.
  assert loss["initial"] > 5.0
  assert loss["final"] < loss["initial"] - 1.5
  assert base["info"]["files_read"] == {
      t: tasks_lib.LOCAL_FILES[t, "train"] for t in pretrain.TRAIN_TASKS}


def test_the_base_loads_like_a_released_checkpoint_and_is_cached(base):
  """finetune.build_model reads it back (preset 'mini' + the orbax dir):
  the loaded model gives exactly the held-out loss pretraining measured; a
  second ensure_base does not pretrain again."""
  info = pretrain.ensure_base(base["dir"], base["config"], verbose=False)
  assert info["cached"] and info["path"] == base["info"]["path"]
  config = finetune.FinetuneConfig(model="mini", checkpoint=info["path"])
  tokenizer = data_lib.load_tokenizer(None)
  model = finetune.build_model(config, tokenizer, compare.build_mesh("1,1,1"))
  batches = pretrain.held_out_batches(base["config"], tokenizer)
  sums = [step_lib.decoder_loss_sums(model, b) for b in batches]
  loss = float(sum(s for s, _ in sums) / sum(t for _, t in sums))
  assert loss == pytest.approx(info["held_out_loss"]["final"], rel=1e-5)


def _table_rows(markdown, task):
  section = markdown.split(f"### {task}")[1].split("###")[0]
  return {m.group(1): [c.strip() for c in m.group(2).split("|")]
          for m in re.finditer(r"^\| `(\w+)` \|(.*)\|$", section, re.M)}


def test_micro_comparison_report_is_consistent(base, tmp_path):
  out = tmp_path / "report"
  argv = ["--base-model", "mini", "--base-dir", str(base["dir"]),
          "--optimizers", "adam,lora_rite", "--tasks", "boolq",
          "--steps", "4", "--warmup-steps", "1", "--seeds", "2",
          "--lrs", "3e-3,3e-2", "--eval-examples", "16",
          "--acc-examples", "8", "--out", str(out)]
  report = compare.main(argv)
  saved = json.loads((out / "report.json").read_text())
  assert saved["markdown"] == report["markdown"]
  assert saved["command"] == "python experiments/compare.py " + shlex.join(argv)
  assert report["wall_time_s"] > 0 and report["base"]["cached"]
  task = saved["tasks"]["boolq"]
  rows = _table_rows(saved["markdown"], "boolq")
  assert sorted(rows) == ["adam", "lora_rite"]
  for name, o in task["optimizers"].items():
    # The grid ran on seed 0; its score is that run's final held-out loss.
    runs = {(r["lr"], r["seed"]): r for r in o["runs"]}
    assert [g["lr"] for g in o["grid"]] == [3e-3, 3e-2]
    for g in o["grid"]:
      assert g["seeds"] == [0]
      assert g["mean_eval_loss"] == runs[g["lr"], 0]["final_eval_loss"]
    scores = [g["mean_eval_loss"] for g in o["grid"]]
    assert o["best_lr"] == o["grid"][int(np.argmin(scores))]["lr"]
    # Every seed ran at the best lr, the others only on seed 0.
    assert sorted(runs) == sorted({(g["lr"], 0) for g in o["grid"]}
                                  | {(o["best_lr"], 1)})
    values = [runs[o["best_lr"], s]["final_eval_loss"] for s in (0, 1)]
    assert o["eval_loss"]["values"] == values
    assert o["eval_loss"]["mean"] == pytest.approx(np.mean(values))
    assert o["eval_loss"]["std"] == pytest.approx(np.std(values, ddof=1))
    assert all(0.0 <= a <= 1.0 for a in o["accuracy"]["values"])
    assert len(o["train_loss_mean"]) == 4
    # Fine-tuning at the best lr lowers the held-out loss below the base's.
    assert o["eval_loss"]["mean"] < task["base_model"]["eval_loss"]
    row = rows[name]
    assert row[0].startswith(compare._lr(o["best_lr"]))
    assert row[1] == compare._pm(o["eval_loss"])
    assert row[2] == compare._pm(o["accuracy"], pct=True)
  assert "base model (no fine-tuning)" in saved["markdown"]
  readme = (out / "README.md").read_text()
  assert saved["markdown"] in readme and saved["command"] in readme
  assert saved["figures"] == ["loss_curves.png", "lr_sensitivity.png"]
  for name in saved["figures"]:
    assert (out / name).read_bytes()[:4] == b"\x89PNG"
  redrawn = compare.plot_report(saved, tmp_path / "again")
  assert [p.name for p in redrawn] == saved["figures"]


def test_reused_compiled_step_equals_a_fresh_run(base):
  """A run at lr X after a run at lr Y on the same compiled step equals a
  freshly compiled run at X exactly, and finetune's own optimizer and model
  (lr baked in, built for that seed) to float rounding."""
  settings = compare.CpuSettings(base_model="mini", steps=5, warmup_steps=2,
                                 eval_examples=8, eval_points=1)
  tokenizer = data_lib.load_tokenizer(None)
  mesh = compare.build_mesh(settings.mesh)
  ctx = compare.TaskContext("boolq", settings, base["info"]["path"],
                            tokenizer, mesh, log=lambda msg: None)
  reused = compare.OptimizerRuns("lora_rite", ctx)
  first = reused.run(3e-2, 0)
  second = reused.run(3e-3, 1)
  fresh = compare.OptimizerRuns("lora_rite", ctx).run(3e-3, 1)
  assert second["train_loss"] == fresh["train_loss"]
  assert second["final_eval_loss"] == fresh["final_eval_loss"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second["params"]),
               jax.device_get(fresh["params"]))
  assert first["train_loss"][1:] != second["train_loss"][1:]

  # finetune.build_model for seed 1 starts from the same LoRA factors ...
  config = finetune.FinetuneConfig(**{
      **{k: getattr(ctx.config, k) for k in (
          "model", "checkpoint", "lora_rank", "lora_alpha", "task", "max_len",
          "batch_size", "warmup_steps", "clip_grad_norm", "steps")},
      "seed": 1, "optimizer": "lora_rite", "learning_rate": 3e-3})
  model = finetune.build_model(config, tokenizer, mesh)
  jax.tree.map(np.testing.assert_array_equal, ctx.lora_params(1),
               jax.device_get(step_lib.split_model(model)[1]))
  # ... and finetune.build_optimizer's lr-baked step follows the same path.
  tx = finetune.build_optimizer(config)
  setup = step_lib.create_train_state(model, tx, mesh)
  step = step_lib.make_train_step(setup.graphdef, tx, mesh, setup.shardings,
                                  compute_dtype=None)
  state, losses = setup.state, []
  for batch in ctx.train_batches(1):
    state, metrics = step(setup.frozen, state, batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, second["train_loss"], rtol=2e-5)


def test_synthetic_lora_rite_is_invariant_to_the_start_and_adam_is_not(
    tmp_path):
  out = tmp_path / "synthetic"
  report = compare.main([
      "--setting", "synthetic", "--optimizers", "adam,lora_rite",
      "--lrs", "1e-2,3e-2", "--steps", "60", "--seeds", "2",
      "--out", str(out)])
  assert json.loads((out / "report.json").read_text())["markdown"] == (
      report["markdown"])
  rite, adam = (report["optimizers"][n] for n in ("lora_rite", "adam"))
  for o in (rite, adam):
    std, tr = o["starts"]["standard"], o["starts"]["transformed"]
    # The transformed factors are the same network: same initial loss.
    assert tr["initial_loss"] == pytest.approx(std["initial_loss"], rel=1e-12)
    assert std["final_loss"]["mean"] < 0.2 * std["initial_loss"]
  initial = rite["starts"]["standard"]["initial_loss"]
  # float64: LoRA-RITE's products follow the same path up to rounding ...
  assert rite["max_curve_gap"] < 1e-9
  for a, b in zip(rite["starts"]["standard"]["final_loss"]["values"],
                  rite["starts"]["transformed"]["final_loss"]["values"]):
    assert abs(a - b) <= 1e-9 * initial
  # ... Adam's do not (cond(S) = 1e3 rescales its per-coordinate steps).
  assert adam["max_curve_gap"] > 1e-2
  gaps = [abs(a - b) / initial for a, b in zip(
      adam["starts"]["standard"]["final_loss"]["values"],
      adam["starts"]["transformed"]["final_loss"]["values"])]
  assert max(gaps) > 1e-4
  assert "| `lora_rite` |" in report["markdown"]
  assert report["figures"] == ["synthetic_convergence.png",
                               "synthetic_lr_sensitivity.png"]
  # best lr is the grid's argmin of the mean final loss (standard start).
  for o in (rite, adam):
    means = [g["standard"]["mean"] for g in o["grid"]]
    assert o["best_lr"] == o["grid"][int(np.argmin(means))]["lr"]


def test_quick_flags_keep_every_optimizer_with_fewer_runs():
  cpu = compare.settings_from_args(compare.parse_args(["--quick"]))
  assert list(cpu.optimizers) == list(compare.rite_optax.OPTIMIZERS)
  assert all(len(cpu.grid(n)) == 2 for n in cpu.optimizers)
  assert (cpu.base_model, cpu.seeds) == ("mini", 2)
  syn = compare.settings_from_args(compare.parse_args(
      ["--quick", "--setting", "synthetic"]))
  assert list(syn.optimizers) == list(compare.rite_optax.OPTIMIZERS)
  assert all(len(syn.grid(n)) == 3 for n in syn.optimizers)
  full = compare.settings_from_args(compare.parse_args([]))
  assert full.seeds >= 3 and full.base_model == "small"
  assert all(len(full.grid(n)) >= 3 for n in full.optimizers)
  assert full.grid("lora_pro") and compare.optimizer_hparams(
      "lora_pro", full) == {"scale": full.lora_alpha / full.lora_rank}


def test_best_lr_skips_diverged_runs():
  assert sweep.best_index([None, 0.5, 0.3, math.nan, math.inf]) == 2
  assert sweep.best_index([0.2, 0.2]) == 0
  assert sweep.stats([1.0, math.nan]) == {"values": [1.0, None],
                                            "mean": None, "std": None}
