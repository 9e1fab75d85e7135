"""Shampoo (ALGORITHMS.md 5): a dense NumPy reference, whitening, plumbing."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rite_optax

# block_size 4: "matrix" is one block; "blocked" (9, 5) is cut into 3 x 2
# blocks, the last column block shorter; "tensor" (2, 3, 4) merges to (6, 4),
# cut into 2 x 1; "stacked" is two matrices with batch_dims=1 and one (8, 3)
# matrix without; "row" (1, 5), "vector" and "scalar" are diagonal.
SHAPES = {
    "matrix": (4, 3),
    "blocked": (9, 5),
    "tensor": (2, 3, 4),
    "stacked": (2, 4, 3),
    "row": (1, 5),
    "vector": (5,),
    "scalar": (),
}
BLOCK_SIZE = 4
LR = 0.1
# One compiled float32 update on SHAPES, shared by the tests that can.
TX = rite_optax.shampoo(LR, block_size=BLOCK_SIZE)
TX_UPDATE = jax.jit(TX.update)


# ------------------------------------------------ the dense NumPy reference
def _reference_split(dims):
  """(rows, cols) of the most nearly square split, the first such."""
  best = None
  for k in range(1, len(dims)):
    rows, cols = int(np.prod(dims[:k])), int(np.prod(dims[k:]))
    if best is None or max(rows, cols) < max(best):
      best = (rows, cols)
  return best


def _reference_ranges(d, block_size):
  count = -(-d // block_size)
  size = -(-d // count)
  return [(start, min(start + size, d)) for start in range(0, d, size)]


def _reference_inverse_fourth_root(s, eps, relative_eps):
  w, q = np.linalg.eigh(s)
  w = np.maximum(w, 0.0)
  ridge = eps * w.max() if relative_eps else eps
  ridge = max(ridge, np.finfo(np.float64).tiny)
  return q @ np.diag((w + ridge) ** -0.25) @ q.T


def shampoo_reference(grads, lr, b1=0.9, b2=0.999, eps=1e-6, block_size=256,
                      precondition_every=1, graft_type="adam", graft_eps=1e-10,
                      start_preconditioning_step=0, relative_eps=True,
                      batch_dims=0):
  """Updates of Shampoo for a list (over steps) of {name: gradient}."""
  state, trajectory = {}, []
  for t, step_grads in enumerate(grads):
    step_updates = {}
    for name, g in step_grads.items():
      g = np.asarray(g, np.float64)
      st = state.setdefault(name, dict(mu=np.zeros_like(g), nu=np.zeros_like(g),
                                       L={}, R={}, PL={}, PR={}))
      if b2 == 1:
        st["nu"] = st["nu"] + g**2
        correction = 1.0
      else:
        st["nu"] = b2 * st["nu"] + (1 - b2) * g**2
        correction = 1 - b2**(t + 1)
      adam = g / (np.sqrt(st["nu"] / correction) + graft_eps)

      n_batch = batch_dims if g.ndim >= batch_dims + 2 else 0
      g_b = g.reshape((-1,) + g.shape[n_batch:])
      adam_b = adam.reshape(g_b.shape)
      directions = []
      for b in range(g_b.shape[0]):
        x = g_b[b]
        dims = [d for d in x.shape if d != 1]
        if len(dims) < 2:
          p = adam_b[b]
        else:
          rows, cols = _reference_split(dims)
          m = x.reshape(rows, cols)
          p = np.zeros_like(m)
          for i, (r0, r1) in enumerate(_reference_ranges(rows, block_size)):
            for j, (c0, c1) in enumerate(_reference_ranges(cols, block_size)):
              key, blk = (b, i, j), m[r0:r1, c0:c1]
              left = st["L"].get(key, np.zeros((r1 - r0, r1 - r0)))
              right = st["R"].get(key, np.zeros((c1 - c0, c1 - c0)))
              if b2 == 1:
                left, right = left + blk @ blk.T, right + blk.T @ blk
              else:
                left = b2 * left + (1 - b2) * blk @ blk.T
                right = b2 * right + (1 - b2) * blk.T @ blk
              st["L"][key], st["R"][key] = left, right
              if t % precondition_every == 0:
                st["PL"][key] = _reference_inverse_fourth_root(
                    left / correction, eps, relative_eps)
                st["PR"][key] = _reference_inverse_fourth_root(
                    right / correction, eps, relative_eps)
              p[r0:r1, c0:c1] = st["PL"][key] @ blk @ st["PR"][key]
          p = p.reshape(x.shape)
        graft = {"adam": adam_b[b], "sgd": x, "none": None}[graft_type]
        if graft is not None:
          norm = np.linalg.norm(p)
          p = p * np.linalg.norm(graft) / norm if norm > 0 else 0 * p
        if t < start_preconditioning_step:
          p = adam_b[b] if graft is None else graft
        directions.append(p)
      direction = np.stack(directions).reshape(g.shape)
      st["mu"] = b1 * st["mu"] + (1 - b1) * direction
      step_updates[name] = -lr * st["mu"] / (1 - b1**(t + 1))
    trajectory.append(step_updates)
  return trajectory


# ----------------------------------------------------------------- helpers
def random_grads(seed, steps, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return [{name: rng.normal(size=shape) * (1.0 + i)
           for i, (name, shape) in enumerate(shapes.items())}
          for _ in range(steps)]


def run(tx, grads, dtype, update=None):
  """Updates of ``tx`` for a fixed gradient sequence (params never move)."""
  params = {k: jnp.zeros(np.shape(v), dtype) for k, v in grads[0].items()}
  update = update or jax.jit(tx.update)
  state = tx.init(params)
  trajectory = []
  for step_grads in grads:
    step_grads = {k: jnp.asarray(v, dtype) for k, v in step_grads.items()}
    updates, state = update(step_grads, state, params)
    trajectory.append(updates)
  return trajectory, state


REFERENCE_CASES = {
    "defaults": dict(),
    "sgd_graft_refresh_every_3_warmup_2": dict(
        graft_type="sgd", precondition_every=3, start_preconditioning_step=2),
    "no_graft_summed_absolute_eps": dict(
        graft_type="none", b1=0.0, b2=1.0, eps=1e-4, relative_eps=False),
    "batch_dims": dict(batch_dims=1, b1=0.5, b2=0.9),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_numpy_reference(case):
  """Every one of 10 steps, the first included, to float64 rounding."""
  kwargs = REFERENCE_CASES[case]
  grads = random_grads(0, 10)
  expected = shampoo_reference(grads, LR, block_size=BLOCK_SIZE, **kwargs)
  with jax.enable_x64(True):
    tx = rite_optax.shampoo(LR, block_size=BLOCK_SIZE, **kwargs)
    got, state = run(tx, grads, jnp.float64)
    assert got[0]["blocked"].dtype == jnp.float64
    stats = state[0].stats
    assert isinstance(stats["vector"], optax.MaskedNode)
    assert isinstance(stats["row"], optax.MaskedNode)
    assert stats["blocked"].left.shape == (6, 3, 3)    # 3 x 2 blocks
    assert stats["blocked"].right.shape == (6, 3, 3)   # cols 5 -> 3 + 2, padded
    assert stats["tensor"].left.shape == (2, 3, 3)     # (6, 4) -> 2 x 1 blocks
    for step, (g, e) in enumerate(zip(got, expected)):
      for name in SHAPES:
        np.testing.assert_allclose(np.asarray(g[name]), e[name], rtol=1e-8,
                                   atol=1e-12, err_msg=f"step {step}: {name}")


def test_batch_dims_equal_separate_leaves():
  """batch_dims=1 on a (2, 4, 3) leaf = Shampoo on each (4, 3) slice alone."""
  grads = random_grads(1, 5, {"stacked": (2, 4, 3)})
  split = [{"s0": g["stacked"][0], "s1": g["stacked"][1]} for g in grads]
  with jax.enable_x64(True):
    together, _ = run(rite_optax.shampoo(LR, batch_dims=1), grads, jnp.float64)
    apart, _ = run(rite_optax.shampoo(LR), split, jnp.float64)
    merged, _ = run(rite_optax.shampoo(LR), grads, jnp.float64)
  for t, a in zip(together, apart):
    np.testing.assert_allclose(t["stacked"][0], a["s0"], rtol=1e-10)
    np.testing.assert_allclose(t["stacked"][1], a["s1"], rtol=1e-10)
  # The test can tell: merging the slices into one (8, 3) matrix differs.
  diff = np.abs(np.asarray(merged[-1]["stacked"] - together[-1]["stacked"]))
  assert diff.max() > 1e-3


# ----------------------------------------------------------------- whitening
def test_first_direction_whitens_the_gradient():
  """G = U diag(s) V^T: the first direction (no momentum, grafting) is U V^T."""
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(7, 4)))
  v, _ = np.linalg.qr(rng.normal(size=(5, 4)))
  s = np.array([10.0, 3.0, 1.0, 0.1])
  grad = u @ np.diag(s) @ v.T
  with jax.enable_x64(True):
    tx = rite_optax.scale_by_shampoo(b1=0.0, graft_type="none", eps=1e-14)
    params = {"w": jnp.zeros((7, 5), jnp.float64)}
    updates, _ = jax.jit(tx.update)({"w": jnp.asarray(grad)}, tx.init(params),
                                    params)
  np.testing.assert_allclose(np.asarray(updates["w"]), u @ v.T, atol=1e-7)
  # The test can tell: the gradient itself is far from U V^T up to a scalar.
  scaled = grad * np.sum(grad * (u @ v.T)) / np.sum(grad * grad)
  assert np.abs(scaled - u @ v.T).max() > 0.1


def test_grafting_sets_the_norm_to_adams():
  rng = np.random.default_rng(1)
  grads = {"w": jnp.asarray(rng.normal(size=(6, 5)) * 100, jnp.float32)}
  tx = rite_optax.scale_by_shampoo(b1=0.0)
  updates, _ = jax.jit(tx.update)(grads, tx.init(grads), grads)
  # Adam's first step is sign(G) (bias corrected), of norm sqrt(30).
  assert float(jnp.linalg.norm(updates["w"])) == pytest.approx(np.sqrt(30.0),
                                                               rel=1e-5)
  # ... and it is not Adam's direction: Shampoo rotates it.
  assert float(jnp.abs(updates["w"] - jnp.sign(grads["w"])).max()) > 0.1


def test_zero_gradients_stay_finite():
  zeros = [{k: np.zeros(s) for k, s in SHAPES.items()}] * 3
  got, state = run(TX, zeros, jnp.float32, TX_UPDATE)
  chex.assert_tree_all_finite((got, state))
  for updates in got:
    for leaf in jax.tree.leaves(updates):
      assert float(jnp.abs(leaf).max(initial=0.0)) == 0.0


# ------------------------------------------------------------------ plumbing
class IntegrationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_float32_close_to_reference(self):
    shapes = {k: SHAPES[k] for k in ("blocked", "tensor", "vector")}
    grads = random_grads(2, 2, shapes)
    tx = rite_optax.shampoo(LR, block_size=BLOCK_SIZE)
    got, state = run(tx, grads, jnp.float32, self.variant(tx.update))
    expected = shampoo_reference(grads, LR, block_size=BLOCK_SIZE)
    for g, e in zip(got, expected):
      for name in shapes:
        self.assertEqual(g[name].dtype, jnp.float32)
        # float32 eigh of the first step's statistics: one block has
        # cond(L) = 8e4 here, so ~1e-3 of the leaf's scale is rounding.
        np.testing.assert_allclose(g[name], e[name], rtol=0,
                                   atol=2e-3 * np.abs(e[name]).max())
    chex.assert_tree_all_finite(state)

  def test_inject_hyperparams(self):
    grads = random_grads(3, 3)
    expected, tx_state = run(TX, grads, jnp.float32, TX_UPDATE)
    # Every numeric argument becomes a traced array: precondition_every too.
    injected = optax.inject_hyperparams(
        rite_optax.shampoo, static_args=("block_size", "batch_dims"))(
            learning_rate=LR, block_size=BLOCK_SIZE)
    injected_update = jax.jit(injected.update)
    got, state = run(injected, grads, jnp.float32, injected_update)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)
    # The learning rate is a live hyperparameter.
    state.hyperparams["learning_rate"] = jnp.asarray(LR / 2, jnp.float32)
    step_grads = {k: jnp.asarray(v, jnp.float32) for k, v in grads[0].items()}
    params = jax.tree.map(jnp.zeros_like, step_grads)
    half, _ = injected_update(step_grads, state, params)
    full, _ = TX_UPDATE(step_grads, tx_state, params)
    chex.assert_trees_all_close(half, jax.tree.map(lambda x: x / 2, full),
                                rtol=1e-5, atol=1e-7)

  def test_inject_hyperparams_without_static_args_explains(self):
    with self.assertRaisesRegex(ValueError, "static_args"):
      optax.inject_hyperparams(rite_optax.shampoo)(LR).init(
          {"w": jnp.zeros((3, 2))})

  def test_schedule(self):
    grads = random_grads(4, 2, {"blocked": SHAPES["blocked"]})
    schedule = optax.linear_schedule(LR, 0.0, 2)
    got, _ = run(rite_optax.shampoo(schedule, block_size=BLOCK_SIZE), grads,
                 jnp.float32)
    expected = shampoo_reference(grads, 1.0, block_size=BLOCK_SIZE)
    for g, e, lr in zip(got, expected, (LR, LR / 2)):
      np.testing.assert_allclose(g["blocked"], lr * e["blocked"], rtol=0,
                                 atol=2e-3 * lr * np.abs(e["blocked"]).max())

  def test_bfloat16_params(self):
    grads = random_grads(5, 3)
    grads16 = [{k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32)
                for k, v in g.items()} for g in grads]
    up16, state16 = run(TX, grads16, jnp.bfloat16)
    up32, _ = run(TX, grads16, jnp.float32, TX_UPDATE)
    for leaf in jax.tree.leaves(up16[-1]):
      self.assertEqual(leaf.dtype, jnp.bfloat16)
    stats = state16[0].stats["blocked"]
    self.assertEqual(stats.left.dtype, jnp.float32)
    self.assertEqual(state16[0].mu["blocked"].dtype, jnp.float32)
    for a, b in zip(up16, up32):
      chex.assert_trees_all_close(
          jax.tree.map(lambda x: x.astype(jnp.float32), a), b, rtol=1e-2,
          atol=1e-4)
    chex.assert_tree_all_finite(state16)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "graft_type"):
      rite_optax.scale_by_shampoo(graft_type="adagrad")
    with self.assertRaisesRegex(ValueError, "block_size"):
      rite_optax.scale_by_shampoo(block_size=0)


def test_update_on_a_512_square_leaf_does_not_deadlock_xla_cpu():
  """The reproducer of rite_optax/_xla_cpu.py, in a fresh process (so that
  the flag is set the way users get it: by importing rite_optax first). A
  deadlock shows as a timeout instead of hanging the suite. Without the flag
  it hung in two of three runs on this machine's jaxlib 0.10.2."""
  code = (
      "import rite_optax, jax, jax.numpy as jnp\n"
      "x = {'w': jax.random.normal(jax.random.PRNGKey(0), (512, 512))}\n"
      "tx = rite_optax.shampoo(1e-3)\n"
      "state = tx.init(x)\n"
      "update = jax.jit(tx.update)\n"
      "for _ in range(3):\n"
      "  u, state = update(jax.tree.map(lambda a: 1e-3 * a, x), state, x)\n"
      "  jax.block_until_ready((u, state))\n"
      "print(float(jnp.abs(u['w']).max()))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-c", code], env=env, timeout=120,
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert float(done.stdout.split()[-1]) > 0


@pytest.mark.parametrize("every", [1, 3])
def test_state_can_be_donated_to_a_jitted_update(every):
  """A train step donates the optimizer state (``donate_argnums``); jax
  refuses a state that holds one buffer twice, which the roots of
  ``precondition_every > 1`` (read by the update) once shared with the
  statistics. The donated update also equals the plain one."""
  params = {"w": jnp.ones((6, 4)), "b": jnp.ones((4,))}
  tx = rite_optax.shampoo(1e-2, precondition_every=every)
  donated = jax.jit(tx.update, donate_argnums=1)
  plain = jax.jit(tx.update)
  state, reference = tx.init(params), tx.init(params)
  for step in range(4):
    grads = jax.tree.map(lambda p: jnp.sin(p * (step + 1.0)), params)
    got, state = donated(grads, state, params)
    expected, reference = plain(grads, reference, params)
    chex.assert_trees_all_close(got, expected, rtol=1e-6)
