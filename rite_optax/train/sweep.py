"""Learning-rate sweeps: one compiled step for every rate, and the statistics
that pick the best one.

A sweep runs the same optimizer at many peak learning rates (and seeds).
Compiling a step per rate would dominate a CPU-sized sweep, so the peak rate
lives in the optimizer state (``optax.inject_hyperparams``) and multiplies a
unit schedule: :func:`peak_lr_in_state` builds the optimizer once,
:func:`with_lr` sets the rate of a fresh state. :func:`stats` and
:func:`best_index` are the summary and the choice, with a diverged run
(non-finite loss) never the best.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def peak_lr_in_state(
    make: Callable[[optax.Schedule], optax.GradientTransformation],
    unit_schedule: optax.Schedule) -> optax.GradientTransformation:
  """``make(lambda count: lr * unit_schedule(count))`` with ``lr`` in the
  state, ``state.hyperparams["learning_rate"]`` (1.0 until :func:`with_lr`).

  Args:
    make: builds the optimizer from its learning-rate schedule.
    unit_schedule: the schedule's shape, peaking at 1.
  """

  def factory(learning_rate):
    return make(lambda count: learning_rate * unit_schedule(count))

  return optax.inject_hyperparams(factory)(learning_rate=1.0)


def with_lr(opt_state, lr: float):
  """``opt_state`` of :func:`peak_lr_in_state` with peak rate ``lr`` (placed
  as the old value was: the step is not recompiled)."""
  current = opt_state.hyperparams["learning_rate"]
  value = jnp.asarray(lr, current.dtype)
  if isinstance(current, jax.Array):
    value = jax.device_put(value, current.sharding)
  return opt_state._replace(
      hyperparams={**opt_state.hyperparams, "learning_rate": value})


def is_finite(x: Any) -> bool:
  """A number that is not None, nan or inf."""
  return x is not None and math.isfinite(float(x))


def stats(values: Sequence[Optional[float]]) -> dict[str, Any]:
  """``values`` (non-finite ones as None), their mean and sample std; mean
  and std are None if any value is not finite (a seed diverged)."""
  vals = [float(v) if is_finite(v) else None for v in values]
  if vals and all(v is not None for v in vals):
    arr = np.asarray(vals)
    return {"values": vals, "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}
  return {"values": vals, "mean": None, "std": None}


def best_index(scores: Sequence[Optional[float]]) -> int:
  """argmin with non-finite (diverged) scores last; ties to the first."""
  keyed = [float(s) if is_finite(s) else math.inf for s in scores]
  return int(np.argmin(keyed))
