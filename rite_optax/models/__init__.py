"""Flax NNX models with LoRA adapters, and loaders for released checkpoints.

Optimizers never import this package; it imports only from Flax and JAX.
"""

from rite_optax.models import gemma
from rite_optax.models import gemma_loader
from rite_optax.models import gguf_loader
from rite_optax.models import sharding
from rite_optax.models import t5
from rite_optax.models import t5_loader
from rite_optax.models.gemma import Gemma
from rite_optax.models.gemma import GemmaConfig
from rite_optax.models.gemma_loader import hf_gemma_state_dict
from rite_optax.models.gemma_loader import load_gemma_checkpoint
from rite_optax.models.gemma_loader import load_hf_gemma
from rite_optax.models.gemma_loader import params_from_hf_gemma
from rite_optax.models.gemma_loader import save_gemma_checkpoint
from rite_optax.models.gemma_loader import save_hf_gemma
from rite_optax.models.gguf_loader import gemma3_270m_path
from rite_optax.models.gguf_loader import load_gguf
from rite_optax.models.gguf_loader import read_gguf
from rite_optax.models.lora import FROZEN
from rite_optax.models.lora import LoRADense
from rite_optax.models.lora import TRAINABLE
from rite_optax.models.lora import inject_lora
from rite_optax.models.lora import merge_lora
from rite_optax.models.sharding import LOGICAL_RULES
from rite_optax.models.sharding import make_mesh
from rite_optax.models.sharding import model_shardings
from rite_optax.models.sharding import shard_model
from rite_optax.models.t5 import T5
from rite_optax.models.t5 import T5Config
from rite_optax.models.t5_loader import load_hf_safetensors
from rite_optax.models.t5_loader import load_t5x_checkpoint
from rite_optax.models.t5_loader import save_hf_safetensors
from rite_optax.models.t5_loader import save_t5x_checkpoint
