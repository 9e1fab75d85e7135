"""The train step on a device mesh, gradient accumulation and checkpoints.

The tiny Gemma with LoRA on every projection, trained by LoRA-RITE on random
token batches in the fine-tuning batch format, on 8 simulated CPU devices.
Compiling is what costs here, so each (mesh, accumulation, dtype) step is
compiled once per module and shared by the tests that need it.
"""

import functools
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import rite_optax
from rite_optax.models import gemma
from rite_optax.models import inject_lora
from rite_optax.models import sharding
from rite_optax.train import checkpoints as ckpt_lib
from rite_optax.train import step as step_lib

RANK, ALPHA = 4, 8.0
BATCH, SEQ = 8, 16
STEPS = 3
Q_A = ("layers", 0, "attn", "q", "lora_a")


def _tx():
  return rite_optax.lora_rite(1e-2)


@functools.cache
def _model(dtype=jnp.float32):
  model = gemma.Gemma(gemma.tiny(dtype=dtype), rngs=nnx.Rngs(0))
  inject_lora(model, RANK, ALPHA, gemma.lora_targets(), nnx.Rngs(1))
  return model


@functools.cache
def _mesh(devices):
  if devices == 1:
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return sharding.make_mesh(2, 2, 2)


@functools.cache
def _setup(devices, dtype=jnp.float32):
  return step_lib.create_train_state(_model(dtype), _tx(), _mesh(devices))


@functools.cache
def _train_step(devices, grad_accum_steps=1, compute_dtype=jnp.float32):
  setup = _setup(devices, compute_dtype)
  return step_lib.make_train_step(
      setup.graphdef, _tx(), _mesh(devices), setup.shardings,
      grad_accum_steps=grad_accum_steps, compute_dtype=compute_dtype)


def _fresh_state(setup):
  """A copy of the initial state: the step donates (deletes) its input."""
  return jax.tree.map(jnp.copy, setup.state)


def _batch(index):
  """Prompt then answer then padding; even rows have long answers and odd
  rows short ones, so the two microbatches of rows i, i + 2, ... carry very
  different token counts."""
  rng = np.random.default_rng(index)
  inputs = rng.integers(3, 256, (BATCH, SEQ)).astype(np.int32)
  inputs[:, 0] = 2
  targets = np.roll(inputs, -1, axis=1)
  loss_mask = np.zeros((BATCH, SEQ), np.float32)
  attention_mask = np.ones((BATCH, SEQ), bool)
  for row in range(BATCH):
    length = SEQ - rng.integers(0, 4)
    answer = rng.integers(6, 12) if row % 2 == 0 else rng.integers(1, 3)
    targets[row, length - 1] = 1
    targets[row, length:] = 0
    inputs[row, length:] = 0
    attention_mask[row, length:] = False
    loss_mask[row, length - answer:length] = 1.0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
          "attention_mask": attention_mask}


class _Batches:
  """A deterministic data iterator with a resumable position."""

  def __init__(self):
    self.index = 0

  def __next__(self):
    batch = _batch(self.index)
    self.index += 1
    return batch

  def state(self):
    return {"index": self.index}

  def restore(self, state):
    self.index = state["index"]


def _run(devices, steps=STEPS, **kwargs):
  setup = _setup(devices)
  train_step = _train_step(devices, **kwargs)
  state, metrics = _fresh_state(setup), []
  for i in range(steps):
    state, m = train_step(setup.frozen, state, _batch(i))
    metrics.append(jax.device_get(m))
  return state, metrics


@functools.cache
def _reference_run(devices):
  return _run(devices)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _assert_same_updates(actual, expected, initial, tolerance=1e-4):
  """Each factor moved from ``initial`` the same way, to float32 rounding.

  Compared norm-wise, relative to the change: LoRA-RITE's preconditioner
  (the pseudo-inverse of a small ``lora_b``) magnifies the ~1e-7 rounding of
  a reordered sum to ~1e-6 in single entries, but the updates agree to ~3e-6.
  """
  for path, a, e, i in zip(
      (jax.tree_util.keystr(p) for p, _ in
       jax.tree_util.tree_leaves_with_path(actual)),
      jax.tree.leaves(actual), jax.tree.leaves(expected),
      jax.tree.leaves(initial)):
    a, e, i = (np.asarray(x, np.float64) for x in (a, e, i))
    change = np.linalg.norm(e - i)
    assert change > 0, path
    assert np.linalg.norm(a - e) <= tolerance * change, path


def test_sharded_step_matches_one_device():
  """(a) The (2, 2, 2) mesh gives the one-device losses and params."""
  state_1, metrics_1 = _reference_run(1)
  state_8, metrics_8 = _reference_run(8)
  for m1, m8 in zip(metrics_1, metrics_8):
    assert m1["tokens"] == m8["tokens"] > 0
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  assert int(state_8.step) == STEPS
  _assert_same_updates(state_8.params, state_1.params, _setup(1).state.params)
  # The adapters did move away from their initialisation.
  b = _get(state_8.params, Q_A[:-1] + ("lora_b",))
  assert np.abs(np.asarray(b)).max() > 1e-3


def test_eval_step_is_the_train_loss():
  setup = _setup(1)
  eval_step = step_lib.make_eval_step(setup.graphdef, _mesh(1), setup.shardings,
                                      compute_dtype=jnp.float32)
  metrics = jax.device_get(eval_step(setup.frozen, setup.state.params,
                                     _batch(0)))
  reference = _reference_run(1)[1][0]
  np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=1e-6)
  assert metrics["tokens"] == reference["tokens"]
  np.testing.assert_allclose(metrics["loss_sum"],
                             metrics["loss"] * metrics["tokens"], rtol=1e-6)


def _param_paths(params):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _owner(path, params):
  """The param whose path appears in ``path`` (``[0].mu<param path>``)."""
  found = [p for p in params if p in jax.tree_util.keystr(path)]
  return max(found, key=len) if found else None


def test_step_keeps_optimizer_state_sharded_like_params():
  """(b) Every factor-sized state array leaves the step split like its param."""
  state, _ = _reference_run(8)
  params = _param_paths(state.params)
  checked = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
    owner = _owner(path, params)
    assert owner is not None or leaf.ndim == 0, jax.tree_util.keystr(path)
    if owner is None:
      continue
    param = params[owner]
    if leaf.shape == param.shape:
      assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (
          jax.tree_util.keystr(path), leaf.sharding, param.sharding)
      assert (leaf.sharding.is_fully_replicated
              == param.sharding.is_fully_replicated)
      checked += 1
    else:  # (r, r) moments and per-adapter scalars: small, replicated
      assert leaf.size <= RANK * RANK and leaf.sharding.is_fully_replicated
  # mu and basis of 14 adapters, two factors each.
  assert checked == 2 * 2 * 14
  rite_state = state.opt_state[0]
  for moment in (rite_state.mu, rite_state.basis):
    leaf = _get(moment, Q_A)
    assert leaf.sharding.spec == P("fsdp", None)
    assert not leaf.sharding.is_fully_replicated
    assert leaf.addressable_shards[0].data.shape == (64 // 2, RANK)
  # No r x r moments: the state is Adam's size (ScaleByLoraRiteState).
  assert rite_state.nu is None and rite_state.escape_mass is None
  assert _get(state.params, Q_A).sharding.spec == P("fsdp", None)


@pytest.mark.parametrize("name", sorted(rite_optax.OPTIMIZERS))
def test_opt_state_shardings_follow_params_for_every_optimizer(name):
  """The rule on every optimizer of the library (abstract: nothing compiles)."""
  hparams = {"scale": ALPHA / RANK} if name == "lora_pro" else {}
  tx = rite_optax.get_optimizer(name, 1e-3, **hparams)
  setup = _setup(8)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          setup.state.params)
  shardings = step_lib.opt_state_shardings(
      tx, abstract, setup.shardings.state.params)
  state = jax.eval_shape(tx.init, abstract)
  params = _param_paths(setup.state.params)
  flat_shardings = jax.tree.leaves(shardings)
  flat_state = jax.tree_util.tree_leaves_with_path(state)
  assert len(flat_shardings) == len(flat_state)
  for (path, leaf), leaf_sharding in zip(flat_state, flat_shardings):
    owner = _owner(path, params)
    if owner is not None and leaf.shape == params[owner].shape:
      assert leaf_sharding == params[owner].sharding, jax.tree_util.keystr(path)
    elif leaf.size > RANK * RANK:
      # Bigger than r x r yet not a param's shape (Shampoo's statistics):
      # never whole on every device.
      assert not leaf_sharding.is_fully_replicated, jax.tree_util.keystr(path)


def test_opt_state_shardings_rejects_an_ambiguous_flat_state():
  """A factor-sized leaf that no path ties to a param, where params of that
  shape are split differently, is an error rather than replicated."""
  setup = _setup(8)
  params = setup.state.params
  q_b = _get(params, ("layers", 0, "attn", "q", "lora_b"))
  o_b = _get(params, ("layers", 0, "attn", "o", "lora_b"))
  assert q_b.shape == o_b.shape and q_b.sharding != o_b.sharding

  def init(params):  # moments in a flat list, no param paths
    return [jnp.zeros_like(x) for x in jax.tree.leaves(params)]

  tx = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
  with pytest.raises(ValueError, match="sharded differently"):
    step_lib.opt_state_shardings(tx, params, setup.shardings.state.params)


def test_grad_accumulation_matches_one_big_batch():
  """(c) Two microbatches weighted by their token counts = one global batch."""
  state_1, metrics_1 = _reference_run(8)
  state_2, metrics_2 = _run(8, grad_accum_steps=2)
  for m1, m2 in zip(metrics_1, metrics_2):
    assert m1["tokens"] == m2["tokens"]
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  _assert_same_updates(state_2.params, state_1.params, _setup(8).state.params)
  first_1 = _first_moments(state_1.opt_state[0])
  first_2 = _first_moments(state_2.opt_state[0])
  _assert_same_updates(first_2, first_1, jax.tree.map(np.zeros_like, first_1))


def _first_moments(rite_state):
  """Each factor's first moment in weight space, ``mu[A] basis[B].T``.

  ScaleByLoraRiteState stores it split in two, defined up to a rotation
  (eigenvector signs that rounding may flip); the product is not.
  """
  def walk(mu, basis):
    if isinstance(mu, dict) and "lora_a" in mu:
      a, b = mu["lora_a"], mu["lora_b"]  # (in, r), (r, out)
      basis_a, basis_b = basis["lora_a"], basis["lora_b"]
      return {"lora_a": np.einsum("...ir,...ro->...io", a, basis_b),
              "lora_b": np.einsum("...ro,...ir->...oi", b, basis_a)}
    if isinstance(mu, dict):
      return {k: walk(mu[k], basis[k]) for k in mu}
    return [walk(m, b) for m, b in zip(mu, basis)]
  return walk(jax.device_get(rite_state.mu), jax.device_get(rite_state.basis))


def _losses_callback(losses):
  def on_step(step, metrics):
    del step
    losses.append(float(metrics["loss"]))
  return on_step


def test_resume_is_bit_exact(tmp_path):
  """(d) Stop, save, rebuild everything, restore, go on: the same run."""
  train_step = _train_step(8)
  total, stop = 6, 3

  setup = _setup(8)
  straight = []
  with ckpt_lib.Checkpoints(tmp_path / "straight") as checkpoints:
    result = ckpt_lib.train_loop(
        train_step, setup.frozen, _fresh_state(setup), _Batches(), checkpoints,
        num_steps=total, on_step=_losses_callback(straight))
  final_straight = jax.device_get(result.state)

  first = []
  with ckpt_lib.Checkpoints(tmp_path / "run", save_every=2) as checkpoints:
    result = ckpt_lib.train_loop(
        train_step, setup.frozen, _fresh_state(setup), _Batches(), checkpoints,
        num_steps=stop, on_step=_losses_callback(first))
    assert checkpoints.all_steps() == [2, 3]

  # A new process: the model and its state rebuilt from scratch (the compiled
  # step is a pure function of its arguments and is shared).
  model = nnx.clone(_model())
  fresh = step_lib.create_train_state(model, _tx(), _mesh(8))
  data = _Batches()
  second = []
  with ckpt_lib.Checkpoints(tmp_path / "run", save_every=2) as checkpoints:
    restored = checkpoints.restore_latest_valid(fresh.state)
    assert restored.step == stop and restored.data_state == {"index": stop}
    for r, t in zip(jax.tree.leaves(restored.state),
                    jax.tree.leaves(fresh.state)):
      assert r.sharding.is_equivalent_to(t.sharding, r.ndim)
    assert _get(restored.state.opt_state[0].mu, Q_A).sharding.spec == P(
        "fsdp", None)
    data.restore(restored.data_state)
    result = ckpt_lib.train_loop(
        train_step, fresh.frozen, restored.state, data, checkpoints,
        num_steps=total, on_step=_losses_callback(second))
    assert checkpoints.all_steps() == [3, 4, 6]  # every 2, the end, last 3
  assert first + second == straight  # bit-exact
  assert data.index == total
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               jax.device_get(result.state), final_straight)


def _numbered_states(setup, steps):
  """Distinct train states whose step matches the checkpoint step."""
  for step in steps:
    state = _fresh_state(setup)
    yield step, state._replace(
        step=jnp.asarray(step, jnp.int32),
        params=jax.tree.map(lambda x: x + step, state.params))


# A failed Orbax restore leaves tensorstore reads that complete after Orbax
# closed its asyncio loop; their callbacks report "Event loop is closed".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete", "metadata"])
def test_corrupt_checkpoint_names_it_and_falls_back(tmp_path, damage):
  """(e) A damaged newest step raises naming its directory; the previous one
  restores; only the newest max_to_keep steps are kept."""
  setup = _setup(8)
  with ckpt_lib.Checkpoints(tmp_path, max_to_keep=3,
                            async_save=False) as checkpoints:
    for step, state in _numbered_states(setup, range(2, 6)):
      assert checkpoints.save(step, state, {"index": step}, force=True)
    assert checkpoints.all_steps() == [3, 4, 5]

  newest = tmp_path / "5"
  arrays = sorted((newest / "train_state" / "d").iterdir())
  assert arrays
  if damage == "truncate":
    for f in arrays:
      os.truncate(f, f.stat().st_size // 2)
  elif damage == "delete":
    arrays[0].unlink()
  else:
    (newest / "train_state" / "_METADATA").unlink()
  # A save that died half-way: never a step, cleaned up on open.
  (tmp_path / "6.orbax-checkpoint-tmp-1234" / "train_state").mkdir(parents=True)

  with ckpt_lib.Checkpoints(tmp_path, max_to_keep=3) as checkpoints:
    assert checkpoints.all_steps() == [3, 4, 5]
    with pytest.raises(ckpt_lib.CheckpointError, match=str(newest)) as error:
      checkpoints.restore(5, setup.state)
    assert error.value.step == 5
    restored = checkpoints.restore_latest_valid(setup.state)
    assert restored.step == 4 and restored.data_state == {"index": 4}
    np.testing.assert_array_equal(_get(restored.state.params, Q_A),
                                  _get(setup.state.params, Q_A) + 4)
    # The broken step is set aside, so training can save step 5 again.
    assert checkpoints.all_steps() == [3, 4]
    assert len(list((tmp_path / ckpt_lib.QUARANTINE_DIR).iterdir())) == 1
    assert checkpoints.save(5, restored.state._replace(
        step=jnp.asarray(5, jnp.int32)), {"index": 5}, force=True)
    checkpoints.wait()
    assert checkpoints.restore(5, setup.state).data_state == {"index": 5}
    # Orbax removes it in the background, before its first save at the latest.
    assert not (tmp_path / "6.orbax-checkpoint-tmp-1234").exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint step 9"):
      checkpoints.restore(9, setup.state)


def test_sigterm_saves_and_stops(tmp_path):
  """(f) SIGTERM inside the loop: save that step, stop, restore the handler."""
  setup = _setup(8)
  previous = signal.getsignal(signal.SIGTERM)
  sent_at = 2

  def on_step(step, metrics):
    del metrics
    if step == sent_at:
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.monotonic() + 10
      while guard.received is None and time.monotonic() < deadline:
        time.sleep(0.01)

  data = _Batches()
  with ckpt_lib.Checkpoints(tmp_path, save_every=None) as checkpoints:
    with ckpt_lib.PreemptionGuard() as guard:
      assert signal.getsignal(signal.SIGTERM) != previous
      result = ckpt_lib.train_loop(
          _train_step(8), setup.frozen, _fresh_state(setup), data, checkpoints,
          num_steps=10, guard=guard, on_step=on_step)
    assert signal.getsignal(signal.SIGTERM) == previous
    assert guard.received == signal.SIGTERM
    assert result.preempted and result.step == sent_at == data.index
    assert checkpoints.all_steps() == [sent_at]
    restored = checkpoints.restore(sent_at, setup.state)
    assert restored.data_state == {"index": sent_at}
  assert threading.current_thread() is threading.main_thread()


def test_bf16_compute_keeps_lora_and_optimizer_state_float32():
  """(g) bfloat16 matmuls; the trainable state stays float32."""
  setup = _setup(1, jnp.bfloat16)
  train_step = _train_step(1, compute_dtype=jnp.bfloat16)
  state = _fresh_state(setup)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(setup.frozen))
  for i in range(2):
    state, metrics = train_step(setup.frozen, state, _batch(i))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    # The same weights as the float32 reference, computed in bfloat16.
    reference = _reference_run(1)[1][i]
    np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=2e-2)
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == jnp.float32
  for leaf in jax.tree.leaves(state.opt_state):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  # The frozen weights given to the step are still float32 (cast inside).
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(setup.frozen))


def test_initialize_distributed_is_a_no_op_on_one_cpu(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
               "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert not step_lib.is_multi_process_launch()
  assert not step_lib.initialize_distributed()
  assert jax.process_count() == 1
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert step_lib.is_multi_process_launch()


def test_relative_checkpoint_directory_is_taken_from_the_cwd(tmp_path,
                                                            monkeypatch):
  monkeypatch.chdir(tmp_path)
  with ckpt_lib.Checkpoints("runs/ckpt") as checkpoints:
    assert str(checkpoints.directory) == str(tmp_path / "runs" / "ckpt")
