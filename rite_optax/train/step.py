"""The train and eval steps of LoRA fine-tuning on a device mesh.

A Flax NNX model with LoRA adapters is split once, outside ``jax.jit``, into
three parts::

    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, FROZEN)

the static structure, the LoRA factors (``nnx.LoRAParam``, the only thing the
optimizer sees) and the frozen base weights. Both parameter trees are kept as
plain nested dicts of arrays (``nnx.to_pure_dict``), so optimizer states and
checkpoints have ordinary paths (``['layers'][0]['attn']['q']['lora_a']``).
The step is a pure function ``(frozen, state, batch) -> (state, metrics)``
compiled once with explicit shardings:

* parameters are placed by their logical axes
  (:data:`rite_optax.models.sharding.LOGICAL_RULES`): FSDP over ``fsdp``,
  tensor parallelism over ``tensor``, replicas over ``data``;
* the optimizer state follows its parameters (:func:`opt_state_shardings`);
* the batch is split over ``("data", "fsdp")`` on its batch axis.

The loss is the token mean of the cross entropy over the target tokens of the
whole global batch (``loss_mask``), also when the batch is processed in
``grad_accum_steps`` microbatches: gradients and losses are summed over
microbatches and divided by the global token count once, so accumulation
changes only the order of float additions.

Multi-host (TPU pods): call :func:`initialize_distributed` first thing in the
program, feed each process its slice of the global batch through
:func:`shard_batch`, and everything else is unchanged.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rite_optax.lora_rite import skip_metrics
from rite_optax.models import lora
from rite_optax.models import sharding as sharding_lib

PyTree = Any
Batch = Mapping[str, Any]
# (model, batch) -> (sum of the masked per-token losses, number of tokens).
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array]]
Rules = Sequence[tuple[str, Any]]


class TrainState(NamedTuple):
  """Everything that changes during training, and all that a checkpoint holds.

  Attributes:
    step: number of optimizer updates taken, ``int32`` scalar.
    params: the LoRA factors, ``nnx.to_pure_dict(nnx.state(model,
      nnx.LoRAParam))``, float32 whatever the compute dtype.
    opt_state: the optimizer's state for ``params``.
  """

  step: jax.Array
  params: PyTree
  opt_state: optax.OptState


class TrainShardings(NamedTuple):
  """``NamedSharding`` trees of the frozen weights and of a train state."""

  frozen: PyTree
  state: TrainState


class TrainSetup(NamedTuple):
  """What :func:`create_train_state` returns, unpackable as a tuple.

  Attributes:
    graphdef: the model's static structure, for :func:`make_train_step`.
    frozen: the frozen base weights, a nested dict of arrays on the mesh.
    state: the initial :class:`TrainState`, on the mesh.
    shardings: their shardings, for ``jax.jit`` and checkpoint restores.
  """

  graphdef: nnx.GraphDef
  frozen: PyTree
  state: TrainState
  shardings: TrainShardings


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """``(graphdef, trainable, frozen)``, the last two as nested dicts.

  ``trainable`` holds the ``nnx.LoRAParam`` factors, ``frozen`` every other
  ``nnx.Param``. Raises if the model holds any other variable (a cache, an
  RNG state): this step would silently drop its updates.
  """
  graphdef, trainable, frozen = nnx.split(model, lora.TRAINABLE, lora.FROZEN)
  return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a whole copy on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def _key_name(key: Any) -> Any:
  """The dict key, attribute name or sequence index of a path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _path_names(path: Sequence[Any]) -> tuple[Any, ...]:
  return tuple(_key_name(k) for k in path)


def _carry_axes(shape: Sequence[int], param_shape: Sequence[int],
                spec: PartitionSpec) -> PartitionSpec:
  """A spec for a state array of ``shape`` derived from its param's spec.

  Each axis of the state array that has the length of a sharded axis of the
  param is sharded like it (each param axis used once): Shampoo's ``(m, m)``
  statistics of an ``(m, r)`` factor get ``P(spec[0], None)``, while an
  ``(r, r)`` second moment shares no long axis and stays replicated.
  """
  entries = list(spec) + [None] * (len(param_shape) - len(spec))
  free = [j for j, entry in enumerate(entries) if entry is not None]
  out = []
  for length in shape:
    j = next((j for j in free if param_shape[j] == length), None)
    if j is None:
      out.append(None)
    else:
      free.remove(j)
      out.append(entries[j])
  return PartitionSpec(*out)


def _owner(names: tuple[Any, ...], param_paths: Mapping[tuple[Any, ...], Any]
           ) -> Optional[tuple[Any, ...]]:
  """The longest param path found as a contiguous run of ``names``.

  ``[0].mu['layers'][0]['q']['lora_a']`` belongs to ``['layers'][0]['q']
  ['lora_a']``, and so does a per-param record field after it, such as
  Shampoo's ``[0].stats['layers'][0]['q']['lora_a'].left``.
  """
  best = None
  for start in range(len(names)):
    for stop in range(len(names), start, -1):
      if names[start:stop] in param_paths:
        if best is None or stop - start > len(best):
          best = names[start:stop]
        break
  return best


def opt_state_shardings(tx: optax.GradientTransformation, params: PyTree,
                        param_shardings: PyTree) -> PyTree:
  """The sharding of every array of ``tx.init(params)``, from the params'.

  Optax states mirror the parameter tree: a moment of the param at
  ``['layers'][0]['attn']['q']['lora_a']`` sits at a path ending with that
  same path (``[0].mu['layers'][0]['attn']['q']['lora_a']``). The rule, for
  each leaf of the abstract state (``jax.eval_shape(tx.init, params)``, so
  nothing is allocated):

  1. If a param's path occurs in the leaf's path (the longest such param;
     usually as its end, or followed by the field of a per-param record like
     Shampoo's ``.left``), the leaf belongs to that param. Same shape: the
     param's sharding (``mu``, ``basis``, Adam's ``nu``). Other shape: each
     axis of the length of a sharded param axis keeps that axis' mesh axes,
     the rest is replicated (LoRA-RITE's ``(r, r)`` ``nu`` and scalar escape
     mass are replicated, Shampoo's ``(m, m)`` statistics split like ``m``).
  2. Otherwise, if the leaf has the shape of some params and those share one
     sharding, that sharding (a state that stores moments in a flat list).
     If they disagree the leaf is ambiguous and this raises, rather than
     replicating a factor-sized array by accident.
  3. Anything else (step counts, injected hyperparameters) is replicated.

  Matching by path, not by shape alone, matters: ``q``'s ``lora_b`` and
  ``o``'s ``lora_b`` may both be ``(r, d_model)`` yet are split over
  different mesh axes.

  Args:
    tx: the optimizer.
    params: the trainable params, concrete or abstract (``ShapeDtypeStruct``).
    param_shardings: a ``NamedSharding`` per param, the same tree.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tx.init(params)``.

  Raises:
    ValueError: if the trees differ, or a state leaf is ambiguous (rule 2).
  """
  param_leaves = jax.tree_util.tree_leaves_with_path(params)
  sharding_leaves = jax.tree.leaves(param_shardings)
  if jax.tree.structure(params) != jax.tree.structure(param_shardings):
    raise ValueError("params and param_shardings must have the same tree")
  if not sharding_leaves:
    raise ValueError("opt_state_shardings: there are no params")
  mesh = sharding_leaves[0].mesh
  by_path = {}
  by_shape: dict[tuple[int, ...], list] = {}
  for (path, leaf), sharding in zip(param_leaves, sharding_leaves):
    by_path[_path_names(path)] = (tuple(leaf.shape), sharding)
    by_shape.setdefault(tuple(leaf.shape), []).append(
        (jax.tree_util.keystr(path), sharding))

  def leaf_sharding(path, leaf):
    names = _path_names(path)
    shape = tuple(leaf.shape)
    owner = _owner(names, by_path)
    if owner is not None:
      param_shape, sharding = by_path[owner]
      if shape == param_shape:
        return sharding
      return NamedSharding(mesh, _carry_axes(shape, param_shape, sharding.spec))
    candidates = by_shape.get(shape, [])
    if len({sharding for _, sharding in candidates}) > 1:
      raise ValueError(
          f"optimizer state {jax.tree_util.keystr(path)} {shape}: its path "
          f"matches no param, and the params of that shape are sharded "
          f"differently ({', '.join(f'{p}: {s.spec}' for p, s in candidates)})")
    if candidates:
      return candidates[0][1]
    return replicated(mesh)

  abstract = jax.eval_shape(tx.init, params)
  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract)


def train_shardings(model: nnx.Module, tx: optax.GradientTransformation,
                    mesh: Mesh, rules: Rules = sharding_lib.LOGICAL_RULES
                    ) -> TrainShardings:
  """Where the frozen weights and every part of the train state live.

  ``model`` may be abstract (``nnx.eval_shape(...)``): only shapes and the
  logical axes of its variables are read.
  """
  _, trainable, frozen = nnx.split(model, lora.TRAINABLE, lora.FROZEN)
  param_shardings = nnx.to_pure_dict(
      sharding_lib.model_shardings(trainable, mesh, rules))
  frozen_shardings = nnx.to_pure_dict(
      sharding_lib.model_shardings(frozen, mesh, rules))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(trainable))
  state = TrainState(
      step=replicated(mesh), params=param_shardings,
      opt_state=opt_state_shardings(tx, params, param_shardings))
  return TrainShardings(frozen=frozen_shardings, state=state)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       mesh: Mesh, rules: Rules = sharding_lib.LOGICAL_RULES
                       ) -> TrainSetup:
  """Split ``model``, place it on ``mesh`` and initialise the optimizer there.

  The optimizer state is created by a ``jax.jit``-compiled ``tx.init`` with
  the derived output shardings, so no factor-sized array is ever whole on one
  device. ``model`` itself is left untouched.

  Returns:
    ``TrainSetup(graphdef, frozen, state, shardings)``.
  """
  shardings = train_shardings(model, tx, mesh, rules)
  graphdef, trainable, frozen = split_model(model)
  frozen = jax.device_put(frozen, shardings.frozen)
  params = jax.device_put(trainable, shardings.state.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.state.opt_state)(params)
  step = jax.device_put(jnp.zeros([], jnp.int32), shardings.state.step)
  return TrainSetup(graphdef, frozen, TrainState(step, params, opt_state),
                    shardings)


def decoder_loss_sums(model: nnx.Module, batch: Batch
                      ) -> tuple[jax.Array, jax.Array]:
  """Summed masked cross entropy of a decoder-only batch, and its token count.

  The batch format of the fine-tuning pipeline: ``inputs``, ``targets``,
  ``loss_mask``, ``attention_mask``, all ``(B, T)``.
  """
  logits = model(batch["inputs"], attention_mask=batch["attention_mask"])
  return _masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])


def gather_loss_positions(values: jax.Array, loss_mask: jax.Array,
                          num: int) -> jax.Array:
  """``values (B, T, ...)`` at the first ``num`` positions of each row where
  ``loss_mask`` is set, in order: ``(B, num, ...)``.

  Rows with fewer such positions are filled with other positions (their mask,
  gathered the same way, is 0 there). A static-shape gather, so that the
  unembedding and the softmax run on ``num`` positions a row instead of all
  ``T``: with Gemma 3's 262,144-row vocabulary they cost more than the
  whole 270M model's body per position.
  """
  # Stable: masked positions first, each group in sequence order.
  order = jnp.argsort(loss_mask <= 0, axis=1, stable=True)[:, :num]
  index = order.reshape(order.shape + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, index, axis=1)


def decoder_answer_loss_sums(max_loss_tokens: int) -> LossFn:
  """:func:`decoder_loss_sums` with the unembedding on the loss positions only.

  The model's ``hidden_states`` are gathered at the first
  ``max_loss_tokens`` target positions of each row
  (:func:`gather_loss_positions`) before ``logits_from_hidden``; target
  tokens beyond them are out of the loss (the fine-tuning loop refuses data
  whose targets are longer). Equal to :func:`decoder_loss_sums` when no row
  has more target tokens.
  """
  if max_loss_tokens < 1:
    raise ValueError(f"max_loss_tokens must be >= 1, got {max_loss_tokens}")

  def loss_sums(model: nnx.Module, batch: Batch
                ) -> tuple[jax.Array, jax.Array]:
    hidden = model.hidden_states(batch["inputs"],
                                 attention_mask=batch["attention_mask"])
    mask = batch["loss_mask"]
    take = lambda x: gather_loss_positions(x, mask, max_loss_tokens)
    logits = model.logits_from_hidden(take(hidden))
    return _masked_cross_entropy(logits, take(batch["targets"]), take(mask))

  return loss_sums


def seq2seq_loss_sums(model: nnx.Module, batch: Batch
                      ) -> tuple[jax.Array, jax.Array]:
  """:func:`decoder_loss_sums` for encoder-decoder (mT5) batches."""
  logits = model(batch["inputs"], batch["decoder_inputs"],
                 batch["encoder_mask"], batch["decoder_mask"])
  return _masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])


def _masked_cross_entropy(logits, targets, loss_mask):
  # Softmax in float32 whatever the compute dtype: bf16 log-probabilities of a
  # 256k vocabulary lose the small differences the loss is made of.
  per_token = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(per_token * mask), jnp.sum(mask)


def _cast_floating(tree: PyTree, dtype: Any) -> PyTree:
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      tree)


def split_microbatches(batch: Batch, num: int, mesh: Mesh) -> Batch:
  """Each ``(B, ...)`` array as ``(num, B // num, ...)``, microbatch-major.

  Microbatch ``i`` takes rows ``i, i + num, i + 2 num, ...``: with the batch
  axis split into contiguous blocks over the devices, every device then holds
  its own rows of every microbatch (if ``B / devices`` is a multiple of
  ``num``), so the split moves no data.
  """
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch size {x.shape[0]} is not a multiple of "
                       f"grad_accum_steps={num}")
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))))

  return jax.tree.map(split, dict(batch))


def _loss_and_grad_sums(graphdef, loss_fn, params, frozen, batch):
  """Summed loss, token count and gradient of the summed loss."""

  def summed_loss(params):
    model = nnx.merge(graphdef, params, frozen)
    return loss_fn(model, batch)

  (loss_sum, tokens), grads = jax.value_and_grad(summed_loss, has_aux=True)(
      params)
  return loss_sum, tokens, grads


def all_finite(*trees: PyTree) -> jax.Array:
  """A bool scalar: whether every floating-point entry of ``trees`` is finite."""
  leaves = [x for x in jax.tree.leaves(trees)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  # x * 0 is 0 where x is finite and NaN where it is not, so one sum of them
  # is finite exactly when every entry is: a plain reduction per leaf, which
  # XLA fuses into the producers (a stack of per-leaf all(isfinite) made the
  # Gemma 3 270M train step compile 30x slower on CPU).
  total = sum(jnp.sum(x * jnp.zeros([], x.dtype), dtype=jnp.float32)
              for x in leaves)
  return jnp.isfinite(total)


def keep_finite(old: TrainState, new: TrainState, *checked: PyTree
                ) -> tuple[TrainState, jax.Array]:
  """``new``, or ``old``'s params and optimizer state if anything is not finite.

  Guards the whole update rather than the optimizer's output (as
  ``optax.apply_if_finite`` does): the optimizer state tree stays the
  optimizer's own (checkpoints and shardings unchanged), and a NaN that only
  reaches the params (an overflowing update) or a moment is caught too.

  Args:
    old: the state before the update.
    new: the state after it.
    *checked: more trees that must be finite (the loss, the gradient).

  Returns:
    ``(state, skipped)``: ``state`` has ``new.step``; ``skipped`` is an
    ``int32`` scalar, 1 if ``old``'s params and optimizer state were kept.
  """
  finite = all_finite(new.params, new.opt_state, *checked)
  # One conditional, not a select per leaf: with a select per leaf of the
  # state, XLA's CPU compile of the Gemma 3 270M step took 424 s instead of
  # 20 s.
  params, opt_state = jax.lax.cond(
      finite, lambda: (new.params, new.opt_state),
      lambda: (old.params, old.opt_state))
  return (TrainState(new.step, params, opt_state),
          jnp.logical_not(finite).astype(jnp.int32))


class NonFiniteStepsError(FloatingPointError):
  """Too many consecutive train steps were skipped as non-finite."""


class NonFiniteSteps:
  """Host-side count of skipped steps; stops a loop after a run of them.

  The train step already keeps NaN out of the state (``skip_nonfinite``), so
  a long run of skipped steps means training is stuck (learning rate too
  high, a broken batch stream), not that the state is lost: stopping keeps
  the last checkpoint, which is finite. Usage, after every step::

      nonfinite = NonFiniteSteps(max_consecutive=20)
      ...
      state, metrics = train_step(frozen, state, batch)
      nonfinite.update(step, metrics)   # raises NonFiniteStepsError

  ``metrics`` may be device arrays (fetching them syncs with the device) or
  fetched ones; calling it on every step of a buffered log, in order, is the
  same.

  Attributes:
    max_consecutive: raise when this many steps in a row were skipped.
    total: steps skipped so far.
    consecutive: steps skipped since the last good one.
    first_bad_step: the first step of the current run of skipped steps.
  """

  def __init__(self, max_consecutive: int):
    if max_consecutive < 1:
      raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
    self.max_consecutive = max_consecutive
    self.total = 0
    self.consecutive = 0
    self.first_bad_step: Optional[int] = None

  def update(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Record step ``step`` (1-based: the state's step after it).

    Raises:
      NonFiniteStepsError: ``max_consecutive`` steps in a row were skipped.
    """
    if int(np.asarray(jax.device_get(metrics["nonfinite_steps"]))) == 0:
      self.consecutive, self.first_bad_step = 0, None
      return
    self.total += 1
    self.consecutive += 1
    if self.first_bad_step is None:
      self.first_bad_step = step
    if self.consecutive >= self.max_consecutive:
      values = ", ".join(
          f"{name} {float(np.asarray(jax.device_get(metrics[name]))):g}"
          for name in ("loss", "grad_norm") if name in metrics)
      raise NonFiniteStepsError(
          f"steps {self.first_bad_step}..{step}: {self.consecutive} "
          f"consecutive non-finite steps (last: {values}); their updates "
          f"were skipped, so params and optimizer state are those of step "
          f"{self.first_bad_step - 1}; stopping (lower the learning rate or "
          f"check the data)")


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    mesh: Mesh, shardings: TrainShardings, *,
                    grad_accum_steps: int = 1,
                    compute_dtype: Any = jnp.bfloat16,
                    loss_fn: LossFn = decoder_loss_sums,
                    skip_nonfinite: bool = True,
                    ) -> Callable[[PyTree, TrainState, Batch],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """The compiled ``step(frozen, state, batch) -> (state, metrics)``.

  Args:
    graphdef, shardings: from :func:`create_train_state`.
    tx: the optimizer the state was created with.
    mesh: the ``(data, fsdp, tensor)`` mesh.
    grad_accum_steps: the global batch is processed as that many microbatches
      in a ``jax.lax.scan``; the result is the single-batch step's up to float
      rounding, with ``1 / grad_accum_steps`` of its activation memory.
    compute_dtype: the frozen weights are cast to it inside the step (so FSDP
      gathers half as many bytes in bfloat16); ``None`` keeps them as stored.
      The activations follow the model's own ``dtype`` (``GemmaConfig.dtype``:
      build the model with ``dtype=jnp.bfloat16`` for bfloat16 matmuls). The
      LoRA factors, gradients and optimizer state stay in their dtype
      (float32), and the loss is taken in float32.
    loss_fn: ``(model, batch) -> (loss sum, token count)``;
      :func:`seq2seq_loss_sums` for mT5.
    skip_nonfinite: a step whose loss, gradient, new params or new optimizer
      state has a NaN or an infinity leaves params and optimizer state as
      they were (:func:`keep_finite`), for any optimizer; ``state.step``
      still counts it (it counts the batches consumed). Costs one finiteness
      reduction and one select per state array.

  Returns:
    A ``jax.jit`` function with explicit in and out shardings that donates the
    state argument (do not reuse it after the call). ``metrics`` holds
    ``loss`` (token mean over the global batch, before the update),
    ``tokens`` (target tokens in the batch), ``grad_norm`` (global norm of
    the gradient of the mean loss) and, with ``skip_nonfinite``,
    ``nonfinite_steps`` (1 if this step was skipped, else 0: summed over
    steps, the number skipped; :class:`NonFiniteSteps` stops a loop on a run
    of them). ``skipped_factors`` and ``skippable_factors``: LoRA-RITE's
    factors skipped by this update, and how many there are
    (:func:`rite_optax.lora_rite.skip_metrics`; pass the metrics to
    :func:`rite_optax.warn_if_every_factor_skipped` on the host).
  """
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

  def step(frozen, state: TrainState, batch):
    frozen = _cast_floating(frozen, compute_dtype)
    if grad_accum_steps == 1:
      loss_sum, tokens, grads = _loss_and_grad_sums(
          graphdef, loss_fn, state.params, frozen, batch)
    else:
      def accumulate(carry, microbatch):
        loss_sum, tokens, grads = carry
        micro_loss, micro_tokens, micro_grads = _loss_and_grad_sums(
            graphdef, loss_fn, state.params, frozen, microbatch)
        return (loss_sum + micro_loss, tokens + micro_tokens,
                jax.tree.map(jnp.add, grads, micro_grads)), None

      zero = jnp.zeros([], jnp.float32)
      init = (zero, zero, jax.tree.map(jnp.zeros_like, state.params))
      (loss_sum, tokens, grads), _ = jax.lax.scan(
          accumulate, init,
          split_microbatches(batch, grad_accum_steps, mesh))
    # One division by the global token count: the token mean of the whole
    # batch, however it was split.
    denominator = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denominator.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denominator, "tokens": tokens,
               "grad_norm": optax.tree.norm(grads),
               # LoRA-RITE's skipped factors (0 for other optimizers).
               **skip_metrics(opt_state)}
    new_state = TrainState(state.step + 1, params, opt_state)
    if skip_nonfinite:
      new_state, metrics["nonfinite_steps"] = keep_finite(
          state, new_state, loss_sum, grads)
    return new_state, metrics

  return jax.jit(
      step,
      in_shardings=(shardings.frozen, shardings.state,
                    sharding_lib.batch_sharding(mesh)),
      out_shardings=(shardings.state, replicated(mesh)),
      donate_argnums=(1,))


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh,
                   shardings: TrainShardings, *,
                   compute_dtype: Any = jnp.bfloat16,
                   loss_fn: LossFn = decoder_loss_sums,
                   ) -> Callable[[PyTree, PyTree, Batch], dict[str, jax.Array]]:
  """The compiled ``eval_step(frozen, params, batch) -> metrics``, no update.

  ``params`` is ``state.params``. ``metrics`` holds ``loss`` (token mean),
  ``loss_sum`` and ``tokens``: sum the last two over batches for the token
  mean of a whole evaluation set.
  """

  def eval_step(frozen, params, batch):
    model = nnx.merge(graphdef, params, _cast_floating(frozen, compute_dtype))
    loss_sum, tokens = loss_fn(model, batch)
    return {"loss": loss_sum / jnp.maximum(tokens, 1.0), "loss_sum": loss_sum,
            "tokens": tokens}

  return jax.jit(
      eval_step,
      in_shardings=(shardings.frozen, shardings.state.params,
                    sharding_lib.batch_sharding(mesh)),
      out_shardings=replicated(mesh))


def shard_batch(batch: Batch, mesh: Mesh, *, global_batch: bool = False
                ) -> dict[str, jax.Array]:
  """Place a batch on ``mesh``, split over ``("data", "fsdp")``.

  With one process, ``batch`` is the global batch. With several (a TPU pod),
  each process passes its own rows, ``global_batch / process_count`` of them,
  and the global array is assembled without copying between hosts; or, with
  ``global_batch=True``, every process passes the same global batch and fills
  only its own devices' rows from it, which is right for any device order of
  a multi-host mesh.
  """
  target = sharding_lib.batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), target)
  if global_batch:
    return {name: jax.make_array_from_callback(
        np.shape(x), target, lambda index, x=np.asarray(x): x[index])
            for name, x in batch.items()}
  return {name: jax.make_array_from_process_local_data(target, np.asarray(x))
          for name, x in batch.items()}


# Environment variables that only a multi-process launch sets.
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS",
                      "MEGASCALE_COORDINATOR_ADDRESS", "TPU_PROCESS_ADDRESSES")
_PROCESS_COUNT_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _on_cloud_tpu_vm() -> bool:
  # The test JAX itself uses (jax._src.cloud_tpu_init): libtpu installed and
  # TPU chips attached.
  return (importlib.util.find_spec("libtpu") is not None
          and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*")))


def is_multi_process_launch() -> bool:
  """Whether this process is one of several that must form one JAX system."""
  if any(os.environ.get(name) for name in _MULTI_PROCESS_ENV):
    return True
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  for name in _PROCESS_COUNT_ENV:
    try:
      if int(os.environ.get(name, "1")) > 1:
        return True
    except ValueError:
      pass
  return _on_cloud_tpu_vm()


def initialize_distributed(force: Optional[bool] = None) -> bool:
  """Call ``jax.distributed.initialize()`` when this is a multi-process run.

  Must run before anything touches a JAX device. On a Cloud TPU VM (a pod
  slice or a single host) it always initialises: JAX finds the workers, the
  coordinator and this process' index from the TPU metadata server, and its
  preemption service then turns the SIGTERM of a maintenance event into a
  step that every host agrees to checkpoint at (see
  :class:`rite_optax.train.checkpoints.PreemptionGuard`). Slurm and Open MPI
  launches are detected from their environment, and any other launcher by
  ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``). On a single CPU or GPU machine it does nothing.

  Args:
    force: True or False overrides the detection.

  Returns:
    Whether the distributed system is initialised on return.
  """
  if jax.distributed.is_initialized():
    return True
  wanted = is_multi_process_launch() if force is None else force
  if not wanted:
    return False
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    for env, arg in (("JAX_NUM_PROCESSES", "num_processes"),
                     ("JAX_PROCESS_ID", "process_id")):
      if os.environ.get(env):
        kwargs[arg] = int(os.environ[env])
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d", jax.process_index(),
               jax.process_count())
  return True
