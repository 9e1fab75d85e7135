"""Measure each optimizer's transformation invariance with invariance_gap.

Runs every optimizer of the registry from ``(A, B)`` and ``(A S, B S^-T)``,
``cond(S) = 1e4``, in float64, and prints the largest relative drift of the
products over the steps. Usage::

    python experiments/invariance_table.py [--steps 50]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rite_optax

# Learning rates at which every method makes real progress on the problem
# below; the gap is a property of the method, not of the rate.
SETTINGS = {
    "adam": dict(learning_rate=1e-2),
    "adamw": dict(learning_rate=1e-2),
    "lamb": dict(learning_rate=1e-2),
    "shampoo": dict(learning_rate=1e-2),
    "lora_plus": dict(learning_rate=1e-3),
    "scaled_gd": dict(learning_rate=0.5, reg=0.0),
    "scaled_adamw": dict(learning_rate=1e-2),
    "lora_pro": dict(learning_rate=1e-2, scale=1.0),
    "lora_pro (efficient)": dict(learning_rate=1e-2, scale=1.0,
                                 mode="efficient"),
    "lora_rite": dict(learning_rate=1e-2),
}


def problem(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {f"layer_{i}": {"lora_a": jnp.asarray(rng.standard_normal((m, r))),
                         "lora_b": jnp.asarray(rng.standard_normal((r, n)))}
          for i, (m, n, r) in enumerate([(16, 12, 4), (10, 14, 2)])}


def measure(steps: int = 50, cond: float = 1e4) -> dict[str, float]:
  gaps = {}
  with jax.enable_x64(True):
    params = problem()
    for label, hp in SETTINGS.items():
      hp = dict(hp)
      name = label.split(" ")[0]
      tx = rite_optax.get_optimizer(name, hp.pop("learning_rate"), **hp)
      gaps[label] = rite_optax.invariance_gap(tx, params, steps=steps, cond=cond)
  return gaps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--cond", type=float, default=1e4)
  args = parser.parse_args(argv)
  gaps = measure(args.steps, args.cond)
  print(f"| optimizer | invariance gap ({args.steps} steps, cond(S) = "
        f"{args.cond:g}, float64) |")
  print("| --- | --- |")
  for label, gap in gaps.items():
    print(f"| `{label}` | {gap:.1e} |")
  return gaps


if __name__ == "__main__":
  main()
