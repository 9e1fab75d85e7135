"""Fused passes over factor-sized arrays: Pallas kernels that read each once.

XLA runs every product of a factor-sized array with an ``r x r`` matrix as
its own kernel, whose result is written to memory and read back by the next
one (on CPU, GPU and TPU alike: XLA does not fuse a matmul into another).
An optimizer step that chains ``U1 = X m1`` into ``U1.T U1`` therefore moves
``U1`` twice more than it needs to. :func:`factor_pass` is the kernel XLA
does not write: one pass over row blocks of a few factor-sized arrays, in
which every intermediate ``(rows, r)`` product stays in registers / VMEM /
shared memory, writing only the factor-sized results asked for and the
partial sums of the Gram matrices (``(blocks, r, s)``, summed afterwards).

Why a kernel of our own: no library fuses chains of skinny products with
Gram reductions (optax and XLA don't; cuBLAS / the MXU do one product).

Where it runs: compiled by Pallas on TPU (Mosaic) and GPU (Triton); on a CPU,
Pallas has no compiler, so the kernel runs in its interpreter (correct, and
what the tests check, but slower than XLA's unfused products there).
Unmeasured on TPU / GPU in this project. On a GPU the ranks must be at
least :data:`MIN_GPU_RANK` (Triton's matrix product); a smaller one is
refused with that reason. A ``pallas_call`` is opaque to
XLA's SPMD partitioner: use it on unsharded (or replicated) factors, and
the unfused products where factors are sharded along their rows.

Cost: per pass, each input read once and each output written once, plus
``blocks * r * s`` numbers per Gram; the products inside are those of the
unfused formulation.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Rows per block: large enough that the Gram partial sums (blocks x r x r)
# are small next to the factors, small enough for a TPU core's VMEM with a
# handful of (block, r <= 256) float32 operands double-buffered.
MAX_BLOCK_ROWS = 512

# body(factor blocks (block, r_i), r x s matrices) -> (factor-sized output
# blocks (block, s_j), Gram partial sums (r_a, r_b) of this block).
PassBody = Callable[[list[jax.Array], list[jax.Array]],
                    tuple[list[jax.Array], list[jax.Array]]]


def block_rows(rows: int, rank_first: bool) -> int:
  """The rows of one block: the largest power of two that divides ``rows``,
  is at most :data:`MAX_BLOCK_ROWS` and is a multiple of the hardware tile
  along that axis (128 lanes when rows are the last axis, 8 sublanes
  otherwise; Triton wants powers of two), or all of ``rows`` where none is
  (Pallas accepts a block of the whole axis)."""
  tile = 128 if rank_first else 8
  block = 1 << (max(MAX_BLOCK_ROWS, 1).bit_length() - 1)
  while block >= tile:
    if rows % block == 0:
      return block
    block //= 2
  return rows


# Triton's matrix product (tl.dot) needs every dimension >= 16.
MIN_GPU_RANK = 16


def interpret_default() -> bool:
  """Pallas compiles for TPU and GPU; elsewhere it interprets."""
  return jax.default_backend() not in ("tpu", "gpu", "cuda", "rocm")


def factor_pass(body: PassBody, factors: Sequence[jax.Array],
                matrices: Sequence[jax.Array], *, rank_first: bool,
                out_columns: Sequence[int],
                gram_shapes: Sequence[tuple[int, int]],
                interpret: Optional[bool] = None
                ) -> tuple[list[jax.Array], list[jax.Array]]:
  """One pass of ``body`` over row blocks of alike factor-sized arrays.

  Args:
    body: what a block computes, in the canonical ``(block, r)`` orientation
      whatever the memory layout: ``body(blocks, matrices) -> (outputs,
      grams)``.
    factors: ``(nb, rows, r_i)`` arrays, or ``(nb, r_i, rows)`` when
      ``rank_first``, all with the same ``nb`` and ``rows``.
    matrices: ``(nb, r, s)`` arrays, whole in every block of their batch
      element.
    rank_first: the factors' layout; outputs come back in it.
    out_columns: the columns of each factor-sized output.
    gram_shapes: the shape of each Gram matrix ``body`` returns.
    interpret: run the kernel in Pallas's interpreter (default: off TPU /
      GPU, :func:`interpret_default`).

  Returns:
    The factor-sized outputs (the dtype of ``factors[0]``) and the Gram
    matrices summed over the rows, ``(nb, r_a, r_b)``.
  """
  first = factors[0]
  nb, rows = first.shape[0], first.shape[-1 if rank_first else -2]
  interpret = interpret_default() if interpret is None else interpret
  ranks = [f.shape[-2 if rank_first else -1] for f in factors]
  if not interpret and jax.default_backend() != "tpu" and (
      min(ranks) < MIN_GPU_RANK):
    raise ValueError(
        f"fused=True on a GPU needs LoRA rank >= {MIN_GPU_RANK} (Triton's "
        f"matrix product), got factors of rank {min(ranks)}: use "
        "fused=False for this tree")
  block = block_rows(rows, rank_first)
  grid = (nb, rows // block)
  dtype = first.dtype

  def factor_spec(columns: int) -> pl.BlockSpec:
    if rank_first:
      return pl.BlockSpec((1, columns, block), lambda b, i: (b, 0, i))
    return pl.BlockSpec((1, block, columns), lambda b, i: (b, i, 0))

  def factor_shape(columns: int) -> tuple[int, ...]:
    return (nb, columns, rows) if rank_first else (nb, rows, columns)

  def kernel(*refs):
    n_f, n_m, n_o = len(factors), len(matrices), len(out_columns)
    blocks = [ref[0].T if rank_first else ref[0] for ref in refs[:n_f]]
    outs, grams = body(blocks, [ref[0] for ref in refs[n_f:n_f + n_m]])
    for ref, value in zip(refs[n_f + n_m:n_f + n_m + n_o], outs):
      ref[0] = (value.T if rank_first else value).astype(ref.dtype)
    for ref, value in zip(refs[n_f + n_m + n_o:], grams):
      ref[0, 0] = value.astype(ref.dtype)

  in_specs = ([factor_spec(f.shape[-2 if rank_first else -1])
               for f in factors]
              + [pl.BlockSpec((1,) + m.shape[1:], lambda b, i: (b, 0, 0))
                 for m in matrices])
  out_specs = ([factor_spec(c) for c in out_columns]
               + [pl.BlockSpec((1, 1) + s, lambda b, i: (b, i, 0, 0))
                  for s in gram_shapes])
  out_shape = ([jax.ShapeDtypeStruct(factor_shape(c), dtype)
                for c in out_columns]
               + [jax.ShapeDtypeStruct((nb, grid[1]) + s, dtype)
                  for s in gram_shapes])
  results = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
  )(*factors, *(m.astype(dtype) for m in matrices))
  outs, partial = results[:len(out_columns)], results[len(out_columns):]
  return list(outs), [jnp.sum(p, axis=1) for p in partial]
