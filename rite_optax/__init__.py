"""rite_optax: transformation-invariant optimizers for LoRA, as optax transformations."""

from rite_optax import _xla_cpu

_xla_cpu.apply()  # before anything can start JAX's CPU backend

# pylint: disable=g-import-not-at-top,wrong-import-position
from rite_optax import linalg
from rite_optax import pairs
from rite_optax.invariance import invariance_gap
from rite_optax.lora_plus import lora_plus
from rite_optax.lora_pro import ScaleByLoraProState
from rite_optax.lora_pro import lora_pro
from rite_optax.lora_pro import scale_by_lora_pro
from rite_optax.lora_rite import ScaleByLoraRiteState
from rite_optax.lora_rite import lora_rite
from rite_optax.lora_rite import scale_by_lora_rite
from rite_optax.lora_rite import skip_metrics
from rite_optax.lora_rite import warn_if_every_factor_skipped
from rite_optax.pairs import FactorSpec
from rite_optax.pairs import find_pairs
from rite_optax.registry import OPTIMIZERS
from rite_optax.registry import get_optimizer
from rite_optax.riemannian import scale_by_riemannian_adam
from rite_optax.riemannian import scale_by_riemannian_preconditioner
from rite_optax.riemannian import scaled_adamw
from rite_optax.riemannian import scaled_gd
from rite_optax.shampoo import ScaleByShampooState
from rite_optax.shampoo import scale_by_shampoo
from rite_optax.shampoo import shampoo

__version__ = "0.1.0"

__all__ = [
    "FactorSpec",
    "OPTIMIZERS",
    "ScaleByLoraProState",
    "ScaleByLoraRiteState",
    "ScaleByShampooState",
    "find_pairs",
    "get_optimizer",
    "invariance_gap",
    "linalg",
    "lora_plus",
    "lora_pro",
    "lora_rite",
    "pairs",
    "scale_by_lora_pro",
    "scale_by_lora_rite",
    "scale_by_riemannian_adam",
    "scale_by_riemannian_preconditioner",
    "scale_by_shampoo",
    "scaled_adamw",
    "scaled_gd",
    "shampoo",
    "skip_metrics",
    "warn_if_every_factor_skipped",
]
