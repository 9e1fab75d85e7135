"""rite_optax: transformation-invariant optimizers for LoRA, as optax transformations."""

from rite_optax import linalg
from rite_optax import pairs
from rite_optax.lora_rite import ScaleByLoraRiteState
from rite_optax.lora_rite import lora_rite
from rite_optax.lora_rite import scale_by_lora_rite
from rite_optax.pairs import FactorSpec
from rite_optax.pairs import find_pairs

__version__ = "0.1.0"

__all__ = [
    "FactorSpec",
    "ScaleByLoraRiteState",
    "find_pairs",
    "linalg",
    "lora_rite",
    "pairs",
    "scale_by_lora_rite",
]
