"""The synthetic setting of ``experiments/compare.py``: a known answer.

LoRA adaptation of a frozen random network toward a teacher whose weight
change is low rank and badly conditioned: the problem of
``experiments/lowrank_demo.py`` (:func:`lowrank_demo.make_problem`, reused
as is). The teacher is a frozen random two-layer tanh MLP plus, on each
layer, a rank-``rank`` change whose singular values span ``cond``; the
student is the same base with LoRA adapters of that rank (``lora_b`` zero),
so a student reaches the teacher exactly: **the attainable held-out loss is
0** (up to the float32 rounding of the teacher's stored weights).

Every optimizer of the registry is run on it, in float64, with the same
cosine decay and no gradient clipping (a global-norm clip depends on the
factorization: it would make every method depend on it; LoRA-RITE clips
its own unmagnified gradients, which does not):

* speed of convergence: held-out MSE after every step, at the best
  learning rate of a grid (the lowest mean final loss over the seeds);
* robustness to factor scaling: the same runs started from the transformed
  factorization ``(A S, B S^-T)`` (``cond(S) = start_cond``,
  :func:`rite_optax.invariance.transform_factors`), which is the same
  network. A transformation-invariant optimizer gives the same losses from
  both; the table reports the final loss of both starts at the standard
  start's best learning rate.

Each optimizer is compiled once: a run is one ``jax.jit`` call (a
``lax.scan`` over the steps), with the learning rate in the optimizer state
(``optax.inject_hyperparams``), so every (learning rate, seed, start) reuses
the same executable.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, Callable, Optional, Sequence

# See pretrain.py: one OpenMP/OpenBLAS thread, or concurrent eigh calls
# (Shampoo, LoRA-RITE) oversubscribe the cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lowrank_demo  # experiments/, beside this script
import rite_optax
from rite_optax import invariance
from rite_optax.train import sweep

# Per-optimizer learning-rate grids (half decades), each centred where the
# method converges on this problem; lora_plus' B side runs 16x faster, and
# scaled GD is plain gradient descent on preconditioned gradients.
ADAM_LIKE = [3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
DEFAULT_LRS: dict[str, list[float]] = {
    "adam": ADAM_LIKE,
    "adamw": ADAM_LIKE,
    "lamb": ADAM_LIKE,
    "shampoo": ADAM_LIKE,
    "lora_plus": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "scaled_gd": [1.0, 3.0, 10.0, 30.0, 100.0],
    "scaled_adamw": ADAM_LIKE,
    "lora_pro": ADAM_LIKE,
    "lora_rite": ADAM_LIKE,
}


@dataclasses.dataclass
class SyntheticSettings:
  """The synthetic comparison; every field is a flag of compare.py."""

  optimizers: Sequence[str] = tuple(rite_optax.OPTIMIZERS)
  lrs: Optional[dict[str, list[float]]] = None  # default DEFAULT_LRS
  steps: int = 300
  seeds: int = 3
  rank: int = 4  # of the teacher's change and of the student's adapters
  cond: float = 100.0  # condition number of the teacher's change
  start_cond: float = 1e3  # cond(S) of the transformed start
  d_in: int = 64
  hidden: int = 128
  d_out: int = 32
  batch: int = 512
  threshold: float = 1e-2  # "steps to reach threshold x initial loss"

  def grid(self, name: str) -> list[float]:
    return list((self.lrs or DEFAULT_LRS).get(name, DEFAULT_LRS.get(
        name, ADAM_LIKE)))


QUICK = dict(steps=100, seeds=2)
QUICK_LRS = 3  # the middle three of each grid


def hyperparameters(name: str) -> dict[str, Any]:
  # nnx.LoRALinear multiplies lora_a @ lora_b by nothing: LoRA-Pro's scale 1.
  return {"scale": 1.0} if name == "lora_pro" else {}


def make_optimizer(name: str, steps: int) -> optax.GradientTransformation:
  """``name`` with lowrank_demo's cosine decay, the peak learning rate in the
  state (``state.hyperparams["learning_rate"]``, set by
  :func:`rite_optax.train.sweep.with_lr`)."""
  return sweep.peak_lr_in_state(
      lambda schedule: rite_optax.get_optimizer(name, schedule,
                                                **hyperparameters(name)),
      optax.cosine_decay_schedule(1.0, max(steps, 1)))



class Problem:
  """One seed's teacher, data and student, split for a functional step."""

  def __init__(self, seed: int, settings: SyntheticSettings):
    with warnings.catch_warnings():
      # Under x64 the demo adds a float64 change to float32 kernels.
      warnings.simplefilter("ignore", FutureWarning)
      student, x, y, x_test, y_test = lowrank_demo.make_problem(
          seed, d_in=settings.d_in, hidden=settings.hidden,
          d_out=settings.d_out, rank=settings.rank, cond=settings.cond,
          batch=settings.batch)
    graphdef, lora, rest = nnx.split(student(), nnx.LoRAParam, ...)
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    self.graphdef = graphdef
    self.lora = f64(nnx.to_pure_dict(lora))
    self.rest = f64(nnx.to_pure_dict(rest))
    self.data = f64((x, y, x_test, y_test))
    self.seed = seed

  def transformed(self, cond: float) -> Any:
    """The factors ``(A S, B S^-T)``: the same network."""
    return invariance.transform_factors(
        self.lora, jax.random.PRNGKey(1000 + self.seed), cond)


def _mse(graphdef, lora, rest, x, y):
  model = nnx.merge(graphdef, lora, rest)
  return jnp.mean((model(x) - y) ** 2)


class Runner:
  """One optimizer, compiled once, run from any factors at any lr."""

  def __init__(self, name: str, settings: SyntheticSettings,
               graphdef: nnx.GraphDef):
    self.name = name
    self.steps = settings.steps
    self.tx = make_optimizer(name, settings.steps)
    tx, steps = self.tx, settings.steps
    mse = lambda lora, rest, x, y: _mse(graphdef, lora, rest, x, y)

    def run(lora, rest, opt_state, x, y, x_test, y_test):
      def step(carry, _):
        lora, opt_state = carry
        grads = jax.grad(mse)(lora, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        return (lora, opt_state), mse(lora, rest, x_test, y_test)

      initial = mse(lora, rest, x_test, y_test)
      _, curve = jax.lax.scan(step, (lora, opt_state), None, length=steps)
      return jnp.concatenate([initial[None], curve])

    self._init = jax.jit(tx.init)
    self._run = jax.jit(run)
    self.compile_s = 0.0

  def run(self, problem: Problem, lora: Any, lr: float) -> np.ndarray:
    """Held-out MSE at steps ``0..steps`` (one host sync)."""
    start = time.perf_counter()
    opt_state = sweep.with_lr(self._init(lora), lr)
    curve = self._run(lora, problem.rest, opt_state, *problem.data)
    curve = np.asarray(jax.device_get(curve), np.float64)
    if not self.compile_s:
      self.compile_s = time.perf_counter() - start
    return curve


def steps_to(curve: np.ndarray, fraction: float) -> Optional[int]:
  """First step whose loss is ``<= fraction * curve[0]``; None if never."""
  hits = np.nonzero(curve <= fraction * curve[0])[0]
  return int(hits[0]) if len(hits) else None


def run_synthetic(settings: SyntheticSettings,
                  log: Callable[[str], None] = lambda msg: None
                  ) -> dict[str, Any]:
  """Every optimizer over its grid, all seeds, both starts."""
  with jax.enable_x64(True):
    problems = [Problem(seed, settings) for seed in range(settings.seeds)]
    starts = {"standard": [p.lora for p in problems],
              "transformed": [p.transformed(settings.start_cond)
                              for p in problems]}
    results = {}
    for name in settings.optimizers:
      began = time.perf_counter()
      runner = Runner(name, settings, problems[0].graphdef)
      grid = []
      curves = {}
      for lr in settings.grid(name):
        entry = {"lr": lr}
        for start, factors in starts.items():
          runs = [runner.run(p, f, lr) for p, f in zip(problems, factors)]
          curves[start, lr] = runs
          entry[start] = sweep.stats([c[-1] for c in runs])
        grid.append(entry)
      best = sweep.best_index([e["standard"]["mean"] for e in grid])
      best_lr = grid[best]["lr"]
      per_start = {}
      for start in starts:
        runs = curves[start, best_lr]
        mean_curve = np.mean(np.stack(runs), axis=0)
        per_start[start] = {
            "final_loss": sweep.stats([c[-1] for c in runs]),
            "initial_loss": float(np.mean([c[0] for c in runs])),
            "steps_to_threshold": [steps_to(c, settings.threshold)
                                   for c in runs],
            "mean_curve": [float(v) if np.isfinite(v) else None
                           for v in mean_curve],
        }
      gap = max(float(np.max(np.abs(a - b)) / a[0]) for a, b in zip(
          curves["standard", best_lr], curves["transformed", best_lr]))
      results[name] = {
          "best_lr": best_lr,
          "best_lr_at_grid_edge": best in (0, len(grid) - 1),
          "grid": grid,
          "starts": per_start,
          "max_curve_gap": gap,  # max over steps, seeds of |L_std - L_tr| / L0
          "compile_s": runner.compile_s,
          "time_s": time.perf_counter() - began,
      }
      log(f"  {name:>12}: best lr {best_lr:g}, final loss "
          f"{per_start['standard']['final_loss']['mean']} (standard) / "
          f"{per_start['transformed']['final_loss']['mean']} (transformed), "
          f"{results[name]['time_s']:.1f}s")
  return results
