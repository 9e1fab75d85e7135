"""LoRA+: Adam(W) with a larger learning rate on the output-side factor.

Hayou, Ghosh, Yu. "LoRA+: Efficient Low Rank Adaptation of Large Models",
ICML 2024.

The output-side factor ``B`` (zero at LoRA init) gets the learning rate
``lr * lr_ratio``, the input-side factor ``A`` the learning rate ``lr``;
otherwise this is ``optax.adamw``. ALGORITHMS.md section 4.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from rite_optax import pairs as pairs_lib


def factor_sides(tree: Any,
                 pair_spec: Optional[pairs_lib.SpecFn] = None) -> Any:
  """``tree`` with each LoRA factor replaced by its side, ``"in"`` or ``"out"``.

  A label tree for ``optax.partition``; raises, naming the path, for a leaf
  that is not a paired LoRA factor (see :func:`rite_optax.pairs.find_pairs`).
  """
  found = pairs_lib.find_pairs(tree, pair_spec)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree),
                                      [layout.side for layout in found.layouts])


def _in_compute_precision(
    inner: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
  """``inner`` run in at least float32, updates cast back to the params' dtypes.

  optax's Adam keeps its second moment in the params' dtype; in bfloat16,
  ``b2 = 0.999`` rounds the decay away. Like the library's other optimizers,
  the state is kept in ``promote_types(param dtype, float32)``.
  """

  def upcast(tree, like):
    return jax.tree.map(
        lambda x, p: x.astype(jnp.promote_types(p.dtype, jnp.float32)), tree,
        like)

  def init_fn(params):
    return inner.init(upcast(params, params))

  def update_fn(updates, state, params=None, **extra_args):
    # Gradients are used in the params' compute dtype, as in every optimizer
    # of the library, and the updates come back in the params' dtype.
    like = updates if params is None else params
    new_updates, state = optax.with_extra_args_support(inner).update(
        upcast(updates, like), state,
        None if params is None else upcast(params, params), **extra_args)
    return jax.tree.map(lambda u, p: u.astype(p.dtype), new_updates,
                        like), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lora_plus(
    learning_rate: optax.ScalarOrSchedule,
    lr_ratio: float = 16.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    pair_spec: Optional[pairs_lib.SpecFn] = None,
) -> optax.GradientTransformationExtraArgs:
  """LoRA+ (Hayou et al., 2024), ALGORITHMS.md 4.

  ``optax.partition`` of the tree by factor side: ``optax.adamw(lr)`` on the
  input-side factors (canonical ``A``: Flax ``lora_a``, PEFT ``lora_A``) and
  ``optax.adamw(lr * lr_ratio)`` on the output-side factors (canonical
  ``B``: Flax ``lora_b``, PEFT ``lora_B``, zero at init). The update is
  ``-lr_X (m_hat / (sqrt(v_hat) + eps) + weight_decay X)``, Adam with bias
  correction and decoupled weight decay. ``learning_rate`` may be a schedule;
  ``B``'s is the same schedule times ``lr_ratio``.

  The tree holds LoRA factors only, in any layout :mod:`rite_optax.pairs`
  recognises (or describes with ``pair_spec``); sides are read from the
  pairing, not from names. Adam's state is kept in at least float32 and the
  updates come back in each parameter's dtype.

  Args:
    learning_rate: the input-side factors' learning rate, scalar or schedule.
    lr_ratio: the output-side factors' learning rate over the input side's.
    b1: decay of Adam's first moment.
    b2: decay of Adam's second moment.
    eps: added to the square root of the second moment.
    weight_decay: decoupled weight decay, scaled by each side's learning rate.
    pair_spec: optional ``(path, leaf) -> FactorSpec | None`` for layouts the
      automatic rules do not know. Pass ``static_args="pair_spec"`` to
      ``optax.inject_hyperparams``.

  Cost: Adam's, ``O(1)`` flops per parameter. State: Adam's, two
  parameter-sized arrays.
  """
  # ALGORITHMS.md 4: the output side's rate is lr * lr_ratio, schedules too.
  if callable(learning_rate):
    out_rate = lambda count: learning_rate(count) * lr_ratio
  else:
    out_rate = learning_rate * lr_ratio

  def adamw(rate):
    return optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  return _in_compute_precision(optax.partition(
      {"in": adamw(learning_rate), "out": adamw(out_rate)},
      lambda tree: factor_sides(tree, pair_spec)))
