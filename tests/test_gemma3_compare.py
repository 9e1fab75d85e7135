"""The real-model comparison's protocol and its resumable cache
(experiments/gemma3_compare.py), on the tiny random Gemma: the grid widens
until its best rate is inside, a comparison stopped part way goes on
without repeating a run, and the report is rebuilt from the cache alone,
byte for byte."""

import dataclasses
import json
import math

import pytest

import gemma3_compare as gc
from rite_optax.train import finetune


def test_grid_widens_past_an_edge_until_the_best_rate_is_inside():
  settings = gc.Gemma3Settings(grid_points=5, max_widen=3)
  target = 5e-3  # adam's first grid is 1e-5 .. 1e-3: the best at its top

  def run(key):
    return {"final_eval_loss": (math.log10(key.lr) - math.log10(target)) ** 2}

  g = gc.Plan(settings, run).grid("arc_easy", 8, "adam")
  assert g["lrs"] == [1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2]
  assert g["best_lr"] == 3.16e-3 and not g["best_at_edge"]

  # A grid that diverges everywhere is extended downwards; max_widen
  # bounds the search, and the report says the best rate is at an edge.
  g = gc.Plan(settings, lambda key: {"final_eval_loss": None}).grid(
      "arc_easy", 8, "adam")
  assert g["lrs"][:4] == [3.16e-7, 1e-6, 3.16e-6, 1e-5] and g["best_at_edge"]

  far = gc.Plan(settings, lambda key: {"final_eval_loss": -key.lr})
  g = far.grid("arc_easy", 8, "adam")
  assert len(g["lrs"]) == 5 + 3 and g["best_at_edge"]


@pytest.fixture
def tiny(monkeypatch, tmp_path):
  """The comparison on the tiny random Gemma, a few steps a run."""
  real = gc.run_config

  def tiny_config(settings, key):
    return dataclasses.replace(real(settings, key), model="tiny",
                               checkpoint=None, loss_tokens=0, mesh="1,1,1")

  monkeypatch.setattr(gc, "run_config", tiny_config)
  calls = []
  real_fit = finetune.fit
  monkeypatch.setattr(finetune, "fit",
                      lambda config, **kw: calls.append(config.output_dir)
                      or real_fit(config, **kw))
  settings = gc.Gemma3Settings(
      tasks=("arc_easy",), ranks=(2,), optimizers=("adam",), grid_points=1,
      max_widen=0, seeds=2, steps=2, warmup_steps=1, batch_size=2,
      max_len=192, eval_examples=4, eval_points=1,
      invariance_scales=(1.0, 100.0), invariance_optimizers=("adam",),
      results=str(tmp_path / "results"), work=str(tmp_path / "work"))
  return settings, calls


def test_a_stopped_comparison_resumes_without_repeating_a_run(tiny):
  settings, calls = tiny
  log = lambda msg: None  # noqa: E731
  report = lambda: gc.write_report(settings, "cmd")  # noqa: E731

  gc.run_protocol(settings, max_runs=2, log=log, on_result=report)
  partial = report()
  assert partial["finished_runs"] == 2 and partial["missing"]
  readme = (settings.results_dir / "README.md").read_text()
  assert "**Partial**" in readme

  gc.run_protocol(settings, max_runs=None, log=log, on_result=report)
  done = report()
  # The grid (1 rate), seed 1 at the best, Adam's longer run, the grid
  # from A x 100; and the base's evaluation: each once, over both
  # invocations.
  assert len(calls) == len(set(calls)) == 1 + 1 + 1 + 1 + 1
  assert done["finished_runs"] == 4 and done["missing"] == []
  # The longer run: twice the steps, evaluated at the protocol's steps too.
  assert done["longer"]["steps"] == 4
  assert [t for t, _ in done["longer"]["eval_loss"]] == [2, 4]
  assert "### Are 2 steps enough?" in (settings.results_dir
                                       / "README.md").read_text()
  entry = done["tables"]["arc_easy/r2"]["adam"]
  assert len(entry["eval_loss"]["values"]) == 2
  assert all(0.0 <= a <= 1.0 for a in entry["acc"]["values"])
  assert set(done["invariance"]["adam"]) == {"1", "100"}
  # A x 100 is another start for Adam: another run, another result.
  assert done["invariance"]["adam"]["1"] != done["invariance"]["adam"]["100"]

  files = {p.name: p.read_bytes()
           for p in settings.results_dir.iterdir() if p.is_file()}
  gc.write_report(settings, "cmd")
  again = {p.name: p.read_bytes()
           for p in settings.results_dir.iterdir() if p.is_file()}
  assert again == files
  assert {"README.md", "report.json", "loss_curves.png",
          "lr_sensitivity.png", "invariance.png"} <= set(files)


def test_a_resumed_run_counts_the_time_of_every_invocation(tiny,
                                                            monkeypatch):
  """A run preempted at a checkpoint and resumed by the next invocation
  reports the wall time of both, not only the last one's."""
  import types  # pylint: disable=g-import-not-at-top

  settings, _ = tiny
  clock = [0.0]
  monkeypatch.setattr(gc, "time",
                      types.SimpleNamespace(perf_counter=lambda: clock[0]))
  real_fit, invocations = gc._fit, []

  def fit(config, log):
    invocations.append(config.output_dir)
    clock[0] += 100.0 if len(invocations) == 1 else 50.0
    if len(invocations) == 1:
      raise SystemExit(3)  # as a preempted run does, once checkpointed
    return real_fit(config, log)

  monkeypatch.setattr(gc, "_fit", fit)
  key = gc.RunKey("arc_easy", 2, "adam", 1e-3)
  with pytest.raises(SystemExit):
    gc.train_run(settings, key, lambda msg: None)
  assert gc.train_run(settings, key, lambda msg: None)["wall_s"] == 150.0
  assert len(invocations) == 2


def test_a_fresh_checkout_retrains_a_run_whose_factors_are_gone(tiny):
  """The results folder is committed, the work folder (each run's final
  factors) is not: a comparison continued from a fresh checkout trains a
  finished run again to score its accuracy, and checks that it reproduces
  the cached held-out loss, rather than failing on the missing file (or
  scoring other factors)."""
  import shutil  # pylint: disable=g-import-not-at-top

  settings, calls = tiny
  log = lambda msg: None  # noqa: E731
  gc.run_protocol(settings, max_runs=1, log=log, on_result=lambda: None)
  (seed0,) = [p for p in (settings.results_dir / "runs").iterdir()]
  shutil.rmtree(settings.work_dir)
  calls.clear()
  gc.run_protocol(settings, max_runs=None, log=log, on_result=lambda: None)
  accuracy = settings.results_dir / "accuracy" / seed0.name
  assert accuracy.exists()
  first = str(gc.run_config(settings, gc.RunKey(**gc._read(seed0)["key"]))
              .output_dir)
  assert calls.count(first) == 1  # trained again, once

  # A cached result that the repeated run does not reproduce is refused.
  result = gc._read(seed0)
  key = gc.RunKey(**result["key"])
  result["final_eval_loss"] += 0.5
  gc._write(seed0, result)
  shutil.rmtree(settings.work_dir)
  with pytest.raises(RuntimeError, match="is not the cached"):
    gc.final_params_path(settings, key, log)


def test_each_seed_is_scored_before_the_next_one_trains(tiny):
  """A comparison stopped between seeds has scored the seeds it trained:
  their factors live in the work folder, which the next session does not
  have, so a score left for later would cost a whole run again."""
  settings, calls = tiny
  settings = dataclasses.replace(settings, seeds=3)
  log = lambda msg: None  # noqa: E731
  # Seed 0 (the grid), Adam's longer run, seed 1; the budget stops seed 2.
  gc.run_protocol(settings, max_runs=3, log=log, on_result=lambda: None)
  scored = sorted(p.name for p in (settings.results_dir / "accuracy").iterdir())
  best = gc.Plan(settings, lambda key: gc.cached_run(settings, key)).grid(
      "arc_easy", 2, "adam")["best_lr"]
  assert scored == [f"{gc.RunKey('arc_easy', 2, 'adam', best, s).name}.json"
                    for s in (0, 1)]


def test_lora_rite_is_compared_with_adam_before_the_other_optimizers():
  """The claim under test is LoRA-RITE against Adam: their pieces run
  first on every task and rank, while the report keeps the settings'
  order."""
  settings = gc.Gemma3Settings()
  order = list(gc.work_order(settings))
  first = [a[2] for k, a in order if k == "main" and a[:2] == ("arc_easy", 8)]
  assert first[:2] == ["adam", "lora_rite"]
  assert sorted(first) == sorted(settings.optimizers)
  for task in settings.tasks:
    for rank in settings.ranks:
      names = [a[2] for k, a in order if k == "main" and a[:2] == (task, rank)]
      assert names[:2] == ["adam", "lora_rite"]
  inv = [a[2] for k, a in order if k == "invariance"]
  assert inv[:2 * len(settings.invariance_scales)] == (
      ["adam"] * len(settings.invariance_scales)
      + ["lora_rite"] * len(settings.invariance_scales))
  assert settings.optimizers[1] != "lora_rite"  # the report's order differs


def test_the_steps_are_enough_only_if_twice_as_many_gain_less_than_the_spread():
  settings = gc.Gemma3Settings()
  adam = {"grid": [], "best_lr": 1e-4, "best_at_edge": False,
          "eval_loss": {"mean": 2.0, "std": 0.01, "values": [1.99, 2.0, 2.01]}}

  def verdict(final):
    found = {"tables": {"arc_easy/r8": {"adam": adam}},
             "longer": {"final_eval_loss": final}}
    return gc.levelled_off(settings, found)

  assert verdict(1.995) == "levelled off"
  assert verdict(2.03) == "levelled off"  # worse with more steps: enough
  assert verdict(1.985) == "not levelled off"
  assert verdict(None) == "diverged"
  assert gc.levelled_off(settings, {"tables": {}, "longer": None}) is None


def test_a_run_cached_under_another_configuration_is_refused(tmp_path):
  """A cached result stands for the run of its name only if it ran under
  the comparison's configuration now (LoRA-Pro's mode, LoRA-RITE's clip):
  one from another protocol stops the comparison, naming the file and the
  field, instead of entering the report under this protocol's name."""
  settings = gc.Gemma3Settings(results=str(tmp_path / "results"),
                               work=str(tmp_path / "work"))
  key = gc.RunKey("arc_easy", 8, "lora_pro", 1e-5)
  config = dataclasses.asdict(gc.run_config(settings, key))
  path = settings.results_dir / "runs" / f"{key.name}.json"
  # Where the run folder was, and fields the main job gained since, do not
  # make it another run.
  moved = {**config, "output_dir": "/elsewhere"}
  del moved["eval_examples"]
  gc._write(path, {"final_eval_loss": 2.0, "config": moved})
  assert gc.cached_run(settings, key)["final_eval_loss"] == 2.0

  gc._write(path, {"final_eval_loss": 2.0,
                   "config": {**config, "hparams": '{"scale": 2.0}'}})
  with pytest.raises(SystemExit, match=r"lora_pro-lr1e-05-s0\.json.*hparams"):
    gc.cached_run(settings, key)
  assert json.loads(config["hparams"])["mode"] == "efficient"


def test_invariance_curves_coincide_only_within_the_seed_spread():
  """Per optimizer and scale s, the invariance curve against s = 1's: its
  best rate (and the ratio to s = 1's), the largest held-out-loss
  difference at a rate both ran, up to s = 1's best rate and above it (a
  rate diverged on one curve only counts as infinite), the first steps'
  train-loss difference, and "coincides" only when the difference up to
  the best rate is inside the s = 1 seed spread."""
  settings = gc.Gemma3Settings(invariance_scales=(0.01, 1.0, 100.0),
                               invariance_optimizers=("adam", "lora_rite"))
  spread = {"mean": 2.0, "std": 0.004, "values": [1.996, 2.0, 2.004]}
  one = [[1e-5, 2.10], [1e-4, 1.99], [1e-3, 2.15]]
  found = {
      "tables": {"arc_easy/r8": {
          name: {"grid": one, "best_lr": 1e-4, "best_at_edge": False,
                 "eval_loss": spread} for name in ("adam", "lora_rite")}},
      "invariance": {
          "adam": {"0.01": [[1e-5, 2.18], [1e-4, 2.02], [1e-3, 1.99],
                            [3.16e-3, 2.2]],
                   "1": one,
                   "100": [[1e-6, 2.0], [1e-5, 2.3], [1e-4, None],
                           [1e-3, 8.0]]},
          "lora_rite": {"0.01": [[1e-5, 2.1000001], [1e-4, 1.99],
                                 [1e-3, 2.1530]],
                        "1": one}},
      "invariance_early": {"lora_rite": {
          "1": [[1e-5, [5.5, 4.8]], [1e-3, [5.5, 3.9]]],
          "0.01": [[1e-5, [5.5, 4.8000002]], [1e-3, [5.5, 3.9001]]]}}}
  shift = gc.invariance_shift(settings, found)
  small = shift["adam"]["0.01"]
  assert small["best_lr"] == 1e-3 and small["best_lr_ratio"] == 10
  assert small["stable_diff"] == pytest.approx(0.08)
  assert small["stable_lr"] == 1e-5 and small["verdict"] == "shifts"
  assert small["above_diff"] == pytest.approx(0.16)
  assert small["early_diff"] is None  # no train curves given
  large = shift["adam"]["100"]
  assert large["best_lr"] == 1e-6 and large["stable_diff"] == math.inf
  assert large["stable_lr"] == 1e-4 and large["verdict"] == "shifts"
  rite = shift["lora_rite"]["0.01"]
  assert rite["stable_diff"] == pytest.approx(1e-7)
  assert rite["above_diff"] == pytest.approx(0.003)
  assert rite["early_diff"] == pytest.approx(1e-4) and rite["early_lr"] == 1e-3
  assert rite["best_lr_ratio"] == 1 and rite["verdict"] == "coincides"
  assert "100" not in shift["lora_rite"] and "1" not in shift["adam"]
  said = gc.findings(settings, {**found, "longer": None})
  assert said == [
      "* arc_easy, rank 8: better than Adam: none; worse than Adam: none; "
      "level with it (within the seed spread): `lora_rite` (held-out loss, "
      "3 seeds).",
      "* Invariance, `adam`: against s = 1, s = 0.01 shifts, s = 100 shifts.",
      "* Invariance, `lora_rite`: against s = 1, s = 0.01 coincides."]
  # Without the s = 1 seeds there is no spread to judge by: numbers only.
  found["tables"]["arc_easy/r8"]["lora_rite"] = {"in_progress": one}
  assert gc.invariance_shift(settings, found)["lora_rite"]["0.01"][
      "verdict"] is None
  text = gc.markdown(settings, {**found, "tables": {}, "longer": None})
  assert "`adam`, s = 100: best rate 1e-06 (0.01x s = 1's)" in text
  assert "diverged on one only (at 0.0001) up to the best rate" in text
