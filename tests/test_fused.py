"""LoRA-RITE's fused Pallas passes (``fused=True``, rite_optax.fused): on a
CPU they run in Pallas's interpreter; they must compute what the unfused
products compute, in every layout, across several row blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_problems as lp
import numpy_reference as ref
import rite_optax
from rite_optax import fused

# lora_a (m, r) rows last-but-one, lora_b (r, n) rank first: both layouts.
SHAPES = [(12, 9, 3), (8, 10, 2)]
REFERENCE_CASES = {
    "defaults": dict(lr=0.05),
    "capping_and_decay": dict(lr=0.05, update_capping=0.05, weight_decay=0.1),
    "skipping_active": dict(lr=0.05, update_skipping=0.02),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_fused_matches_numpy_reference(case):
  with jax.enable_x64(True):
    pairs, got, expected = lp.run_with_reference(
        lambda lr, **hp: rite_optax.lora_rite(lr, fused=True, **hp),
        ref.lora_rite_reference, REFERENCE_CASES[case], 5, SHAPES,
        [1.0, 40.0])
    lp.assert_trajectories_match(got, expected)
    assert lp.relative_error(lp.from_tree(got[-1])[0][0], pairs[0][0]) > 1e-4


def test_fused_is_invariant_to_ill_conditioned_factor_transform():
  with jax.enable_x64(True):
    errors, moved = lp.factorization_drift(
        rite_optax.lora_rite(0.05, fused=True), steps=20)
    assert max(errors) < 1e-8
    assert moved > 0.1


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_equals_unfused_over_row_blocks(monkeypatch, weight_decay):
  """Stacked layers (batch 3), rows split into 3 blocks in either layout, a non-finite gradient on one step: the fused
  update is the unfused one to rounding."""
  monkeypatch.setattr(fused, "MAX_BLOCK_ROWS", 128)
  rng = np.random.default_rng(0)
  layers, m, n, r = 3, 192, 384, 4
  assert fused.block_rows(m, False) == 64
  assert fused.block_rows(n, True) == 128
  with jax.enable_x64(True):
    params = {"lora_a": jnp.asarray(rng.standard_normal((layers, m, r))),
              "lora_b": jnp.asarray(rng.standard_normal((layers, r, n)))}
    grads = [jax.tree.map(lambda p: jnp.asarray(
        rng.standard_normal(p.shape)), params) for _ in range(6)]
    grads[2]["lora_b"] = grads[2]["lora_b"].at[1, 0, 5].set(jnp.nan)
    results = []
    for use_fused in (False, True):
      tx = rite_optax.lora_rite(0.01, weight_decay=weight_decay,
                                fused=use_fused)
      state, p, updates = tx.init(params), params, []
      step = jax.jit(tx.update)
      for g in grads:
        u, state = step(g, state, p)
        p = jax.tree.map(lambda x, d: x + d, p, u)
        updates.append(u)
      results.append((updates, state))
    (want, want_state), (got, got_state) = results
    for u_want, u_got in zip(want, got):
      for leaf_want, leaf_got in zip(jax.tree.leaves(u_want),
                                     jax.tree.leaves(u_got)):
        assert np.all(np.isfinite(leaf_got))
        np.testing.assert_allclose(leaf_got, leaf_want, rtol=1e-9,
                                   atol=1e-12)
    # The state's r x r coordinates are eigenvectors, whose signs eigh picks
    # from the rounding: compare what does not depend on them.
    for name in ("mu", "basis"):
      for s_want, s_got in zip(jax.tree.leaves(getattr(want_state[0], name)),
                               jax.tree.leaves(getattr(got_state[0], name))):
        np.testing.assert_allclose(np.abs(s_got), np.abs(s_want), rtol=1e-8,
                                   atol=1e-10 * np.abs(s_want).max())
    # The NaN step skipped that layer's B, as unfused does.
    assert int(got_state[0].total_skipped) == 1


@pytest.mark.parametrize("rows, rank_first, block",
                         [(640, False, 128), (2048, False, 512),
                          (2048, True, 512), (640, True, 128),
                          (16384, True, 512), (100, True, 100),
                          (24, False, 8), (12, False, 12)])
def test_block_rows_divide_the_rows_in_hardware_tiles(rows, rank_first,
                                                      block):
  assert fused.block_rows(rows, rank_first) == block


# ------------------------------------------------ LoRA-Pro, efficient mode
@pytest.mark.parametrize("b_zero", [False, True], ids=["b_random", "b_zero"])
def test_fused_lora_pro_matches_numpy_reference(b_zero):
  with jax.enable_x64(True):
    pairs = lp.random_pairs(1, SHAPES, b_zero=b_zero)
    tgts = lp.targets(1, SHAPES)
    expected = ref.lora_pro_reference(pairs, lp.numpy_grad_fn(tgts, [1., 3.]),
                                      5, lr=0.01, scale=2.0, mode="efficient")
    tx = rite_optax.lora_pro(0.01, 2.0, mode="efficient", fused=True)
    got, _ = lp.run(tx, lp.to_tree(pairs),
                    lp.tree_loss([jnp.asarray(t) for t in tgts], [1., 3.]), 5)
    lp.assert_trajectories_match(got, expected)
    # B moved (from zero too): a zero update would not match.
    assert np.linalg.norm(lp.from_tree(got[-1])[0][1] - pairs[0][1]) > 1e-4


def test_fused_lora_pro_equals_unfused_over_row_blocks(monkeypatch):
  monkeypatch.setattr(fused, "MAX_BLOCK_ROWS", 128)
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    params = {"lora_a": jnp.asarray(rng.standard_normal((2, 192, 4))),
              "lora_b": jnp.asarray(rng.standard_normal((2, 4, 384)))}
    grads = [jax.tree.map(lambda p: jnp.asarray(
        rng.standard_normal(p.shape)), params) for _ in range(4)]
    runs = []
    for use_fused in (False, True):
      tx = rite_optax.lora_pro(0.01, 2.0, mode="efficient", fused=use_fused)
      state, p, out = tx.init(params), params, []
      step = jax.jit(tx.update)
      for g in grads:
        u, state = step(g, state, p)
        p = jax.tree.map(lambda x, d: x + d, p, u)
        out.append((u, state))
      runs.append(out)
    for want, got in zip(*runs):
      for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


def test_fused_lora_pro_full_mode_is_refused():
  with pytest.raises(ValueError, match="fused=True is for mode='efficient'"):
    rite_optax.lora_pro(0.01, 2.0, mode="full", fused=True)


def test_gpu_below_rank_16_is_refused_with_the_reason(monkeypatch):
  monkeypatch.setattr(fused.jax, "default_backend", lambda: "gpu")
  x = jnp.ones((1, 64, 4))
  with pytest.raises(ValueError, match="rank >= 16.*got factors of rank 4"):
    fused.factor_pass(lambda b, m: ([], []), [x], [], rank_first=False,
                      out_columns=(), gram_shapes=())
