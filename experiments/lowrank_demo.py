"""LoRA-adapt a frozen random MLP toward a teacher; LoRA-RITE vs Adam.

The teacher is the frozen base network plus a low-rank, badly conditioned
change of each layer's weight; the student is the same base with LoRA
adapters (``nnx.LoRALinear``, B-side zero init), trained with each optimizer
from the same initialisation. The losses are printed side by side. Runs on a
CPU in well under a minute::

    python experiments/lowrank_demo.py --steps 300
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rite_optax


class MLP(nnx.Module):
  """Two LoRA-adapted dense layers; only ``nnx.LoRAParam`` leaves train."""

  def __init__(self, d_in: int, hidden: int, d_out: int, rank: int,
               rngs: nnx.Rngs):
    self.l1 = nnx.LoRALinear(d_in, hidden, lora_rank=rank, rngs=rngs)
    self.l2 = nnx.LoRALinear(hidden, d_out, lora_rank=rank, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l2(jnp.tanh(self.l1(x)))


def low_rank_change(key: jax.Array, shape: tuple[int, int], rank: int,
                    cond: float) -> jax.Array:
  """``U diag(s) V^T`` with singular values spread over ``cond``."""
  ku, kv = jax.random.split(key)
  u, _ = jnp.linalg.qr(jax.random.normal(ku, (shape[0], rank)))
  v, _ = jnp.linalg.qr(jax.random.normal(kv, (shape[1], rank)))
  s = jnp.logspace(0, -np.log10(cond), rank)
  return (u * s) @ v.T


def make_problem(seed: int, d_in: int, hidden: int, d_out: int, rank: int,
                 cond: float, batch: int):
  """Returns ``(student_factory, x_train, y_train, x_test, y_test)``."""
  key = jax.random.PRNGKey(seed)
  k_model, k1, k2, k_x = jax.random.split(key, 4)
  teacher = MLP(d_in, hidden, d_out, rank, nnx.Rngs(k_model))
  teacher.l1.kernel[...] += 2.0 * low_rank_change(k1, (d_in, hidden), rank, cond)
  teacher.l2.kernel[...] += 2.0 * low_rank_change(k2, (hidden, d_out), rank, cond)
  x = jax.random.normal(k_x, (2 * batch, d_in))
  # The teacher's adapters are zero (B-side init), so it is base + change.
  y = teacher(x)

  def student() -> MLP:
    return MLP(d_in, hidden, d_out, rank, nnx.Rngs(k_model))

  return student, x[:batch], y[:batch], x[batch:], y[batch:]


def train(model: MLP, tx: optax.GradientTransformation, x, y, x_test, y_test,
          steps: int, eval_every: int):
  """The train step a user writes: nnx.Optimizer over nnx.LoRAParam."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    diff = nnx.DiffState(0, nnx.LoRAParam)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, x, y)
    optimizer.update(model, grads)
    return loss

  eval_loss = nnx.jit(loss_fn)
  history = []
  for step in range(steps + 1):
    if step % eval_every == 0:
      history.append((step, float(eval_loss(model, x_test, y_test))))
    if step < steps:
      train_step(model, optimizer, x, y)
  return history


def main(argv=None) -> dict[str, dict[float, list[tuple[int, float]]]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--eval-every", type=int, default=50)
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--cond", type=float, default=100.0,
                      help="condition number of the teacher's weight change")
  parser.add_argument("--lrs", type=float, nargs="+",
                      default=[0.005, 0.01, 0.02, 0.05, 0.1],
                      help="learning-rate grid, the same for every optimizer")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  student, x, y, x_test, y_test = make_problem(
      args.seed, d_in=64, hidden=128, d_out=32, rank=args.rank,
      cond=args.cond, batch=512)

  def optimizer(name: str, lr: float) -> optax.GradientTransformation:
    # The same cosine decay and gradient clipping for both.
    schedule = optax.cosine_decay_schedule(lr, max(args.steps, 1))
    inner = (rite_optax.lora_rite(schedule) if name == "LoRA-RITE"
             else optax.adam(schedule))
    return optax.chain(optax.clip_by_global_norm(1.0), inner)

  names = ["LoRA-RITE", "Adam"]
  runs = {name: {} for name in names}
  times = {name: 0.0 for name in names}
  for name in names:
    for lr in args.lrs:
      start = time.perf_counter()
      runs[name][lr] = train(student(), optimizer(name, lr), x, y, x_test,
                             y_test, args.steps, args.eval_every)
      times[name] += time.perf_counter() - start

  print(f"LoRA student (rank {args.rank}) of a teacher whose weight change "
        f"has condition number {args.cond:g}; held-out MSE")
  print(f"final loss per learning rate ({args.steps} steps, cosine decay):")
  print(f"{'lr':>8}" + "".join(f"{n:>14}" for n in names))
  for lr in args.lrs:
    print(f"{lr:>8g}" + "".join(f"{runs[n][lr][-1][1]:>14.3e}" for n in names))
  best = {n: min(runs[n], key=lambda lr: runs[n][lr][-1][1]) for n in names}
  print("curves at each optimizer's best learning rate:")
  print(f"{'step':>8}" + "".join(f"{n + ' ' + format(best[n], 'g'):>20}"
                                 for n in names))
  for i, (step, _) in enumerate(runs[names[0]][best[names[0]]]):
    print(f"{step:>8}" + "".join(f"{runs[n][best[n]][i][1]:>20.3e}"
                                 for n in names))
  print("wall time over the grid: " + ", ".join(
      f"{n} {times[n]:.1f}s" for n in names))
  return runs


if __name__ == "__main__":
  main()
