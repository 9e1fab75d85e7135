"""Every optimizer of the registry against optax.adam: step time, state, traffic.

On the LoRA tree of Gemma 2B (18 layers; q, k, v, o and the MLP's gate, up
and down projections; Flax NNX layout ``lora_a (in, r)``, ``lora_b (r, out)``
under ``params['layers'][i]['attn' | 'mlp'][name]``; float32), for each rank:

* update time: ``jax.jit(tx.update, donate_argnums=1)`` of the optimizer and
  of ``optax.adam`` in the same process, called alternately (so that both see
  the same machine load), ``block_until_ready`` after each call; the ratio of
  the medians. An optimizer whose state for the whole tree exceeds
  ``--state-budget-gb``, or ``--max-state-vs-adam`` times Adam's (LoRA-Pro's
  full mode keeps ``(m, n)`` moments per adapter, Shampoo ``256 x 256``
  blocks), or whose update would take over ``--max-step-seconds``, is timed
  against Adam on the first layers only, and says so.
* bytes accessed and flops of the compiled update (XLA's ``cost_analysis``:
  machine-independent, what decides a memory-bound TPU / GPU update) and its
  compile seconds, each over Adam's on the same tree. Shampoo, whose inverse
  roots are recomputed every ``--shampoo-every`` steps, is timed over whole
  cycles of that many steps: the amortised step, the step that recomputes
  the roots and the statistics-only step, each over Adam's.
* state bytes of ``tx.init`` (from ``jax.eval_shape``: nothing is allocated).
* collectives: the update compiled with every factor split along its long
  axis (rows of ``lora_a``, columns of ``lora_b``) over 8 devices, the state
  placed by :func:`rite_optax.train.step.opt_state_shardings`; the number of
  collective ops in the compiled HLO, the largest array one of them carries
  (elements), and whether any of them moves (gathers, permutes) rather than
  reduces data. Run in a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` when this process
  has fewer devices.

and the time of a whole fine-tuning step (forward, backward and update,
:func:`rite_optax.train.step.make_train_step`) of a small Gemma with LoRA on
every projection, LoRA-RITE over Adam.

Everything runs with one LAPACK / BLAS thread
(:func:`rite_optax.linalg.limit_lapack_threads`; ``--lapack-threads 0`` leaves
LAPACK's own default): the batched ``eigh`` of small matrices gains nothing
from threads, and on a small CPU they compete with XLA's for the cores.

Then every target of the performance issue (:data:`TARGETS`) is printed
with its measured value and whether it is met; ``bench.md`` has the table.

Writes ``bench.json`` and ``bench.md`` to ``--out`` (default
``docs/results/bench``). Usage::

    python experiments/bench_optimizers.py            # the full run
    python experiments/bench_optimizers.py --quick    # < 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rite_optax
from rite_optax.models import gemma
from rite_optax.models import inject_lora
from rite_optax.models import lora as lora_lib
from rite_optax.models import sharding as sharding_lib
from rite_optax.train import step as step_lib

LEARNING_RATE = 1e-3
# Optimizers by label; LoRA-Pro needs its adapter scale (the bench's trees
# have none that matters: 1.0).
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (name, {"scale": 1.0} if name == "lora_pro" else {})
    for name in rite_optax.OPTIMIZERS
}
OPTIMIZERS["lora_pro (efficient)"] = ("lora_pro", {"scale": 1.0,
                                                   "mode": "efficient"})
# Its Pallas kernels run interpreted on a CPU: only its bytes are measured
# (fused_bytes), neither its time nor its collectives.
OPTIMIZERS["lora_rite (fused)"] = ("lora_rite", {"fused": True})
OPTIMIZERS["lora_pro (efficient, fused)"] = (
    "lora_pro", {"scale": 1.0, "mode": "efficient", "fused": True})
KERNEL_ONLY = ("lora_rite (fused)", "lora_pro (efficient, fused)")
# Collective ops that move (parts of) arrays between devices; all-reduce
# reduces them.
MOVING = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter",
          "ragged-all-to-all", "collective-broadcast")


def make_optimizer(label: str, **extra: Any) -> optax.GradientTransformation:
  name, hparams = OPTIMIZERS[label]
  return rite_optax.get_optimizer(name, LEARNING_RATE, **hparams, **extra)


# ------------------------------------------------------------- the LoRA tree


def gemma_2b_lora_shapes(rank: int, layers: int = 18) -> Any:
  """The trainable tree of Gemma 2B with LoRA on every projection, abstract:
  the model's own ``nnx.LoRAParam`` state, built by ``nnx.eval_shape``."""
  def build():
    model = gemma.Gemma(gemma.gemma_2b(num_layers=layers), rngs=nnx.Rngs(0))
    inject_lora(model, rank, float(rank), gemma.lora_targets(), nnx.Rngs(1))
    return model
  abstract = nnx.eval_shape(build)
  return nnx.to_pure_dict(nnx.state(abstract, lora_lib.TRAINABLE))


def random_like(shapes: Any, seed: int, scale: float) -> Any:
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)])


def state_bytes(tx: optax.GradientTransformation, shapes: Any) -> int:
  return sum(x.size * x.dtype.itemsize
             for x in jax.tree.leaves(jax.eval_shape(tx.init, shapes)))


# ---------------------------------------------------------------- update time


def _compiled_update(tx, params, grads):
  """The jitted update (state donated), its state, and what XLA says of it:
  compile seconds, bytes accessed and flops (``cost_analysis``)."""
  update = jax.jit(tx.update, donate_argnums=1)
  state = tx.init(params)
  start = time.perf_counter()
  compiled = update.lower(grads, state, params).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return update, state, dict(compile_s=compile_s,
                             bytes=float(cost.get("bytes accessed", np.nan)),
                             flops=float(cost.get("flops", np.nan)),
                             **kernel_counts(compiled.as_text()))


def kernel_counts(hlo: str) -> dict[str, int]:
  """The fused computations of a compiled module, and how many of them are
  distinct once names are set aside: XLA:CPU compiles one kernel per
  distinct computation (identical ones share it), which is where its
  compile time goes."""
  bodies = []
  for block in re.split(r"\n\s*\n", hlo):
    lines = block.strip().splitlines()
    if not lines or not re.match(r"%?\w*fused", lines[0]):
      continue
    body = re.sub(r"%[\w.\-]+", "%", "\n".join(lines[1:]))
    bodies.append(re.sub(r", metadata=\{[^}]*\}", "", body))
  return dict(fusions=len(bodies), distinct_kernels=len(set(bodies)))


def fused_bytes(label: str, shapes: Any) -> dict[str, Any]:
  """Bytes accessed of an update with Pallas kernels, over Adam's.

  XLA's ``cost_analysis`` cannot see into a kernel (interpreted here, a
  custom call on TPU / GPU), so the update is compiled with each
  ``pallas_call`` as an opaque call of the same operands and results: XLA's
  count for the rest, plus each kernel's operands read once and results
  written once, which is what :func:`rite_optax.fused.factor_pass`'s block
  specs move (each block of each operand once per grid step).
  """
  from unittest import mock  # the kernels swapped for this count only
  from jax.experimental import pallas as pl
  params = random_like(shapes, 0, 0.02)
  grads = random_like(shapes, 1, 1e-3)
  kernels = []

  def opaque_call(kernel, *, out_shape, **_):
    def call(*operands):
      kernels.append(sum(x.size * x.dtype.itemsize for x in operands)
                     + sum(int(np.prod(o.shape)) * o.dtype.itemsize
                           for o in out_shape))
      return jax.pure_callback(lambda *a: None, list(out_shape), *operands)
    return call

  with mock.patch.object(pl, "pallas_call", opaque_call):
    _, _, cost = _compiled_update(make_optimizer(label), params, grads)
  _, _, adam = _compiled_update(optax.adam(LEARNING_RATE), params, grads)
  # Each opaque call counts -1 in XLA's total (its unknown cost).
  total = cost["bytes"] + len(kernels) + sum(kernels)
  return dict(bytes=total, adam_bytes=adam["bytes"],
              bytes_ratio=total / adam["bytes"], kernels=len(kernels),
              kernel_bytes=float(sum(kernels)))


WARMUP = 2  # untimed calls before the timed ones


def time_against_adam(label: str, shapes: Any, reps: int, cycle: int = 1,
                      hparams: Optional[dict[str, Any]] = None
                      ) -> dict[str, Any]:
  """Median update times of ``label`` and Adam, called alternately, and the
  ratios of their compile times, bytes accessed and flops.

  An optimizer whose warm step takes over 5 s gets 3 repetitions. With
  ``cycle > 1`` each repetition is ``cycle`` consecutive steps (``hparams``
  setting Shampoo's ``precondition_every=cycle``: one of them recomputes the
  roots), and the result adds the amortised step, the step that recomputes
  the roots and the statistics-only step.
  """
  params = random_like(shapes, 0, 0.02)
  grads = random_like(shapes, 1, 1e-3)
  runs = {}
  for name, tx in (("adam", optax.adam(LEARNING_RATE)),
                   (label, make_optimizer(label, **(hparams or {})))):
    update, state, cost = _compiled_update(tx, params, grads)
    for _ in range(WARMUP):  # the second call reuses donated buffers
      start = time.perf_counter()
      updates, state = update(grads, state, params)
      jax.block_until_ready((updates, state))
    if time.perf_counter() - start > 5:
      reps = min(reps, 3)
    runs[name] = dict(update=update, state=state, times=[], cost=cost)
  for _ in range(reps):
    for run in runs.values():
      for _ in range(cycle):
        start = time.perf_counter()
        updates, run["state"] = run["update"](grads, run["state"], params)
        jax.block_until_ready((updates, run["state"]))
        run["times"].append(time.perf_counter() - start)
  adam_ms = 1e3 * statistics.median(runs["adam"]["times"])
  ms = 1e3 * statistics.median(runs[label]["times"])
  mine, adam = runs[label]["cost"], runs["adam"]["cost"]
  result = dict(ms=ms, adam_ms=adam_ms, ratio=ms / adam_ms, reps=reps,
                compile_s=mine["compile_s"], adam_compile_s=adam["compile_s"],
                compile_ratio=mine["compile_s"] / adam["compile_s"],
                bytes=mine["bytes"], adam_bytes=adam["bytes"],
                bytes_ratio=mine["bytes"] / adam["bytes"],
                flops_ratio=mine["flops"] / adam["flops"],
                fusions=mine["fusions"], adam_fusions=adam["fusions"],
                distinct_kernels=mine["distinct_kernels"],
                adam_distinct_kernels=adam["distinct_kernels"])
  if cycle > 1:
    # Each repetition is a whole cycle: one step recomputes the roots (the
    # one at a count divisible by `cycle`, after the warm-up's steps), the
    # others only update the statistics.
    times = np.asarray(runs[label]["times"]).reshape(reps, cycle)
    root = -WARMUP % cycle
    result.update(
        amortised_ms=1e3 * float(np.median(times.mean(axis=1))),
        root_step_ms=1e3 * float(np.median(times[:, root])),
        statistics_step_ms=1e3 * float(np.median(
            np.delete(times, root, axis=1))),
        cycle=cycle)
    for key in ("amortised", "root_step", "statistics_step"):
      result[f"{key}_ratio"] = result[f"{key}_ms"] / adam_ms
  return result


def _seconds_per_layer(label: str, rank: int) -> float:
  """One warm update of ``label`` on one layer's LoRA tree, in seconds."""
  shapes = gemma_2b_lora_shapes(rank, 1)
  params, grads = random_like(shapes, 0, 0.02), random_like(shapes, 1, 1e-3)
  update, state, _ = _compiled_update(make_optimizer(label), params, grads)
  updates, state = update(grads, state, params)
  jax.block_until_ready((updates, state))
  start = time.perf_counter()
  jax.block_until_ready(update(grads, state, params))
  return time.perf_counter() - start


def layers_that_fit(label: str, rank: int, layers: int,
                    budget_bytes: float) -> int:
  """The most layers (<= ``layers``) whose state fits in the budget."""
  per_layer = state_bytes(make_optimizer(label),
                          gemma_2b_lora_shapes(rank, 1))
  return int(max(0, min(layers, budget_bytes // per_layer)))


# ---------------------------------------------------------------- collectives


def _mesh8():
  return jax.make_mesh((8,), ("rows",), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,))


def _long_axis_specs(shapes: Any) -> Any:
  """Rows of ``lora_a (in, r)``, columns of ``lora_b (r, out)``."""
  P = jax.sharding.PartitionSpec
  def spec(path, leaf):
    name = path[-1].key
    return P("rows", None) if name == "lora_a" else P(None, "rows")
  return jax.tree_util.tree_map_with_path(spec, shapes)


def collectives_in(hlo: str) -> list[tuple[str, int]]:
  """``(op, largest array of its result in elements)`` per collective."""
  found = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) ([a-z\-]+)\(", line)
    if not m:
      continue
    result, op = m.groups()
    if op.endswith("-done"):
      continue
    op = op.removesuffix("-start")
    if op not in MOVING + ("all-reduce",):
      continue
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
             for dims in re.findall(r"\w+\[([\d,]*)\]", result)]
    found.append((op, max(sizes, default=0)))
  return found


def sharded_collectives(label: str, rank: int, layers: int) -> dict[str, Any]:
  """Compile the update on 8 devices (needs them) and count collectives."""
  shapes = gemma_2b_lora_shapes(rank, layers)
  mesh = _mesh8()
  named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  param_sh = jax.tree.map(named, _long_axis_specs(shapes),
                          is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  tx = make_optimizer(label)
  state_sh = step_lib.opt_state_shardings(tx, shapes, param_sh)
  update = jax.jit(tx.update, in_shardings=(param_sh, state_sh, param_sh),
                   out_shardings=(param_sh, state_sh))
  start = time.perf_counter()
  hlo = update.lower(shapes, jax.eval_shape(tx.init, shapes),
                     shapes).compile().as_text()
  ops = collectives_in(hlo)
  moving = [size for op, size in ops if op in MOVING]
  return dict(count=len(ops), max_elements=max((s for _, s in ops), default=0),
              moving=len(moving), max_moving_elements=max(moving, default=0),
              kinds=sorted({op for op, _ in ops}),
              compile_s=time.perf_counter() - start)


def collectives_table(labels, ranks, layers) -> dict[str, Any]:
  """:func:`sharded_collectives` for every label and rank, in this process
  if it has 8 devices, else in a subprocess that has."""
  if jax.device_count() >= 8:
    return {f"{label}|{rank}": sharded_collectives(label, rank, layers)
            for rank in ranks for label in labels}
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  request = json.dumps(dict(labels=list(labels), ranks=list(ranks),
                            layers=layers))
  done = subprocess.run([sys.executable, __file__, "--collectives-worker",
                         request], env=env, capture_output=True, text=True,
                        check=False)
  if done.returncode:
    raise RuntimeError(f"collectives subprocess failed:\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------- train step


@dataclasses.dataclass(frozen=True)
class TrainBench:
  """A Gemma small enough for a CPU, big enough that forward and backward
  dominate the step: about 19M parameters outside the embedding."""

  layers: int = 4
  d_model: int = 512
  mlp_dim: int = 3072
  vocab: int = 4096
  batch: int = 8
  seq: int = 128
  rank: int = 16


def train_step_ratio(bench: TrainBench, reps: int) -> dict[str, Any]:
  """Median time of a full train step with LoRA-RITE and with Adam."""
  config = gemma.GemmaConfig(
      num_layers=bench.layers, d_model=bench.d_model, num_heads=8,
      num_kv_heads=1, head_dim=bench.d_model // 8, mlp_dim=bench.mlp_dim,
      vocab_size=bench.vocab)
  mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, bench.vocab, (bench.batch, bench.seq), np.int32)
  batch = {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
           "loss_mask": np.ones((bench.batch, bench.seq), np.float32),
           "attention_mask": np.ones((bench.batch, bench.seq), bool)}
  runs = {}
  for label, tx in (("adam", optax.adam(LEARNING_RATE)),
                    ("lora_rite", rite_optax.lora_rite(LEARNING_RATE))):
    model = gemma.Gemma(config, rngs=nnx.Rngs(0))
    inject_lora(model, bench.rank, float(bench.rank), gemma.lora_targets(),
                nnx.Rngs(1))
    setup = step_lib.create_train_state(model, tx, mesh)
    step = step_lib.make_train_step(setup.graphdef, tx, mesh, setup.shardings,
                                    compute_dtype=jnp.float32)
    state = setup.state
    for _ in range(2):
      state, metrics = step(setup.frozen, state, batch)
      jax.block_until_ready(metrics)
    runs[label] = dict(step=step, frozen=setup.frozen, state=state, times=[])
  lora_params = sum(x.size for x in jax.tree.leaves(runs["adam"]["state"].params))
  frozen_params = sum(x.size for x in jax.tree.leaves(runs["adam"]["frozen"]))
  for _ in range(reps):
    for run in runs.values():
      start = time.perf_counter()
      run["state"], metrics = run["step"](run["frozen"], run["state"], batch)
      jax.block_until_ready((run["state"], metrics))
      run["times"].append(time.perf_counter() - start)
  adam_ms = 1e3 * statistics.median(runs["adam"]["times"])
  ms = 1e3 * statistics.median(runs["lora_rite"]["times"])
  return dict(ms=ms, adam_ms=adam_ms, ratio=ms / adam_ms, reps=reps,
              config=dataclasses.asdict(bench), lora_params=lora_params,
              frozen_params=frozen_params)


# ------------------------------------------------------------------ targets

# (optimizer, ranks or None for all, measure, limit, what is measured). The
# targets of the performance issue: ratios to optax.adam in one process.
TARGETS = (
    ("lora_rite", (4, 16), "bytes_ratio", 1.5, "bytes accessed"),
    ("lora_rite", (64,), "bytes_ratio", 2.0, "bytes accessed"),
    ("lora_rite (fused)", (4, 16), "bytes_ratio", 1.5, "bytes accessed"),
    ("lora_rite (fused)", (64,), "bytes_ratio", 2.0, "bytes accessed"),
    ("scaled_gd", None, "bytes_ratio", 1.5, "bytes accessed"),
    ("scaled_adamw", None, "bytes_ratio", 1.5, "bytes accessed"),
    ("lora_pro (efficient)", None, "bytes_ratio", 1.5, "bytes accessed"),
    ("lora_pro (efficient, fused)", None, "bytes_ratio", 1.5,
     "bytes accessed"),
    ("lora_rite", (4, 16), "ratio", 2.0, "update time"),
    ("lora_rite", (64,), "ratio", 4.0, "update time"),
    ("scaled_gd", None, "ratio", 1.5, "update time"),
    ("scaled_adamw", None, "ratio", 1.5, "update time"),
    ("lora_pro (efficient)", None, "ratio", 2.5, "update time"),
    ("shampoo", None, "amortised_ratio", 5.0, "amortised update time"),
    ("shampoo", None, "statistics_step_ratio", 2.0,
     "statistics-only update time"),
    ("lora_rite", None, "compile_ratio", 2.0, "compile time"),
    ("lora_rite", None, "moving", 0, "moving collectives"),
    ("scaled_gd", None, "moving", 0, "moving collectives"),
    ("scaled_adamw", None, "moving", 0, "moving collectives"),
)
# Measures that only count on the whole tree (the issue's "full 18-layer
# tree", "126-adapter tree"): a row timed on fewer layers says so.
WHOLE_TREE = ("ratio", "amortised_ratio", "statistics_step_ratio",
              "compile_ratio")


def target_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Every target that the results measure, with its value and verdict."""
  out = []
  full = results["meta"]["layers"]
  for label, ranks, key, limit, what in TARGETS:
    for row in results["rows"]:
      if row["label"] != label or (ranks and row["rank"] not in ranks):
        continue
      source = (row.get("collectives") if key == "moving"
                else row.get("time")) or {}
      if key not in source:
        continue
      value = source[key]
      layers = row.get("timed_layers", full)
      partial = key in WHOLE_TREE and layers < full
      out.append(dict(
          label=label, rank=row["rank"], measure=what, key=key, limit=limit,
          value=value, met=bool(value <= limit) and not partial,
          note=f"on {layers} of {full} layers" if partial else ""))
  return out


def _target_words(t: dict[str, Any]) -> tuple[str, str]:
  """A target's measure (``/ Adam's`` for a ratio) and its value, printed."""
  versus = "" if t["key"] == "moving" else " / Adam's"
  value = (f"{t['value']:d}" if isinstance(t["value"], int)
           else f"{t['value']:.2f}")
  return t["measure"] + versus, value


def _fmt_target(t: dict[str, Any]) -> str:
  measure, value = _target_words(t)
  verdict = "met" if t["met"] else "NOT met"
  note = f" ({t['note']})" if t["note"] else ""
  return (f"{t['label']} r={t['rank']} {measure} <= "
          f"{t['limit']}: {value} {verdict}{note}")


# ---------------------------------------------------------------------- main


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
    n /= 1024
  return str(n)


def markdown(results: dict[str, Any]) -> str:
  meta = results["meta"]
  lines = [
      "# Optimizer benchmark",
      "",
      f"`{meta['command']}` on {meta['machine']}, JAX {meta['jax']}, "
      f"{meta['layers']} layers of Gemma 2B's LoRA tree (float32), "
      f"{meta['reps']} alternating repetitions, medians; LAPACK threads: "
      f"{meta.get('lapack_threads', 'default')}.",
      "",
      "Update time is the optimizer's jitted update (state donated) over "
      "optax.adam's, in the same process. Bytes and compile: XLA's "
      "`cost_analysis()` bytes accessed of the compiled update, and its "
      "compile seconds, over Adam's on the same tree (in brackets, the "
      "distinct kernels XLA compiled for it and for Adam: XLA:CPU compiles "
      "one per distinct fused computation). State is `tx.init`'s "
      "bytes, and its ratio to Adam's. Collectives: the update compiled with "
      "every factor "
      "split along its long axis over 8 devices; count, the largest array "
      "one carries (elements), and how many move data rather than "
      "all-reduce it.",
      "",
  ]
  for rank in meta["ranks"]:
    lines += [f"## r = {rank}", "",
              "| optimizer | update ms | Adam ms | ratio | bytes | compile "
              "| state | vs Adam | collectives | largest (elements) | moving "
              "| note |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: | ---: | --- |"]
    for row in results["rows"]:
      if row["rank"] != rank:
        continue
      t = row.get("time") or {}
      c = row.get("collectives") or {}
      if row["label"] == "adam":
        timing = "- | - | 1 (reference) | 1 | 1"
      elif t and "ms" not in t:
        timing = f"- | - | - | {t['bytes_ratio']:.2f} | -"
      elif t:
        compile_cell = (f"{t['compile_ratio']:.2f} ({t['distinct_kernels']}"
                        f" / {t['adam_distinct_kernels']})")
        timing = (f"{t['ms']:.1f} | {t['adam_ms']:.1f} | **{t['ratio']:.2f}**"
                  f" | {t['bytes_ratio']:.2f} | {compile_cell}")
        if "amortised_ratio" in t:
          timing = (f"{t['ms']:.1f} | {t['adam_ms']:.1f} | **"
                    f"{t['amortised_ratio']:.2f}** amortised over "
                    f"{t['cycle']} (roots {t['root_step_ratio']:.1f}, "
                    f"statistics {t['statistics_step_ratio']:.1f}) | "
                    f"{t['bytes_ratio']:.2f} | {compile_cell}")
      else:
        timing = "- | - | - | - | -"
      coll = (f"{c['count']} | {c['max_elements']} | {c['moving']}"
              if c else "- | - | -")
      lines.append(
          f"| {row['label']} | {timing} | {_fmt_bytes(row['state_bytes'])} "
          f"| {row['state_vs_adam']:.4f} | {coll} | {row.get('note', '')} |")
    lines.append("")
  targets = target_rows(results)
  if targets:
    met = sum(t["met"] for t in targets)
    lines += ["## Targets", "",
              f"{met} of {len(targets)} met. Ratios to optax.adam measured in "
              "this run; time targets count on the whole tree only.", "",
              "| optimizer | r | measure | target | measured | met |",
              "| --- | ---: | --- | ---: | ---: | --- |"]
    for t in targets:
      measure, value = _target_words(t)
      lines.append(f"| {t['label']} | {t['rank']} | {measure} | "
                   f"<= {t['limit']} | {value} | "
                   f"{'yes' if t['met'] else 'no'}"
                   f"{' (' + t['note'] + ')' if t['note'] else ''} |")
    lines.append("")
  train = results.get("train_step")
  if train:
    lines += [
        "## Train step", "",
        f"Forward, backward and update of a Gemma with {train['config']['layers']} "
        f"layers, d_model {train['config']['d_model']}, mlp "
        f"{train['config']['mlp_dim']}, vocabulary {train['config']['vocab']}, "
        f"LoRA r = {train['config']['rank']} on every projection "
        f"({train['lora_params']:,} trainable of {train['frozen_params']:,} "
        f"frozen parameters), batch {train['config']['batch']} x "
        f"{train['config']['seq']} tokens, float32.", "",
        "| | LoRA-RITE ms | Adam ms | ratio |", "| --- | ---: | ---: | ---: |",
        f"| train step | {train['ms']:.1f} | {train['adam_ms']:.1f} | "
        f"**{train['ratio']:.3f}** |", ""]
  return "\n".join(lines)


def run(args) -> dict[str, Any]:
  labels = args.optimizers or list(OPTIMIZERS)
  meta = dict(command="python experiments/bench_optimizers.py "
              + " ".join(sys.argv[1:]),
              machine=f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
              jax=jax.__version__, optax=optax.__version__, layers=args.layers,
              ranks=args.ranks, reps=args.reps,
              lapack_threads=args.lapack_threads or "LAPACK's default",
              shampoo_every=args.shampoo_every)
  rows = []
  for rank in args.ranks:
    shapes = gemma_2b_lora_shapes(rank, args.layers)
    adam_bytes = state_bytes(optax.adam(LEARNING_RATE), shapes)
    for label in labels:
      row = dict(label=label, rank=rank,
                 state_bytes=state_bytes(make_optimizer(label), shapes))
      row["state_vs_adam"] = row["state_bytes"] / adam_bytes
      layers = args.layers
      budget = min(args.state_budget_gb * 2**30,
                   args.max_state_vs_adam * adam_bytes)
      if row["state_bytes"] > budget:
        layers = max(1, layers_that_fit(label, rank, args.layers, budget))
        row["note"] = (f"state {row['state_vs_adam']:.0f} x Adam's: timed on "
                       f"{layers} layer(s), against Adam on the same")
      if label in KERNEL_ONLY:
        row["time"] = fused_bytes(label, shapes)
        row["note"] = (f"bytes only: {row['time']['kernels']} Pallas kernels "
                       "counted as their operands and results")
      elif label != "adam" and layers > 0:
        per_layer_s = _seconds_per_layer(label, rank)
        if per_layer_s * layers > args.max_step_seconds:
          layers = max(1, int(args.max_step_seconds // per_layer_s))
          row["note"] = (f"{per_layer_s:.1f} s per layer: timed on {layers} "
                         "layer(s), against Adam on the same")
        timed_shapes = (shapes if layers == args.layers
                        else gemma_2b_lora_shapes(rank, layers))
        row["timed_layers"] = layers
        if label == "shampoo" and args.shampoo_every > 1:
          row["time"] = time_against_adam(
              label, timed_shapes, args.reps, cycle=args.shampoo_every,
              hparams=dict(precondition_every=args.shampoo_every))
        else:
          row["time"] = time_against_adam(label, timed_shapes, args.reps)
      rows.append(row)
      t = row.get("time", {})
      nan = float("nan")
      print(f"r={rank:3d} {label:22s} ratio {t.get('ratio', nan):6.2f} "
            f"({t.get('ms', nan):8.1f} ms vs adam "
            f"{t.get('adam_ms', nan):6.1f}) bytes "
            f"{t.get('bytes_ratio', nan):5.2f} compile "
            f"{t.get('compile_ratio', nan):5.2f} kernels "
            f"{t.get('distinct_kernels', nan)} / "
            f"{t.get('adam_distinct_kernels', nan)} state "
            f"{_fmt_bytes(row['state_bytes']):>10s} "
            f"({row['state_vs_adam']:.4f} x adam) {row.get('note', '')}",
            flush=True)
  if not args.skip_collectives:
    table = collectives_table([l for l in labels if l not in KERNEL_ONLY],
                              args.ranks, args.collectives_layers)
    for row in rows:
      if row["label"] in KERNEL_ONLY:
        continue
      row["collectives"] = table[f"{row['label']}|{row['rank']}"]
      c = row["collectives"]
      print(f"r={row['rank']:3d} {row['label']:22s} collectives {c['count']:5d}"
            f" largest {c['max_elements']:9d} moving {c['moving']} "
            f"({c['max_moving_elements']})", flush=True)
    meta["collectives_layers"] = args.collectives_layers
  results = dict(meta=meta, rows=rows)
  for t in target_rows(results):
    print("target: " + _fmt_target(t), flush=True)
  if not args.skip_train:
    results["train_step"] = train_step_ratio(args.train, args.train_reps)
    t = results["train_step"]
    print(f"train step: lora_rite {t['ms']:.1f} ms, adam {t['adam_ms']:.1f} ms,"
          f" ratio {t['ratio']:.3f}", flush=True)
  return results


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="2 layers, r = 16, 3 repetitions: under a minute")
  parser.add_argument("--out", default="docs/results/bench")
  parser.add_argument("--layers", type=int, default=18)
  parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS))
  parser.add_argument("--state-budget-gb", type=float, default=3.0)
  parser.add_argument(
      "--max-step-seconds", type=float, default=5.0,
      help="an optimizer whose update would take longer on the whole tree "
      "(measured on one layer) is timed on the layers that fit; with one "
      "LAPACK thread LoRA-RITE's r = 64 update fits on the whole tree")
  parser.add_argument(
      "--max-state-vs-adam", type=float, default=4.0,
      help="an optimizer with more state than this times Adam's (Shampoo's "
      "blocks, LoRA-Pro's full moments) is timed on the layers that fit; its "
      "cost grows with its state, so the whole tree would take minutes")
  parser.add_argument(
      "--shampoo-every", type=int, default=10,
      help="Shampoo recomputes its inverse roots every this many steps and "
      "is timed over whole cycles (distributed Shampoo's own default is 1, "
      "every step; 10 to 100 is usual in practice)")
  parser.add_argument("--collectives-layers", type=int, default=18)
  parser.add_argument("--skip-collectives", action="store_true")
  parser.add_argument("--skip-train", action="store_true")
  parser.add_argument("--train-reps", type=int, default=7)
  parser.add_argument(
      "--lapack-threads", type=int, default=1,
      help="LAPACK / BLAS threads while timing (0: LAPACK's default)")
  parser.add_argument("--collectives-worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.collectives_worker:
    request = json.loads(args.collectives_worker)
    table = {}
    for rank in request["ranks"]:
      for label in request["labels"]:
        table[f"{label}|{rank}"] = sharded_collectives(label, rank,
                                                      request["layers"])
        print(f"collectives r={rank} {label}: {table[f'{label}|{rank}']}",
              file=sys.stderr, flush=True)
    print(json.dumps(table))
    return
  args.train = TrainBench()
  if args.quick:
    args.layers, args.ranks, args.reps = 2, [16], 3
    args.collectives_layers, args.train_reps = 1, 3
    args.train = TrainBench(layers=2, d_model=256, mlp_dim=1024, seq=64)
    args.state_budget_gb = min(args.state_budget_gb, 1.0)
    if not args.optimizers:
      args.optimizers = ["adam", "lora_plus", "scaled_adamw",
                         "lora_pro (efficient)", "lora_rite",
                         "lora_rite (fused)", "lora_pro (efficient, fused)"]
  if args.lapack_threads:
    with rite_optax.linalg.limit_lapack_threads(args.lapack_threads):
      results = run(args)
  else:
    results = run(args)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out, "bench.md"), "w") as f:
    f.write(markdown(results))
  print(f"wrote {args.out}/bench.json and bench.md")


if __name__ == "__main__":
  main()
