"""A workaround for an XLA:CPU deadlock, applied when rite_optax is imported.

XLA:CPU of jaxlib 0.10 deadlocks (every thread idle, the call never returns)
running some programs that mix ``eigh`` with multi-threaded Eigen matrix
products under its concurrency-optimized scheduler: Shampoo's update on a
512 x 512 leaf reproduces it, and so does the Gemma 2B LoRA tree. Turning
that scheduler off fixes it (so does ``--xla_cpu_multi_thread_eigen=false``,
at a larger cost). No library call can set it once the CPU backend exists,
so this sets ``XLA_FLAGS`` at import, before JAX reads it, and only:

* for the jaxlib versions known to have both the bug and the flag (an
  unknown flag would make XLA abort), and
* when the user has not set the flag themselves.

It changes nothing on TPU or GPU. ``tests/test_shampoo.py`` runs the
reproducer in a subprocess.
"""

from __future__ import annotations

import os

FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def apply() -> bool:
  """Add ``--<FLAG>=false`` to ``XLA_FLAGS`` if needed; True if it did."""
  import jaxlib  # the version only: importing it initialises no backend

  version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2])
  flags = os.environ.get("XLA_FLAGS", "")
  if version != (0, 10) or FLAG in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} --{FLAG}=false".strip()
  return True
