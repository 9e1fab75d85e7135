"""A real multi-process run: 2 processes x 4 CPU devices, one JAX system.

``tests/multiprocess_worker.py`` is started twice with a local coordinator
(``JAX_COORDINATOR_ADDRESS`` on a free port, read by the package's
``initialize_distributed``), so the mesh, the batch placement and Orbax's
multi-process checkpoints run as on a TPU pod's hosts. The run trains and
checkpoints (steps 2 and 4) until process 1 is SIGKILLed after step 5;
process 0, stuck in the next collective, is killed too (as a pod scheduler
does), and both are restarted: they restore step 4 across the two processes
and finish. Every loss, and the final LoRA factors, must equal those of the
same run in this one process over 8 devices.

Two launches of two processes, each tracing and compiling the step, are the
cost: ~110 s of CPU in all with the reference (so ~60-90 s on an idle
two-core machine, 3.5 min at a load average of 8); the restart reuses the
first launch's compilations through JAX's persistent cache.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multiprocess_worker as worker

WORKER = pathlib.Path(worker.__file__)
STEPS = 6
DIE_AFTER = 5  # steps 2 and 4 are saved before
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(cache, checkpoints, out, **flags):
  """The two processes of one run, started at once."""
  port = _free_port()
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
      "JAX_PLATFORMS": "cpu",
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_NUM_PROCESSES": "2",
      # The restarted run compiles what the first one did: reuse it.
      "JAX_COMPILATION_CACHE_DIR": str(cache),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  args = [sys.executable, str(WORKER), "--checkpoints", str(checkpoints),
          "--out", str(out), "--steps", str(STEPS), "--save-every", "2"]
  for name, value in flags.items():
    args += [f"--{name.replace('_', '-')}", str(value)]
  out.mkdir(parents=True)
  processes = []
  for index in range(2):
    log = open(out.parent / f"{out.name}_process_{index}.log", "w")
    processes.append(subprocess.Popen(
        args, env=env | {"JAX_PROCESS_ID": str(index)}, stdout=log,
        stderr=subprocess.STDOUT))
  return processes


def _log_tail(out, index, lines=30):
  path = out.parent / f"{out.name}_process_{index}.log"
  text = path.read_text(errors="replace").splitlines()
  return "\n".join(line for line in text[-lines:] if "[Gloo]" not in line)


def _finish(processes, out):
  try:
    for index, process in enumerate(processes):
      rc = process.wait(timeout=TIMEOUT_S)
      assert rc == 0, f"process {index} exited {rc}:\n{_log_tail(out, index)}"
  finally:
    _kill(processes)
  records = [json.loads((out / f"process_{i}.json").read_text())
             for i in range(2)]
  with np.load(out / "params.npz") as params:
    return records, dict(params)


def _losses(out, index):
  """``{step: loss}`` as the process wrote them, step by step."""
  lines = (out / f"losses_{index}.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _wait_for_loss(out, index, step, process, timeout_s=120):
  """Until process ``index`` has written the loss of ``step`` (or exited):
  its step ends after its partner's, which the test may just have seen
  die, so killing it at once can cut a loss it was about to write."""
  path = out / f"losses_{index}.jsonl"
  deadline = time.monotonic() + timeout_s
  while process.poll() is None and time.monotonic() < deadline:
    try:
      if path.exists() and step in _losses(out, index):
        return
    except ValueError:  # a line half written
      pass
    time.sleep(0.2)


def _kill(processes):
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same run in this process: 8 devices, no jax.distributed."""
  from rite_optax.train import step as step_lib
  assert not step_lib.initialize_distributed()
  assert jax.device_count() == 8 and jax.process_count() == 1
  record = worker.train(str(tmp_path_factory.mktemp("reference")), STEPS,
                        save_every=2)
  params = {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_leaves_with_path(record.pop("params"))}
  return {int(step): loss for step, loss in record["losses"].items()}, params


def _assert_losses(losses, reference_losses, steps):
  assert sorted(losses) == list(steps)
  for step in steps:
    np.testing.assert_allclose(losses[step], reference_losses[step],
                               rtol=1e-5, err_msg=f"step {step}")


def test_two_processes_train_die_restart_and_match_one(tmp_path, reference):
  """One test, not two: under pytest-xdist two would each need the killed
  run, on whichever worker they land."""
  reference_losses, reference_params = reference
  cache, checkpoints = tmp_path / "jax_cache", tmp_path / "checkpoints"

  # Up to the kill: the losses of one 8-device process, and checkpoints
  # written by both processes.
  out = tmp_path / "killed"
  processes = _start(cache, checkpoints, out, die_after=DIE_AFTER)
  try:
    rc = processes[1].wait(timeout=TIMEOUT_S)
    assert rc == -signal.SIGKILL, (
        f"process 1 exited {rc}:\n{_log_tail(out, 1)}")
    _wait_for_loss(out, 0, DIE_AFTER, processes[0])
  finally:
    # Process 0 is stuck in the next collective (or has failed in it).
    _kill(processes)
  for index in range(2):
    _assert_losses(_losses(out, index), reference_losses,
                   range(1, DIE_AFTER + 1))
  assert sorted(int(p.name) for p in checkpoints.iterdir()
                if p.name.isdigit()) == [2, 4]
  # Orbax wrote one array store per process (and one merged view of them).
  assert {p.name for p in (checkpoints / "4" / "train_state").glob(
      "ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}

  # Both restart, restore step 4 across the processes and end where the
  # uninterrupted single-process run does.
  out = tmp_path / "restarted"
  records, params = _finish(_start(cache, checkpoints, out), out)
  for index, record in enumerate(records):
    assert record["initialized"] and record["process_index"] == index
    assert record["process_count"] == 2 and record["device_count"] == 8
    assert record["local_device_count"] == 4
    assert record["resumed_from"] == 4 and record["nonfinite_steps"] == 0
    _assert_losses({int(k): v for k, v in record["losses"].items()},
                   reference_losses, range(5, STEPS + 1))
    assert record["saved_steps"] == [2, 4, 6]
    assert record["restored_equal"]  # step 6, as both processes wrote it
  # Each process placed its own half of the global batch.
  assert [r["rows"] for r in records] == [[0, 4], [4, 8]]
  assert params.keys() == reference_params.keys()
  for name, value in params.items():
    # Cross-process all-reduces (gloo) add in another order than one
    # process's: equal to float32 rounding, as a sharded step is to one
    # device's (test_train.test_sharded_step_matches_one_device).
    np.testing.assert_allclose(value, reference_params[name], rtol=1e-4,
                               atol=1e-6, err_msg=name)
