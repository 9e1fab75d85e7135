"""Measure each optimizer's transformation invariance with invariance_gap.

Runs every optimizer of the registry from ``(A, B)`` and ``(A S, B S^-T)``,
``cond(S) = 1e4``, in float64, and prints the largest relative drift of the
products over the steps. ``--emulate`` instead runs the invariant optimizers
in float32 with every matrix product's operands rounded as a TPU or a GPU
rounds them at the product's precision
(:func:`rite_optax.linalg.emulate_precision`), for each ``precision=``
setting: what the precision buys on the hardware, measured on a CPU. Usage::

    python experiments/invariance_table.py [--steps 50]
    python experiments/invariance_table.py --emulate [--steps 50]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rite_optax
from rite_optax import invariance

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


# (label, precision= argument, override of every product's precision): the
# first row is the library before issue 18, which passed no precision.
EMULATED = [
    ("none passed (before)", None, jax.lax.Precision.DEFAULT),
    ("DEFAULT", "default", None),
    ("HIGH", "high", None),
    ("(HIGHEST, HIGH)", ("highest", "high"), None),
    ("HIGHEST (the default)", None, None),
]
# Scaled GD (reg = 0) is left out: in float32 its Cholesky of B.T B fails at
# cond(S) = 1e4 whatever the precision (NaN from the first steps on a CPU).
INVARIANT = {"lora_rite": dict(learning_rate=1e-2)}


def measure_emulated(steps: int = 50, cond: float = 1e4,
                     platforms=("tpu", "gpu")) -> dict[tuple[str, str, str],
                                                        float]:
  """Float32 invariance gap per (optimizer, precision label, platform)."""
  params = jax.tree.map(lambda x: x.astype(jnp.float32), problem())
  gaps = {}
  for name, hp in INVARIANT.items():
    hp = dict(hp)
    lr = hp.pop("learning_rate")
    for label, precision, override in EMULATED:
      kw = dict(hp) if precision is None else dict(hp, precision=precision)
      tx = rite_optax.get_optimizer(name, lr, **kw)
      for platform in platforms:
        emulated = optax.GradientTransformation(
            tx.init, rite_optax.linalg.emulate_precision(tx.update, platform,
                                                          override))
        gaps[name, label, platform] = rite_optax.invariance_gap(
            emulated, params, steps=steps, cond=cond)
  return gaps


def main_emulated(steps: int, cond: float):
  gaps = measure_emulated(steps, cond)
  bound = float(jnp.finfo(jnp.float32).eps) * cond * np.sqrt(steps)
  print(f"float32 invariance gap, {steps} steps, cond(S) = {cond:g}; the "
        f"float32 test's bound eps32 cond sqrt(steps) = {bound:.1e}")
  print("| precision= | " + " | ".join(
      f"`{n}` {p.upper()}" for n in INVARIANT for p in ("tpu", "gpu")) + " |")
  print("| --- |" + " ---: |" * (2 * len(INVARIANT)))
  for label, _, _ in EMULATED:
    cells = [gaps[n, label, p] for n in INVARIANT for p in ("tpu", "gpu")]
    print(f"| {label} | " + " | ".join(
        f"{g:.1e}" + ("" if g <= bound else " (fails)") for g in cells)
          + " |")
  return gaps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--cond", type=float, default=1e4)
  parser.add_argument("--emulate", action="store_true",
                      help="float32 on emulated TPU / GPU products, per "
                      "precision")
  args = parser.parse_args(argv)
  if args.emulate:
    return main_emulated(args.steps, args.cond)
  gaps = measure(args.steps, args.cond)
  print(f"| optimizer | invariance gap ({args.steps} steps, cond(S) = "
        f"{args.cond:g}, float64) |")
  print("| --- | --- |")
  for label, gap in gaps.items():
    print(f"| `{label}` | {gap:.1e} |")
  return gaps


if __name__ == "__main__":
  main()
