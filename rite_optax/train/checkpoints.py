"""Checkpoints of LoRA training: keep the last few, resume, survive preemption.

A checkpoint of step ``n`` is the directory ``<directory>/<n>`` written by
Orbax's ``CheckpointManager`` with two items:

* ``train_state``: the :class:`~rite_optax.train.step.TrainState` (step, LoRA
  factors, optimizer state), arrays written by each process for its own
  shards (``ocp.args.StandardSave``);
* ``meta``: JSON, ``{"step": n, "data_iterator": <the data iterator's
  position>, "digests": {<array path>: <checksum>}}`` (``ocp.args.JsonSave``),
  so that a resumed run reads the batches the interrupted one had not read
  yet, and can tell that the arrays it read are the ones that were written.

The frozen base weights are not saved: they are the base checkpoint, loaded
again on resume.

Atomicity is Orbax's: a step is written into ``<n>.orbax-checkpoint-tmp-*``,
a ``commit_success.txt`` is added when every item is complete, and only then
is the directory renamed to ``<n>`` (on GCS, where renames are not atomic, the
commit file alone marks completion). A run killed mid-save leaves a temporary
directory that is never listed as a step, and is removed when the next
:class:`Checkpoints` opens the directory. What Orbax cannot see is damage done
after the commit (a truncated or deleted file, a lost metadata file, a
flipped bit that still decodes): :meth:`Checkpoints.restore` turns any
failure into a one-line :class:`CheckpointError` naming the step directory
(and the array, where one is to blame), and
:meth:`Checkpoints.restore_latest_valid` walks back to the newest step that
restores.

Verification: :meth:`Checkpoints.save` computes two 32-bit
sums of each array's bits on the device (:func:`array_digests`, a single
pass, the same whatever the sharding, so a multi-host run needs no gathering)
and stores them in ``meta``; :meth:`Checkpoints.restore` recomputes them on
what it read and refuses a step whose digests differ or whose arrays are not
all finite. A state with a NaN or an infinity is never saved
(:class:`CheckpointSaveError`).

Failed saves (a full disk, a lost mount): with ``async_save`` the write runs
in the background, and its error surfaces at the next :meth:`Checkpoints.check`
(called by :meth:`Checkpoints.save`, so by a loop that calls ``save`` every
step, and cheap enough to call every step otherwise), :meth:`Checkpoints.wait`
or :meth:`Checkpoints.close`, as one :class:`CheckpointSaveError` naming the
step and the path; every later call raises it again.

Preemption: a TPU VM about to be preempted (maintenance event, spot VM) gets
SIGTERM and some time to finish. :class:`PreemptionGuard` turns the signal
into a flag that :func:`train_loop` checks between steps: it saves the
current step, waits for the write to finish and returns.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import signal
import time
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from rite_optax.train.step import TrainState

PyTree = Any
JsonDict = dict[str, Any]
StepCallback = Callable[[int, dict[str, jax.Array]], None]

_STATE_ITEM = "train_state"
_META_ITEM = "meta"
# Steps that failed to restore are moved here (see restore_latest_valid).
QUARANTINE_DIR = "corrupt"

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupt or incomplete)."""

  def __init__(self, step: int, path: epath.Path, reason: str):
    super().__init__(f"checkpoint step {step} at {path} cannot be restored: "
                     f"{reason}")
    self.step = step
    self.path = path


class CheckpointSaveError(RuntimeError):
  """A checkpoint was not saved: the write failed, or the state is not finite.

  A failed write is sticky: every later ``save``, ``check``, ``wait`` and
  ``close`` of that :class:`Checkpoints` raises it again, so a loop stops at
  it. A refused non-finite state leaves nothing written and nothing broken.
  """

  def __init__(self, step: int, path: epath.Path, reason: str):
    super().__init__(f"checkpoint step {step} at {path} was not saved: "
                     f"{reason}")
    self.step = step
    self.path = path


# The JSON spec TensorStore appends to its errors, after what went wrong.
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec.*$")


def _one_line(error: BaseException, limit: int = 1000) -> str:
  """``Type: first line`` of an error, at most ``limit`` characters.

  TensorStore's errors append the whole JSON spec of the array (~60 lines
  once printed), and asyncio's a cascade of "Event loop is closed"; what
  failed and where (the array key and the file, for TensorStore) is first.
  """
  lines = str(error).strip().splitlines()
  first = lines[0].strip() if lines else ""
  first = _TENSORSTORE_SPEC.sub("", first)
  if len(first) > limit:
    first = first[:limit] + "..."
  return f"{type(error).__name__}: {first}"


# An odd multiplier: a flipped bit changes a word by +-2^k, and an odd weight
# times 2^k is never 0 mod 2^32, so every single-bit error changes the sum.
_ODD_MULTIPLIER = 0x9E3779B1


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: every input bit flips half the output."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _as_words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words (8-byte dtypes get a trailing 2)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    unsigned = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  raise TypeError(f"no digest for dtype {x.dtype}")


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major position, mod 2^32, without a reshape (which
  would move data between the devices of a sharded array)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + (jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
                     * jnp.uint32(stride & 0xFFFFFFFF))
    stride *= shape[axis]
  return index


def _summary(x: jax.Array) -> jax.Array:
  """``[weighted sum, hashed sum, non-finite count]`` of one array, uint32.

  The weighted sum catches any single flipped bit for certain; the sum of
  hashes (of each word with its position) catches garbage spread over many
  words, which a linear sum of structured data can miss.
  """
  words = _as_words(x)
  index = _flat_index(words.shape)
  weighted = jnp.sum(words * ((index * jnp.uint32(_ODD_MULTIPLIER))
                              | jnp.uint32(1)), dtype=jnp.uint32)
  hashed = jnp.sum(_mix32(words ^ _mix32(index + jnp.uint32(0x7F4A7C15))),
                   dtype=jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    nonfinite = jnp.sum(~jnp.isfinite(x), dtype=jnp.uint32)
  else:
    nonfinite = jnp.zeros([], jnp.uint32)
  return jnp.stack([weighted, hashed, nonfinite])


@functools.lru_cache(maxsize=8)
def _summaries_fn(mesh: Optional[jax.sharding.Mesh]) -> Callable:
  # Replicated results, so that every process of a multi-host run reads them.
  out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  return jax.jit(lambda leaves: [_summary(x) for x in leaves],
                 out_shardings=out)


class ArrayDigest(NamedTuple):
  """What :func:`array_digests` finds in one array."""

  digest: str
  nonfinite: int
  size: int


def array_digests(tree: PyTree) -> dict[str, ArrayDigest]:
  """``{path: ArrayDigest}`` of every array leaf of ``tree``.

  ``digest`` is two 32-bit sums over the array's bits as uint32 words: of
  each word times an odd function of its position (any single flipped bit
  changes it), and of a hash of each word with its position (garbage over
  many words, or words moved, changes it but with odds of 2^-32). Computed in one compiled pass on the
  arrays' devices whatever their sharding (integer sums are exact, so the
  order of the reduction does not matter); cost: a read of the state, a few
  integer ops per element, and a host transfer of 12 bytes per array.
  """
  paths, leaves = [], []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    paths.append(jax.tree_util.keystr(path))
    leaves.append(leaf)
  if not leaves:
    return {}
  mesh = next((leaf.sharding.mesh for leaf in leaves
               if isinstance(getattr(leaf, "sharding", None), NamedSharding)),
              None)
  if jax.process_count() == 1:
    mesh = None
  summaries = _summaries_fn(mesh)(leaves)
  out = {}
  for path, leaf, summary in zip(paths, leaves, summaries):
    if isinstance(summary, jax.Array):
      summary = summary.addressable_data(0)
    first, second, nonfinite = (int(v) for v in np.asarray(summary))
    out[path] = ArrayDigest(f"{first:08x}{second:08x}", nonfinite,
                            int(np.size(leaf)))
  return out


def _nonfinite_reason(digests: dict[str, ArrayDigest]) -> Optional[str]:
  bad = [(path, d) for path, d in digests.items() if d.nonfinite]
  if not bad:
    return None
  path, d = bad[0]
  more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
  return f"{path} has {d.nonfinite} non-finite values of {d.size}{more}"


class Restored(NamedTuple):
  """A restored checkpoint.

  Attributes:
    step: its step.
    state: the :class:`TrainState`, each array with the target's sharding.
    data_state: the data iterator's position as saved (``None`` if none was).
  """

  step: int
  state: TrainState
  data_state: Optional[JsonDict]


def abstract_like(tree: PyTree, shardings: Optional[PyTree] = None) -> PyTree:
  """``tree`` as ``jax.ShapeDtypeStruct`` leaves that carry a sharding.

  Args:
    tree: arrays (a freshly created train state), or ``ShapeDtypeStruct``
      leaves (``jax.eval_shape``).
    shardings: the sharding of each leaf, the same tree; by default each
      array's own ``.sharding``.
  """
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None)),
        tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


class Checkpoints:
  """Periodic, keep-last-k, atomic checkpoints of a :class:`TrainState`.

  Usage::

      with Checkpoints(directory, save_every=500, max_to_keep=3) as ckpt:
        restored = ckpt.restore_latest_valid(setup.state)
        if restored:
          state = restored.state
          data.restore(restored.data_state)
        ...
        ckpt.save(step, state, data.state())   # writes only every 500 steps

  ``save`` refuses a non-finite state and, on every call, raises the
  :class:`CheckpointSaveError` of a background write that failed (a loop that
  does not call ``save`` every step calls :meth:`check`). Every process of a
  multi-host job must make the same calls.
  """

  def __init__(self, directory: str | os.PathLike, *,
               max_to_keep: Optional[int] = 3,
               save_every: Optional[int] = None, async_save: bool = True):
    """Opens (or creates) ``directory``.

    Args:
      directory: local path or ``gs://`` URL.
      max_to_keep: keep the newest this many steps (``None``: all).
      save_every: :meth:`save` writes when ``step % save_every == 0`` (and
        when forced); ``None``: only forced saves.
      async_save: write in a background thread; :meth:`save` returns once
        the arrays are copied to host memory, so the next (donating) train
        step may run at once. :meth:`wait` blocks until the write is done.
    """
    if save_every is not None and save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    # The step of a started save whose outcome is not known yet, and the
    # first failure, raised again by every later call.
    self._pending: Optional[int] = None
    self._failed: Optional[CheckpointSaveError] = None
    self._closed = False
    self.directory = epath.Path(directory)
    if not str(self.directory).startswith(("gs://", "/")):
      # Orbax takes absolute paths only; a relative one means the cwd's.
      self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
        # Leftovers of a save that was killed half-way; never valid steps.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE_ITEM, _META_ITEM))

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, exc_type, *exc_info) -> None:
    try:
      self.close()
    except CheckpointSaveError as e:
      if exc_type is None:
        raise
      # Do not hide the error that is already propagating.
      logger.error("%s", e)

  def close(self) -> None:
    """Wait for pending writes and release Orbax's threads.

    Raises:
      CheckpointSaveError: a save failed (Orbax is closed all the same). A
        second ``close`` does nothing.
    """
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self._manager.close()

  def wait(self) -> None:
    """Block until every pending save is on disk (and committed).

    Raises:
      CheckpointSaveError: a save failed.
    """
    if self._failed is None and self._pending is not None:
      self._settle_pending()
    if self._failed is not None:
      raise self._failed
    self._manager.wait_until_finished()

  def check(self) -> None:
    """Raise if a save failed; never blocks on a save in progress.

    Cheap (a flag read) while nothing is pending: call it every step to stop
    at the first failed save. In a multi-process run, each process sees the
    errors of its own writes; the one that raises stops, and the others stop
    at their next collective when the distributed runtime reports it gone.

    Raises:
      CheckpointSaveError: a save failed, naming the step and path.
    """
    if self._failed is not None:
      raise self._failed
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._settle_pending()
      if self._failed is not None:
        raise self._failed

  def _settle_pending(self) -> None:
    """Wait for the pending save and record its failure, if it failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed = CheckpointSaveError(step, self.step_path(step),
                                         _one_line(e))
      self._failed.__cause__ = e

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (temporary directories never count)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def is_due(self, step: int) -> bool:
    """Whether the periodic schedule saves ``step``."""
    return self.save_every is not None and step % self.save_every == 0

  def save(self, step: int, state: TrainState,
           data_state: Optional[JsonDict] = None, *,
           force: bool = False) -> bool:
    """Save ``state`` as step ``step`` if it is due (or ``force``).

    Args:
      step: the number of updates in ``state`` (``state.step``).
      state: the train state; may be donated to the next step as soon as this
        returns.
      data_state: the data iterator's position after the batches of these
        ``step`` updates, a JSON-able dict.
      force: save even if the schedule does not (preemption, end of run).

    Returns:
      Whether a save was started. A step that is already saved is not written
      again (a preemption right after a periodic save).

    Raises:
      CheckpointSaveError: this save or an earlier one failed (checked on
        every call, due or not), or ``state`` has a NaN or an infinity (then
        nothing is written: the last checkpoint stays the newest).
    """
    self.check()
    if not (force or self.is_due(step)):
      return False
    if step in self._manager.all_steps():
      logger.info("checkpoint step %d already saved in %s", step,
                  self.directory)
      return False
    digests = array_digests(state)
    nonfinite = _nonfinite_reason(digests)
    if nonfinite is not None:
      raise CheckpointSaveError(step, self.step_path(step),
                                f"refusing to save a non-finite state: "
                                f"{nonfinite}")
    meta = {"step": int(step), "data_iterator": data_state,
            "digests": {path: d.digest for path, d in digests.items()}}
    if self._pending is not None:
      # Orbax would wait for it inside save() and raise its error as this
      # step's; settle it first so an error names the step that failed.
      self._settle_pending()
      if self._failed is not None:
        raise self._failed
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(**{
              _STATE_ITEM: ocp.args.StandardSave(state),
              _META_ITEM: ocp.args.JsonSave(meta)}),
          force=True)
    except Exception as e:  # pylint: disable=broad-except
      # A synchronous save's write error.
      self._failed = CheckpointSaveError(step, self.step_path(step),
                                         _one_line(e))
      raise self._failed from e
    if saved:
      self._pending = step
      logger.info("saving checkpoint step %d to %s", step, self.step_path(step))
    return saved

  def restore(self, step: int, target: PyTree) -> Restored:
    """Restore step ``step`` onto the shardings of ``target``.

    Args:
      step: a saved step.
      target: a :class:`TrainState` of arrays (a freshly created one) or of
        ``ShapeDtypeStruct`` with shardings (:func:`abstract_like`): gives the
        tree, shapes, dtypes and where each restored array is placed.

    Raises:
      FileNotFoundError: no step ``step`` in the directory.
      CheckpointError: the step exists but does not restore (a missing or
        truncated file, a metadata file lost, a different tree), or what it
        read differs from what was saved (digests) or is not finite; the
        one-line message names the step directory and, for the last two, the
        array.
    """
    self.wait()
    path = self.step_path(step)
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint step {step} in {self.directory}; saved steps: "
          f"{self.all_steps()}")
    abstract = abstract_like(target)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              _STATE_ITEM: ocp.args.StandardRestore(abstract),
              _META_ITEM: ocp.args.JsonRestore()}))
      state, meta = restored[_STATE_ITEM], restored[_META_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      # Tensorstore, JSON and tree errors alike: what matters to the caller is
      # which checkpoint is unusable.
      raise CheckpointError(step, path, _one_line(e)) from e
    if not isinstance(meta, dict) or meta.get("step") != step:
      raise CheckpointError(step, path, f"its metadata is {meta!r:.200}")
    self._verify(step, path, state, meta.get("digests"))
    if int(jax.device_get(state.step)) != step:
      raise CheckpointError(step, path,
                            f"its train state is at step {int(state.step)}")
    logger.info("restored checkpoint step %d from %s", step, path)
    return Restored(step, state, meta.get("data_iterator"))

  def _verify(self, step: int, path: epath.Path, state: TrainState,
              saved: Optional[dict[str, str]]) -> None:
    """Raise :class:`CheckpointError` unless ``state`` is what was saved."""
    digests = array_digests(state)
    if saved is None:
      logger.warning("checkpoint step %d at %s has no digests (written before "
                     "they were recorded): checking finiteness only", step,
                     path)
    else:
      if set(saved) != set(digests):
        differ = sorted(set(saved) ^ set(digests))
        raise CheckpointError(step, path, f"its arrays differ from the "
                              f"digests saved with it: {differ[:3]}")
      for name, d in digests.items():
        if d.digest != saved[name]:
          also = f", {d.nonfinite} non-finite values" if d.nonfinite else ""
          raise CheckpointError(
              step, path, f"{name}: data corrupt (digest {d.digest}, saved "
              f"{saved[name]}{also})")
    nonfinite = _nonfinite_reason(digests)
    if nonfinite is not None:
      raise CheckpointError(step, path, nonfinite)

  def restore_latest(self, target: PyTree) -> Optional[Restored]:
    """:meth:`restore` of the newest step; ``None`` if there is none."""
    step = self.latest_step()
    return None if step is None else self.restore(step, target)

  def restore_latest_valid(self, target: PyTree, *,
                           quarantine: bool = True) -> Optional[Restored]:
    """The newest step that restores, skipping (and logging) broken ones.

    Args:
      target: as for :meth:`restore`.
      quarantine: move each broken step to ``<directory>/corrupt/<step>``,
        kept for inspection. Otherwise the resumed run would reach that step
        number again and find it taken, and keep-last-k would count it.

    Returns:
      The restored checkpoint, or ``None`` if no step restores (or none was
      saved): start from scratch.
    """
    self.wait()
    skipped = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, target)
      except CheckpointError as e:
        logger.warning("skipping checkpoint: %s", e)
        skipped.append(step)
        continue
      break
    else:
      restored = None
    if skipped:
      logger.warning("checkpoint steps %s in %s do not restore; resuming from "
                     "%s", skipped, self.directory,
                     restored.step if restored else "scratch")
      if quarantine:
        self._quarantine(skipped)
    return restored

  def _quarantine(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      (self.directory / QUARANTINE_DIR).mkdir(parents=True, exist_ok=True)
      for step in steps:
        destination = (self.directory / QUARANTINE_DIR
                       / f"{step}-{time.time_ns()}")
        self.step_path(step).rename(destination)
        logger.warning("moved broken checkpoint step %d to %s", step,
                       destination)
    multihost_utils.sync_global_devices("rite_optax checkpoints quarantine")
    self._manager.reload()


class PreemptionGuard:
  """Turns SIGTERM into a flag that the training loop checks between steps.

  ``with PreemptionGuard() as guard:`` installs the handler and restores the
  previous one on exit. The handler only records the signal: saving inside a
  signal handler could interrupt a half-finished step or a save in progress.

  With several processes (a TPU pod) JAX's preemption service, started by
  ``jax.distributed.initialize``, owns SIGTERM and makes every host agree on
  one step to save at (``multihost_utils.reached_preemption_sync_point``); a
  local flag would let hosts stop at different steps and deadlock the save.
  So the handler is installed only in a single-process run, and
  :meth:`should_stop` asks JAX in a multi-process one.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self.received: Optional[int] = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signum
    logger.warning("received %s: saving and stopping after this step",
                   signal.Signals(signum).name)

  def install(self) -> "PreemptionGuard":
    if jax.process_count() == 1 and not self._previous:
      for signum in self.signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  def __enter__(self) -> "PreemptionGuard":
    return self.install()

  def __exit__(self, *exc_info) -> None:
    self.uninstall()

  def should_stop(self, step: int) -> bool:
    """Whether to save ``step`` and stop. Call at every step, on every host."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None


class DataIterator(Protocol):
  """The data :func:`train_loop` reads: batches, and a resumable position."""

  def __next__(self) -> Any: ...

  def state(self) -> JsonDict: ...

  def restore(self, state: JsonDict) -> None: ...


@dataclasses.dataclass
class LoopResult:
  """How :func:`train_loop` ended.

  Attributes:
    state: the last train state.
    step: its step.
    preempted: stopped by :class:`PreemptionGuard` (after saving ``step``).
  """

  state: TrainState
  step: int
  preempted: bool


def train_loop(train_step: Callable[[PyTree, TrainState, Any],
                                    tuple[TrainState, dict[str, jax.Array]]],
               frozen: PyTree, state: TrainState, data: DataIterator,
               checkpoints: Checkpoints, *, num_steps: int,
               guard: Optional[PreemptionGuard] = None,
               on_step: Optional[StepCallback] = None) -> LoopResult:
  """Train from ``state.step`` up to ``num_steps``, checkpointing on the way.

  Saves every ``checkpoints.save_every`` steps and at the end. When ``guard``
  reports a preemption, saves the current step (with the data position: the
  batches of the steps taken so far are consumed, no more), waits for the
  write and returns with ``preempted=True``.

  Args:
    train_step: from :func:`rite_optax.train.step.make_train_step`.
    frozen, state: from ``create_train_state`` or a restore.
    data: yields batches; ``state()`` / ``restore()`` its position.
    checkpoints: where to save.
    num_steps: the step to stop at.
    guard: an installed :class:`PreemptionGuard`.
    on_step: called as ``on_step(step, metrics)`` after each update (metrics
      are device arrays: fetching them every step costs a host sync).
  """
  step = int(jax.device_get(state.step))
  preempted = False
  while step < num_steps:
    if guard is not None and guard.should_stop(step):
      checkpoints.save(step, state, data.state(), force=True)
      preempted = True
      break
    state, metrics = train_step(frozen, state, next(data))
    step += 1
    if on_step is not None:
      on_step(step, metrics)
    if step < num_steps:
      checkpoints.save(step, state, data.state())
  if not preempted:
    checkpoints.save(step, state, data.state(), force=True)
  checkpoints.wait()
  return LoopResult(state, step, preempted)
