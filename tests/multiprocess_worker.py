"""One process of a multi-process training run, for tests/test_multiprocess.py.

``python tests/multiprocess_worker.py --checkpoints DIR --out DIR ...`` with
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set
is one process of a run that :func:`rite_optax.train.step.
initialize_distributed` joins into one JAX system (a TPU pod's hosts, here
processes on one machine with 4 CPU devices each). Without them it is a
single-process run over all of its devices: the reference.

The run is the package's own path: the tiny Gemma with LoRA, LoRA-RITE, a
``(data 2, fsdp 2, tensor 2)`` mesh over every device of every process,
``create_train_state``, ``make_train_step``, batches placed by ``shard_batch``
(each process its own rows on even steps, the global batch on odd ones, the
two placements a multi-host loop may use), and :class:`Checkpoints`: resume
from the newest valid step, save every ``--save-every`` steps and at the end.
``--die-after N`` makes process 1 kill itself (SIGKILL, nothing flushed)
after step ``N``, once the previous checkpoint is committed.

Each process appends ``<out>/losses_<i>.jsonl`` step by step and at the end
writes ``<out>/process_<i>.json`` (losses by step, the step it resumed from,
what it saw of the system); process 0 writes the final LoRA factors,
gathered from every process, to ``<out>/params.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import time
from typing import Any, Optional

import numpy as np

_START = time.monotonic()
BATCH, SEQ = 8, 16
RANK, ALPHA = 4, 8.0
LEARNING_RATE = 1e-2


def _progress(what: str) -> None:
  # In the test's log of each process: where a slow or hung run was.
  print(f"[{time.monotonic() - _START:6.1f}s] {what}", file=sys.stderr,
        flush=True)


def global_batch(index: int) -> dict[str, np.ndarray]:
  """The deterministic global batch of step ``index`` (all processes alike)."""
  rng = np.random.default_rng(index)
  inputs = rng.integers(3, 256, (BATCH, SEQ)).astype(np.int32)
  inputs[:, 0] = 2
  targets = np.roll(inputs, -1, axis=1)
  loss_mask = np.zeros((BATCH, SEQ), np.float32)
  attention_mask = np.ones((BATCH, SEQ), bool)
  for row in range(BATCH):
    length = SEQ - int(rng.integers(0, 4))
    targets[row, length - 1] = 1
    targets[row, length:] = 0
    inputs[row, length:] = 0
    attention_mask[row, length:] = False
    loss_mask[row, length - int(rng.integers(2, 10)):length] = 1.0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
          "attention_mask": attention_mask}


def process_rows(mesh) -> slice:
  """The rows of the global batch that this process's devices hold."""
  from rite_optax.models import sharding  # pylint: disable=import-outside-toplevel
  indices = sharding.batch_sharding(mesh).addressable_devices_indices_map(
      (BATCH, SEQ))
  starts = sorted({index[0].start or 0 for index in indices.values()})
  stops = sorted({index[0].stop or BATCH for index in indices.values()})
  rows = slice(starts[0], stops[-1])
  per_device = BATCH // (mesh.shape["data"] * mesh.shape["fsdp"])
  # shard_batch's per-process form needs each process's rows contiguous.
  assert len(starts) * per_device == rows.stop - rows.start, indices
  return rows


def train(checkpoint_dir: str, steps: int, save_every: int,
          die_after: Optional[int] = None,
          losses_file: Optional[pathlib.Path] = None) -> dict[str, Any]:
  """Train to ``steps`` from the newest valid checkpoint; the run's record.

  ``losses_file`` gets a ``{"step": n, "loss": x}`` line per step as it is
  taken (flushed: what a killed process had done is there).
  """
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.experimental import multihost_utils

  import rite_optax
  from rite_optax.models import gemma
  from rite_optax.models import inject_lora
  from rite_optax.models import sharding
  from rite_optax.train import checkpoints as ckpt_lib
  from rite_optax.train import step as step_lib

  # One layer: the test is of the processes, not of depth; tracing is most
  # of the time on a loaded two-core machine.
  model = gemma.Gemma(gemma.tiny(num_layers=1), rngs=nnx.Rngs(0))
  inject_lora(model, RANK, ALPHA, gemma.lora_targets(), nnx.Rngs(1))
  mesh = sharding.make_mesh(2, 2, 2)
  tx = rite_optax.lora_rite(LEARNING_RATE)
  setup = step_lib.create_train_state(model, tx, mesh)
  train_step = step_lib.make_train_step(
      setup.graphdef, tx, mesh, setup.shardings, compute_dtype=jnp.float32)
  rows = process_rows(mesh)
  _progress("model, state and step built")

  record: dict[str, Any] = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(), "rows": [
          rows.start, rows.stop], "losses": {}, "nonfinite_steps": 0}
  state = setup.state
  with ckpt_lib.Checkpoints(checkpoint_dir, save_every=save_every,
                            max_to_keep=3) as checkpoints:
    restored = checkpoints.restore_latest_valid(
        ckpt_lib.abstract_like(state, setup.shardings.state))
    start = 0
    if restored is not None:
      state, start = restored.state, restored.data_state["index"]
      assert start == restored.step
    record["resumed_from"] = start
    _progress(f"starting at step {start}")
    for step in range(start, steps):
      batch = global_batch(step)
      if step % 2 == 0:
        placed = step_lib.shard_batch(
            {name: x[rows] for name, x in batch.items()}, mesh)
      else:
        placed = step_lib.shard_batch(batch, mesh, global_batch=True)
      state, metrics = train_step(setup.frozen, state, placed)
      # Replicated outputs: every process holds the same values.
      record["losses"][step + 1] = float(
          np.asarray(metrics["loss"].addressable_data(0)))
      record["nonfinite_steps"] += int(
          np.asarray(metrics["nonfinite_steps"].addressable_data(0)))
      _progress(f"step {step + 1}: loss {record['losses'][step + 1]:.6f}")
      # The loss is written before the save: a save may wait on the other
      # process, which the step of the death kills.
      if losses_file is not None:
        with open(losses_file, "a") as f:
          f.write(json.dumps({"step": step + 1,
                              "loss": record["losses"][step + 1]}) + "\n")
      checkpoints.save(step + 1, state, {"index": step + 1})
      if die_after == step + 1 and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
      if die_after is not None and (step + 1) % save_every == 0:
        checkpoints.wait()  # the step before the death is committed
    checkpoints.save(steps, state, {"index": steps}, force=True)
    checkpoints.wait()
    record["saved_steps"] = checkpoints.all_steps()
    # What every process wrote reads back, onto the same shardings.
    final = checkpoints.restore(steps, ckpt_lib.abstract_like(
        state, setup.shardings.state))
    record["restored_equal"] = (ckpt_lib.array_digests(final.state)
                                == ckpt_lib.array_digests(state))
  _progress("saved and verified")
  params = multihost_utils.process_allgather(state.params, tiled=True)
  record["params"] = jax.tree.map(np.asarray, params)
  return record


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoints", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--save-every", type=int, default=2)
  parser.add_argument("--die-after", type=int, default=None)
  args = parser.parse_args(argv)

  # pylint: disable=import-outside-toplevel
  from rite_optax.train import step as step_lib
  initialized = step_lib.initialize_distributed()
  import jax
  _progress(f"process {jax.process_index()} of {jax.process_count()}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  record = train(args.checkpoints, args.steps, args.save_every,
                 args.die_after, out / f"losses_{jax.process_index()}.jsonl")
  record["initialized"] = initialized
  params = record.pop("params")
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out / "params.npz", **flat)
  (out / f"process_{jax.process_index()}.json").write_text(
      json.dumps(record, indent=1))


if __name__ == "__main__":
  main()
