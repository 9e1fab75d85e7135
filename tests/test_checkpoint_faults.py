"""Faults injected one at a time into the train state and its checkpoints.

Each test breaks one thing the way a preemptible TPU VM or an unlucky
learning rate does (a flipped byte in a saved data file, a NaN written to
disk, a NaN gradient, a disk that fills up mid-save) and asserts that no good
state is lost and that the error names the step, the path and the array.

The checkpoint tests use a small hand-made train state (no model, nothing to
compile but the digests); its arrays are large enough (64 KiB) that OCDBT
stores them out of line, in data files with no checksum of their own. The
train-step tests use a two-layer LoRA model, so every optimizer of the
registry compiles in a second.
"""

import glob
import os
import resource
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rite_optax
from rite_optax.models import inject_lora
from rite_optax.models import sharding
from rite_optax.train import checkpoints as ckpt_lib
from rite_optax.train import step as step_lib

LORA_A = ".params['layer']['lora_a']"

# A failed Orbax restore or save leaves tensorstore callbacks that run after
# Orbax closed its asyncio loop; they report "Event loop is closed".
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _state(step: int) -> step_lib.TrainState:
  """A train state whose values depend on ``step``, with Adam's moments."""
  params = {"layer": {
      "lora_a": jnp.arange(256 * 64, dtype=jnp.float32).reshape(256, 64)
                / 1000 + step,
      "lora_b": jnp.full((64, 256), 0.5 + step, jnp.float32)}}
  opt_state = optax.adam(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32
                           else x, opt_state)
  return step_lib.TrainState(jnp.asarray(step, jnp.int32), params, opt_state)


def _assert_same(actual, expected):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(actual),
               jax.device_get(expected))


def _data_files(step_dir):
  """The files that hold array bytes (OCDBT's ``d/``), the largest first."""
  files = glob.glob(os.path.join(step_dir, "train_state", "**", "d", "*"),
                    recursive=True)
  return sorted(files, key=os.path.getsize, reverse=True)


def _save_steps(directory, steps, **kwargs):
  with ckpt_lib.Checkpoints(directory, async_save=False, **kwargs) as ckpt:
    for step in steps:
      assert ckpt.save(step, _state(step), {"index": step}, force=True)


def _assert_one_line(error, *names):
  message = str(error)
  assert "\n" not in message and "tensorstore_spec" not in message, message
  assert len(message) < 1400, message
  for name in names:
    assert name in message, (name, message)


def _assert_falls_back_to(directory, broken, good):
  """``broken`` is set aside and ``good`` restores, data position included."""
  with ckpt_lib.Checkpoints(directory) as ckpt:
    restored = ckpt.restore_latest_valid(_state(0))
    assert restored.step == good and restored.data_state == {"index": good}
    _assert_same(restored.state, _state(good))
    assert ckpt.all_steps() == [good]
  quarantined = os.listdir(os.path.join(directory, ckpt_lib.QUARANTINE_DIR))
  assert [name.split("-")[0] for name in quarantined] == [str(broken)]


# --- corrupt and non-finite checkpoints -------------------------------------


def test_flipped_byte_in_a_data_file_is_a_corrupt_step(tmp_path):
  """The issue's fault: one flipped bit that still decodes gave garbage
  values that were restored silently. The digests name the array."""
  _save_steps(tmp_path, [1, 2])
  data_file = _data_files(tmp_path / "2")[0]
  raw = bytearray(open(data_file, "rb").read())
  raw[len(raw) // 3] ^= 0x10
  with open(data_file, "wb") as f:
    f.write(bytes(raw))

  with ckpt_lib.Checkpoints(tmp_path) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointError) as error:
      ckpt.restore(2, _state(0))
  assert error.value.step == 2
  _assert_one_line(error.value, "step 2", str(tmp_path / "2"), LORA_A,
                   "data corrupt")
  _assert_falls_back_to(tmp_path, broken=2, good=1)


def test_truncated_tensor_is_one_line_naming_the_step(tmp_path):
  """A TensorStore read error is one line, without its ~60-line JSON spec."""
  _save_steps(tmp_path, [1, 2])
  for data_file in _data_files(tmp_path / "2"):
    os.truncate(data_file, os.path.getsize(data_file) // 2)
  with ckpt_lib.Checkpoints(tmp_path) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointError) as error:
      ckpt.restore(2, _state(0))
  _assert_one_line(error.value, "step 2", str(tmp_path / "2"))
  _assert_falls_back_to(tmp_path, broken=2, good=1)


def test_nan_on_disk_is_refused_on_restore(tmp_path, monkeypatch):
  """A NaN state on disk (written by a run without the save-side check) is
  a broken step, however well its digests match: the older one restores."""
  _save_steps(tmp_path, [1])
  nan_state = _state(2)
  nan_state.opt_state[0].mu["layer"]["lora_b"] = (
      nan_state.opt_state[0].mu["layer"]["lora_b"].at[3, 5].set(jnp.nan))
  monkeypatch.setattr(ckpt_lib, "_nonfinite_reason", lambda digests: None)
  with ckpt_lib.Checkpoints(tmp_path, async_save=False) as ckpt:
    assert ckpt.save(2, nan_state, {"index": 2}, force=True)
  monkeypatch.undo()

  with ckpt_lib.Checkpoints(tmp_path) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointError) as error:
      ckpt.restore(2, _state(0))
  _assert_one_line(error.value, "step 2",
                   ".opt_state[0].mu['layer']['lora_b']", "1 non-finite")
  _assert_falls_back_to(tmp_path, broken=2, good=1)


def test_checkpoint_without_digests_restores_if_finite(tmp_path, caplog):
  """Steps written before digests were recorded still restore (finiteness
  checked, a warning says what was not); a NaN one among them is refused."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ckpt_lib.Checkpoints(tmp_path, async_save=False) as ckpt:
    for step, state in ((1, _state(1)), (2, jax.tree.map(
        lambda x: x * jnp.nan if x.dtype == jnp.float32 else x, _state(2)))):
      ckpt._manager.save(step, args=ocp.args.Composite(  # the old format
          train_state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave({"step": step, "data_iterator": {
              "index": step}})))
  with ckpt_lib.Checkpoints(tmp_path) as ckpt:
    restored = ckpt.restore_latest_valid(_state(0))
  assert restored.step == 1
  _assert_same(restored.state, _state(1))
  assert "step 2" in caplog.text and ".params['layer']['lora_a'] has" in (
      caplog.text)
  assert "has no digests" in caplog.text


def test_non_finite_state_is_never_saved(tmp_path):
  """Saving a NaN state raises naming the array; nothing is written and the
  last good step stays the newest."""
  _save_steps(tmp_path, [1])
  bad = _state(2)
  bad = bad._replace(params={"layer": {
      "lora_a": bad.params["layer"]["lora_a"].at[0, 0].set(jnp.inf),
      "lora_b": bad.params["layer"]["lora_b"]}})
  with ckpt_lib.Checkpoints(tmp_path) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointSaveError) as error:
      ckpt.save(2, bad, {"index": 2}, force=True)
    _assert_one_line(error.value, "step 2", LORA_A, "non-finite",
                     "refusing")
    ckpt.wait()
    assert ckpt.all_steps() == [1]
    # Not a broken manager: the next finite state saves.
    assert ckpt.save(3, _state(3), {"index": 3}, force=True)
  assert sorted(os.listdir(tmp_path)) == ["1", "3"]


def test_digests_do_not_depend_on_the_sharding():
  """The digest of an array is that of its bytes, however it is split."""
  state = _state(4)
  mesh = sharding.make_mesh(2, 2, 2)
  spec = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp"), "tensor"))
  sharded = jax.tree.map(
      lambda x: jax.device_put(x, spec) if x.ndim == 2 else x, state)
  assert ckpt_lib.array_digests(sharded) == ckpt_lib.array_digests(
      jax.device_get(state))
  flipped = np.array(state.params["layer"]["lora_a"])
  flipped.view(np.uint32)[100, 7] ^= 1 << 31
  other = state._replace(params={"layer": {
      "lora_a": jnp.asarray(flipped), "lora_b": state.params["layer"][
          "lora_b"]}})
  before, after = (ckpt_lib.array_digests(s) for s in (state, other))
  assert [k for k in before if before[k] != after[k]] == [LORA_A]


# --- a disk that fills up mid-save ------------------------------------------


class _FileSizeLimit:
  """Writes past ``limit`` bytes fail with EFBIG ("File too large"), as on a
  full disk: the real OS error from TensorStore's C++ writes, no mocks."""

  def __init__(self, limit: int):
    self.limit = limit

  def __enter__(self):
    self._previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    self._previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (self.limit, self._previous_limit[1]))
    return self

  def __exit__(self, *exc_info):
    resource.setrlimit(resource.RLIMIT_FSIZE, self._previous_limit)
    signal.signal(signal.SIGXFSZ, self._previous_handler)


# Above any log or metadata file, below the 64 KiB arrays.
_FULL_DISK = _FileSizeLimit(16 * 1024)


def test_full_disk_async_save_stops_at_once_naming_the_path(tmp_path):
  """The background write fails: the next check() raises one line naming
  the step and the file; every later call raises it again; the previous
  step is intact."""
  with ckpt_lib.Checkpoints(tmp_path) as ckpt:
    assert ckpt.save(1, _state(1), {"index": 1}, force=True)
    ckpt.wait()
    with _FULL_DISK:
      assert ckpt.save(2, _state(2), {"index": 2}, force=True)
      deadline = time.monotonic() + 60
      with pytest.raises(ckpt_lib.CheckpointSaveError) as error:
        while time.monotonic() < deadline:
          ckpt.check()  # what a loop calls every step
          time.sleep(0.05)
    assert error.value.step == 2
    _assert_one_line(error.value, "step 2", str(tmp_path / "2"),
                     "File too large", "/d/")
    # Sticky: the loop cannot go on saving past it.
    for call in (ckpt.check, ckpt.wait,
                 lambda: ckpt.save(3, _state(3), {"index": 3})):
      with pytest.raises(ckpt_lib.CheckpointSaveError, match="step 2"):
        call()
    with pytest.raises(ckpt_lib.CheckpointSaveError, match="step 2"):
      ckpt.close()
  with ckpt_lib.Checkpoints(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    restored = ckpt.restore_latest_valid(_state(0))
    assert restored.step == 1
    _assert_same(restored.state, _state(1))


def test_full_disk_sync_save_raises_from_save(tmp_path):
  with ckpt_lib.Checkpoints(tmp_path, async_save=False) as ckpt:
    assert ckpt.save(1, _state(1), {"index": 1}, force=True)
    with _FULL_DISK:
      with pytest.raises(ckpt_lib.CheckpointSaveError) as error:
        ckpt.save(2, _state(2), {"index": 2}, force=True)
    _assert_one_line(error.value, "step 2", "File too large")
    with pytest.raises(ckpt_lib.CheckpointSaveError, match="step 2"):
      ckpt.save(3, _state(3), {"index": 3})
    with pytest.raises(ckpt_lib.CheckpointSaveError, match="step 2"):
      ckpt.close()
  with ckpt_lib.Checkpoints(tmp_path) as ckpt:
    assert ckpt.restore_latest_valid(_state(0)).step == 1


def test_failed_save_inside_a_with_block_does_not_hide_the_loop_error(
    tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with ckpt_lib.Checkpoints(tmp_path, async_save=False) as ckpt:
      with _FULL_DISK, pytest.raises(ckpt_lib.CheckpointSaveError):
        ckpt.save(2, _state(2), {"index": 2}, force=True)
      raise KeyboardInterrupt


# --- non-finite train steps -------------------------------------------------


class _TwoLayers(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return self.down(jnp.tanh(self.up(x)))


def _squared_error_sums(model, batch):
  error = model(batch["x"]) - batch["y"]
  return jnp.sum(error ** 2), jnp.asarray(error.size, jnp.float32)


def _batch(seed, poison=None):
  rng = np.random.default_rng(seed)
  batch = {"x": rng.normal(size=(4, 8)).astype(np.float32),
           "y": rng.normal(size=(4, 8)).astype(np.float32)}
  if poison is not None:
    batch["x"][1, 2] = poison
  return batch


def _guarded_setup(tx, skip_nonfinite=True):
  model = _TwoLayers(nnx.Rngs(0))
  inject_lora(model, 2, 4.0, r"up|down", nnx.Rngs(1))
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = step_lib.create_train_state(model, tx, mesh)
  train_step = step_lib.make_train_step(
      setup.graphdef, tx, mesh, setup.shardings, compute_dtype=None,
      loss_fn=_squared_error_sums, skip_nonfinite=skip_nonfinite)
  return setup, train_step


def _optimizer(name, learning_rate=1e-2):
  hparams = {"scale": 2.0} if name == "lora_pro" else {}
  return rite_optax.get_optimizer(name, learning_rate, **hparams)


@pytest.mark.parametrize("name", sorted(rite_optax.OPTIMIZERS))
def test_nan_gradient_never_reaches_params_or_state(name):
  """A NaN (or an infinity) in a batch: the step is skipped and counted, the
  state is the previous one bit for bit, and training goes on from it."""
  setup, train_step = _guarded_setup(_optimizer(name))
  state, metrics = train_step(setup.frozen, setup.state, _batch(0))
  assert int(metrics["nonfinite_steps"]) == 0
  good = jax.device_get(state)
  for i, poison in enumerate((np.nan, np.inf)):
    state, metrics = train_step(setup.frozen, state, _batch(1, poison))
    assert int(metrics["nonfinite_steps"]) == 1, poison
    assert int(state.step) == 2 + i  # the batch was consumed
    _assert_same((state.params, state.opt_state),
                 (good.params, good.opt_state))
  state, metrics = train_step(setup.frozen, state, _batch(2))
  assert int(metrics["nonfinite_steps"]) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(
      jax.device_get(state)) if np.issubdtype(np.asarray(x).dtype,
                                              np.floating))
  assert not np.array_equal(state.params["up"]["lora_b"],
                            good.params["up"]["lora_b"])


def test_without_the_guard_one_nan_batch_ruins_adam():
  """The fault the guard exists for (the control of the test above)."""
  setup, train_step = _guarded_setup(_optimizer("adam"), skip_nonfinite=False)
  state, metrics = train_step(setup.frozen, setup.state, _batch(1, np.nan))
  assert "nonfinite_steps" not in metrics
  state, _ = train_step(setup.frozen, state, _batch(2))
  assert np.isnan(np.asarray(state.params["up"]["lora_a"])).any()


def test_diverging_run_stops_after_n_non_finite_steps_with_the_last_good_state(
    tmp_path):
  """Adam with eps 0 (the issue's NaN at lr 1e3): lora_b starts at 0, so
  lora_a's gradient and moments are 0 and its update 0 / 0. Every step is
  skipped; the helper stops the loop after N in a row, and the state (and
  so every checkpoint) is the last finite one."""
  tx = optax.adam(1e3, eps=0.0)
  setup, train_step = _guarded_setup(tx)
  initial = jax.device_get(setup.state)
  stop = step_lib.NonFiniteSteps(max_consecutive=3)
  state = setup.state
  with ckpt_lib.Checkpoints(tmp_path, save_every=1) as ckpt:
    with pytest.raises(step_lib.NonFiniteStepsError) as error:
      for step in range(1, 10):
        state, metrics = train_step(setup.frozen, state, _batch(step))
        stop.update(step, metrics)
        ckpt.save(step, state, {"index": step})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    restored = ckpt.restore_latest_valid(setup.state)
  assert step == 3 and stop.total == 3
  assert "steps 1..3: 3 consecutive non-finite steps" in str(error.value)
  assert "those of step 0" in str(error.value)
  _assert_same((state.params, state.opt_state),
               (initial.params, initial.opt_state))
  _assert_same(restored.state.params, initial.params)


def test_non_finite_steps_counts_runs_not_totals():
  stop = step_lib.NonFiniteSteps(max_consecutive=2)
  for step, skipped in enumerate([0, 1, 0, 1, 0, 0, 1], start=1):
    stop.update(step, {"nonfinite_steps": np.int32(skipped)})
  assert stop.total == 3 and stop.consecutive == 1
  with pytest.raises(step_lib.NonFiniteStepsError,
                     match=r"steps 7\.\.8: 2 consecutive .* loss nan"):
    stop.update(8, {"nonfinite_steps": jnp.asarray(1),
                    "loss": jnp.asarray(np.nan)})
  with pytest.raises(ValueError, match="max_consecutive"):
    step_lib.NonFiniteSteps(0)
