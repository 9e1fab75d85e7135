"""The main job under faults (issue 17, items 2-4 and 6; issue 14, item 2):
each test injects one, then checks that the run stops or refuses with its
exit code, that the message names the place, and that nothing is lost."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import finetune as finetune_cli  # experiments/finetune.py
import rite_optax
from rite_optax.train import finetune

ExitCode = finetune.ExitCode
# Six steps of the tiny random model, checkpoints at 3 and 6.
FAST = ["--steps", "6", "--eval-every", "6", "--eval-examples", "4",
        "--batch-size", "8", "--max-len", "48", "--warmup-steps", "2",
        "--checkpoint-every", "3"]


def _cli(out, *flags):
  return finetune_cli.cli(FAST + ["--output-dir", str(out), *flags])


def _records(out, name="metrics.jsonl"):
  return [json.loads(line) for line in (out / name).read_text().splitlines()]


def _losses(out):
  return [(r["step"], r["train/loss"]) for r in _records(out)
          if "train/loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run (steps 1..6, checkpoints 3 and 6); tests copy it."""
  out = tmp_path_factory.mktemp("trained") / "run"
  assert _cli(out) == ExitCode.DONE
  return out


@pytest.fixture
def run(trained, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(trained, out)
  return out


def _snapshot(out):
  """Every file of a run with its bytes: to check that nothing changed."""
  return {str(p.relative_to(out)): p.read_bytes()
          for p in sorted(out.rglob("*")) if p.is_file()}


def test_checkpoints_that_all_fail_to_restore_are_refused_not_restarted(
    run, capsys):
  for data in (run / "checkpoints").glob("*/train_state/**/d/*"):
    data.write_bytes(os.urandom(data.stat().st_size))
  before = _snapshot(run)
  assert _cli(run) == ExitCode.REFUSED
  err = capsys.readouterr().err
  assert (f"none of the checkpoint steps [3, 6] in {run / 'checkpoints'} "
          "restores (the newest: checkpoint step 6 at "
          f"{run / 'checkpoints' / '6'}") in err
  assert "--restart-if-unrestorable true" in err
  assert _snapshot(run) == before  # not quarantined, not trained over

  assert _cli(run, "--restart-if-unrestorable", "true") == ExitCode.DONE
  assert "moving them to" in capsys.readouterr().err
  assert len(list((run / "checkpoints" / "corrupt").iterdir())) == 2
  assert finetune.checkpoint_steps(run) == [3, 6]  # the new run's


def test_checkpoints_without_their_config_json_are_refused(run, capsys):
  (run / "config.json").unlink()
  before = _snapshot(run)
  assert _cli(run) == ExitCode.REFUSED
  err = capsys.readouterr().err
  assert f"{run / 'config.json'} is missing but" in err
  assert f"the last line of {run / 'config_history.jsonl'}" in err
  assert _snapshot(run) == before


def test_resume_false_refuses_without_overwrite_and_moves_the_run_aside_with(
    run, capsys):
  before = _snapshot(run)
  assert _cli(run, "--resume", "false") == ExitCode.REFUSED
  assert ("holds the checkpoints of an earlier run (steps [3, 6]), which "
          "--resume false would train over") in capsys.readouterr().err
  assert _snapshot(run) == before

  assert _cli(run, "--resume", "false", "--overwrite", "true") == ExitCode.DONE
  (aside,) = run.parent.glob("run.before-*")
  assert f"moved the earlier run in {run} aside to {aside}" in (
      capsys.readouterr().err)
  assert _snapshot(aside) == {k: v for k, v in before.items()
                              if k != "lock.json"}  # all of it, still there
  assert len(_records(run, "config_history.jsonl")) == 1  # a new run
  assert _losses(run) == _losses(aside)  # the same config from scratch


def test_each_start_is_appended_to_the_config_history_with_its_changes(
    run, capsys):
  assert _cli(run, "--learning-rate", "0.001", "--eval-examples", "2") == (
      ExitCode.DONE)
  err = capsys.readouterr().err
  assert ("config changed since the previous start (" in err
          and "): learning_rate 0.002 -> 0.001, eval_examples 4 -> 2" in err)
  history = _records(run, "config_history.jsonl")
  assert [h["config"]["learning_rate"] for h in history] == [0.002, 0.001]
  assert history[1]["host"] == socket.gethostname()
  assert json.loads((run / "config.json").read_text())["learning_rate"] == 0.001


def test_a_second_process_is_refused_by_the_lock_and_a_dead_ones_taken_over(
    run, capsys):
  holder = subprocess.Popen([sys.executable, "-c",
                             "import time; time.sleep(120)"])
  lock = run / "lock.json"
  try:
    lock.write_text(json.dumps({"pid": holder.pid,
                                "host": socket.gethostname(),
                                "since": "2024-01-01T00:00:00"}))
    before = _snapshot(run)
    assert _cli(run) == ExitCode.LOCKED
    assert (f"{lock} is held by pid {holder.pid} on host "
            f"{socket.gethostname()}") in capsys.readouterr().err
    assert _snapshot(run) == before
  finally:
    holder.kill()
    holder.wait()
  assert _cli(run) == ExitCode.DONE  # already at step 6: nothing to train
  assert (f"taking over the lock of pid {holder.pid}"
          in capsys.readouterr().err)
  assert not lock.exists()  # released at the end


def test_a_preempted_run_exits_75_and_the_rerun_finishes_it(tmp_path, capsys,
                                                            monkeypatch):
  out = tmp_path / "run"
  with monkeypatch.context() as patch:
    patch.setattr(finetune.ckpt_lib.PreemptionGuard, "should_stop",
                  lambda self, step: step >= 3)
    assert _cli(out) == ExitCode.PREEMPTED == 75
  assert "preempted: checkpoint saved at step 3" in capsys.readouterr().err
  assert _cli(out) == ExitCode.DONE
  assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5, 6]


def test_the_exit_codes_are_in_the_help(capsys):
  with pytest.raises(SystemExit):
    finetune_cli.cli(["--help"])
  out = capsys.readouterr().out
  for code in (65, 73, 74, 75, 78):
    assert f"\n   {code}  " in out


def test_a_kill_after_the_last_checkpoint_leaves_no_duplicates_nor_a_torn_line(
    run, trained, capsys):
  """As after a SIGKILL at step 6, mid-write: steps 4..6 and a torn line in
  metrics.jsonl, step 6's checkpoint not written yet."""
  shutil.rmtree(run / "checkpoints" / "6")
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "train/lo')
  lines = len((run / "metrics.jsonl").read_text().splitlines())
  with pytest.warns(RuntimeWarning, match=rf"{run / 'metrics.jsonl'}:{lines}: "
                    "dropped a torn line"):
    assert _cli(run) == ExitCode.DONE
  assert "resumed from step 3" in capsys.readouterr().err
  assert _losses(run) == _losses(trained)  # each step once, bit for bit
  assert [r["step"] for r in _records(run)] == [
      r["step"] for r in _records(trained)]
  dropped = (run / "metrics.dropped.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in dropped[:-1]] == [4, 5, 6, 6]
  assert dropped[-1] == '{"step": 7, "train/lo'


def test_a_failed_save_stops_the_loop_at_the_next_step(tmp_path, capsys,
                                                       monkeypatch):
  """Step 6's background write fails (a full disk): the loop stops at step 7,
  not later; step 3 is kept and the rerun resumes from it."""
  out = tmp_path / "run"
  real_save = ocp.CheckpointManager.save
  real_wait = ocp.CheckpointManager.wait_until_finished
  failing = []

  def save(self, step, *args, **kwargs):
    if step == 6:  # started, as an async save is, but the write fails
      failing.append(step)
      return True
    return real_save(self, step, *args, **kwargs)

  def wait_until_finished(self):
    real_wait(self)
    if failing:
      raise OSError(errno.ENOSPC, "No space left on device",
                    str(self.directory / str(failing.pop())))

  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, "save", save)
    patch.setattr(ocp.CheckpointManager, "wait_until_finished",
                  wait_until_finished)
    assert _cli(out, "--steps", "12", "--eval-every", "12") == (
        ExitCode.SAVE_FAILED)
  err = capsys.readouterr().err
  (line,) = [x for x in err.splitlines() if x.startswith("finetune:")]
  assert line.startswith(f"finetune: save_failed: checkpoint step 6 at "
                         f"{out / 'checkpoints' / '6'} was not saved: OSError")
  assert "No space left on device" in line
  assert [s for s, _ in _losses(out)] == list(range(1, 8))  # stopped at 7
  assert finetune.checkpoint_steps(out) == [3]
  assert _cli(out, "--steps", "12", "--eval-every", "12") == ExitCode.DONE
  assert "resumed from step 3" in capsys.readouterr().err
  assert [s for s, _ in _losses(out)] == list(range(1, 13))


def test_consecutive_nonfinite_steps_stop_the_run_with_finite_checkpoints(
    tmp_path, capsys):
  out = tmp_path / "run"
  diverging = ["--optimizer", "adam", "--hparams", '{"eps": 0.0}',
               "--learning-rate", "1000", "--max-nonfinite-steps", "3"]
  assert _cli(out, *diverging) == ExitCode.NONFINITE
  err = capsys.readouterr().err
  assert "consecutive non-finite steps" in err
  assert (f"the newest checkpoint, step 6 in {out / 'checkpoints'}, is "
          "finite") in err
  skipped = [r["train/nonfinite_steps"] for r in _records(out)
             if "train/nonfinite_steps" in r]
  assert len(skipped) == 6 and sum(skipped) >= 3
  # Every checkpoint restores (their digests and finiteness are verified).
  assert _cli(out, *diverging) == ExitCode.DONE
  assert "resumed from step 6" in capsys.readouterr().err


def test_skipped_lora_rite_factors_are_logged_and_checked_on_the_host(
    tmp_path, monkeypatch):
  """With the B = 0 init only the B factors can be skipped in a step (A's
  gradient is 0), so the warning for all of them is wired, not triggered."""
  checked = []
  monkeypatch.setattr(rite_optax, "warn_if_every_factor_skipped",
                      lambda metrics: checked.append(metrics))
  out = tmp_path / "run"
  assert _cli(out, "--hparams", '{"update_skipping": 1e-30}') == (
      ExitCode.DONE)
  skipped = [r["train/skipped_factors"] for r in _records(out)
             if "train/skipped_factors" in r]
  assert len(skipped) == 6 and all(s > 0 for s in skipped)
  assert [int(m["skipped_factors"]) for m in checked] == skipped
  assert all(isinstance(m["skipped_factors"], np.ndarray) for m in checked)
