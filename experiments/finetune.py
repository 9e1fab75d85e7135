"""LoRA fine-tuning of Gemma or mT5 with any optimizer of the registry.

The main job: ``python experiments/finetune.py`` fine-tunes the ``tiny``
Gemma with LoRA-RITE on ARC-Challenge from the package's own task files
on a CPU, with nothing downloaded, in a few minutes. The same script runs the
paper's settings on TPU through presets, config files and command-line
overrides::

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
