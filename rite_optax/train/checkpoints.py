"""Checkpoints of LoRA training: keep the last few, resume, survive preemption.

A checkpoint of step ``n`` is the directory ``<directory>/<n>`` written by
Orbax's ``CheckpointManager`` with two items:

* ``train_state``: the :class:`~rite_optax.train.step.TrainState` (step, LoRA
  factors, optimizer state), arrays written by each process for its own
  shards (``ocp.args.StandardSave``);
* ``meta``: JSON, ``{"step": n, "data_iterator": <the data iterator's
  position>}`` (``ocp.args.JsonSave``), so that a resumed run reads the batches
  the interrupted one had not read yet.

The frozen base weights are not saved: they are the base checkpoint, loaded
again on resume.

Atomicity is Orbax's: a step is written into ``<n>.orbax-checkpoint-tmp-*``,
a ``commit_success.txt`` is added when every item is complete, and only then
is the directory renamed to ``<n>`` (on GCS, where renames are not atomic, the
commit file alone marks completion). A run killed mid-save leaves a temporary
directory that is never listed as a step, and is removed when the next
:class:`Checkpoints` opens the directory. What Orbax cannot see is damage done
after the commit (a truncated or deleted file, a lost metadata file):
:meth:`Checkpoints.restore` turns any failure into a :class:`CheckpointError`
naming the step directory, and :meth:`Checkpoints.restore_latest_valid` walks
back to the newest step that restores.

Preemption: a TPU VM about to be preempted (maintenance event, spot VM) gets
SIGTERM and some time to finish. :class:`PreemptionGuard` turns the signal
into a flag that :func:`train_loop` checks between steps: it saves the
current step, waits for the write to finish and returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

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

  Every process of a multi-host job must make the same calls.
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

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    """Wait for pending writes and release Orbax's threads."""
    self._manager.close()

  def wait(self) -> None:
    """Block until every pending save is on disk (and committed)."""
    self._manager.wait_until_finished()

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
    """
    if not (force or self.is_due(step)):
      return False
    if step in self._manager.all_steps():
      logger.info("checkpoint step %d already saved in %s", step,
                  self.directory)
      return False
    meta = {"step": int(step), "data_iterator": data_state}
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardSave(state),
            _META_ITEM: ocp.args.JsonSave(meta)}),
        force=True)
    if saved:
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
        truncated file, a metadata file lost, a different tree); the message
        names the step directory.
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
      raise CheckpointError(step, path, f"{type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or meta.get("step") != step:
      raise CheckpointError(step, path, f"its metadata is {meta!r}")
    if int(jax.device_get(state.step)) != step:
      raise CheckpointError(step, path,
                            f"its train state is at step {int(state.step)}")
    logger.info("restored checkpoint step %d from %s", step, path)
    return Restored(step, state, meta.get("data_iterator"))

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
