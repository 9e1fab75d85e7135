"""Every optimizer of the library, and the paper's baselines, by name.

``get_optimizer(name, learning_rate, **hparams)`` is the one entry point the
experiment scripts use, so that a comparison is a list of names.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

from rite_optax.lora_plus import lora_plus
from rite_optax.lora_pro import lora_pro
from rite_optax.lora_rite import lora_rite
from rite_optax.riemannian import scaled_adamw
from rite_optax.riemannian import scaled_gd
from rite_optax.shampoo import shampoo

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "lamb": optax.lamb,
    "shampoo": shampoo,
    "lora_plus": lora_plus,
    "scaled_gd": scaled_gd,
    "scaled_adamw": scaled_adamw,
    "lora_pro": lora_pro,
    "lora_rite": lora_rite,
}


def hyperparameters(name: str) -> dict[str, Any]:
  """The hyperparameters of optimizer ``name`` and their defaults
  (``inspect.Parameter.empty`` for required ones), learning rate excluded."""
  factory = _factory(name)
  return {p.name: p.default
          for p in inspect.signature(factory).parameters.values()
          if p.name != "learning_rate"
          and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _factory(name: str) -> Callable[..., optax.GradientTransformation]:
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid names: "
                     f"{', '.join(OPTIMIZERS)}")
  return OPTIMIZERS[name]


def get_optimizer(name: str, learning_rate: optax.ScalarOrSchedule,
                  **hparams: Any) -> optax.GradientTransformation:
  """``OPTIMIZERS[name](learning_rate, **hparams)``, with clear errors.

  Raises:
    ValueError: for an unknown name or hyperparameter, listing the valid ones,
      and for a missing required hyperparameter (``lora_pro``'s ``scale``).
  """
  valid = hyperparameters(name)
  unknown = sorted(set(hparams) - set(valid))
  if unknown:
    raise ValueError(f"{name} has no hyperparameter {', '.join(unknown)}; "
                     f"valid: {', '.join(valid)}")
  missing = [k for k, v in valid.items()
             if v is inspect.Parameter.empty and k not in hparams]
  if missing:
    raise ValueError(f"{name} needs {', '.join(missing)}")
  return _factory(name)(learning_rate, **hparams)
