"""LoRA-Pro (ALGORITHMS.md 3 and 3b): a NumPy reference, the closest-gradient
property, the Sylvester solve, and JAX / optax integration."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_problems as lp
import numpy_reference as ref
import rite_optax
from rite_optax import linalg
# `rite_optax.lora_pro` is the optimizer (it shadows the module's name), so
# the module's pure functions are imported by their full name.
from rite_optax.lora_pro import lora_pro_adjusted_grads
from rite_optax.lora_pro import lora_pro_equivalent_gradient

SHAPES = [(12, 9, 3), (8, 10, 2)]
MODES = ["full", "efficient"]
SCALE = 2.0  # s != 1, so that every power of s in 3 and 3b is exercised


def _loss_and_grad_fn(seed, weights=(1.0, 3.0)):
  tgts = lp.targets(seed, SHAPES)
  return (lp.tree_loss([jnp.asarray(t) for t in tgts], list(weights)),
          lp.numpy_grad_fn(tgts, list(weights)))


# ------------------------------------------------------ the NumPy reference
STEPS = 10


@pytest.mark.parametrize("b_zero", [False, True], ids=["b_random", "b_zero"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_numpy_reference(mode, b_zero):
  """After 1 step (t = 0 rules) and after each of 10 (t > 0 rules): one run
  of 10 steps is compared at every step, the first included."""
  with jax.enable_x64(True):
    pairs = lp.random_pairs(1, SHAPES, b_zero=b_zero)
    loss, grad_fn = _loss_and_grad_fn(1)
    expected = ref.lora_pro_reference(pairs, grad_fn, STEPS, lr=0.01,
                                      scale=SCALE, mode=mode)
    tx = rite_optax.lora_pro(0.01, SCALE, mode=mode)
    got, state = lp.run(tx, lp.to_tree(pairs), loss, STEPS)
    assert len(got) == len(expected) == STEPS
    lp.assert_trajectories_match(got, expected)
    # The state keeps its structure, shapes and dtypes (scan and checkpoint
    # friendly), and the count advanced so the t > 0 rules were taken.
    chex.assert_tree_all_finite(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        tx.init(lp.to_tree(pairs)), state)
    assert int(state[0].count) == STEPS
    if b_zero:
      # G_A = s G B = 0: A's direction is exactly 0 on the first step (3.5 at
      # t = 0: H_A = s F B; 3b: X = 0), while B learns.
      for (a, _), (a0, _) in zip(lp.from_tree(got[0]), pairs):
        np.testing.assert_array_equal(a, a0)
    # Each step did something (a zero update would agree with a zero update).
    for t in (0, STEPS - 1):
      (a, b), _ = lp.from_tree(got[t])
      before = pairs[0] if t == 0 else lp.from_tree(got[t - 1])[0]
      assert np.linalg.norm(b - before[1]) > 1e-4
      if t > 0 or not b_zero:  # with B = 0, A stays on the first step
        assert lp.relative_error(a, before[0]) > 1e-4


# ------------------------------------ 3.1: the closest equivalent gradient
@pytest.mark.parametrize("b_zero", [False, True], ids=["b_random", "b_zero"])
@pytest.mark.parametrize("first_step", [True, False])
def test_adjusted_grads_match_reference(first_step, b_zero):
  rng = np.random.default_rng(103)  # not random_pairs' stream
  (a, b), = lp.random_pairs(3, [(9, 7, 3)], b_zero=b_zero)
  g_a, g_b = rng.standard_normal((9, 3)), rng.standard_normal((7, 3))
  with jax.enable_x64(True):
    got = jax.jit(lora_pro_adjusted_grads)(
        a, b, g_a, g_b, SCALE, jnp.asarray(first_step), 1e-8)
  expected = ref.lora_pro_equivalent_gradient_reference(
      a, b, g_a, g_b, SCALE, 0 if first_step else 5)
  for x, y in zip(got, expected):
    np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
  assert min(np.abs(x).max() for x in expected) > 1e-3


def _closest_low_rank_point(a, b, g, s):
  """Dense least squares: the point of {s (x B.T + A y.T)} closest to G."""
  m, r = a.shape
  n = b.shape[0]
  columns = []
  for k in range(m * r):  # the linear map on unit vectors of (vec x, vec y)
    x = np.zeros(m * r)
    x[k] = 1.0
    columns.append((s * x.reshape(m, r) @ b.T).ravel())
  for k in range(n * r):
    y = np.zeros(n * r)
    y[k] = 1.0
    columns.append((s * a @ y.reshape(n, r).T).ravel())
  matrix = np.stack(columns, axis=1)
  solution = np.linalg.lstsq(matrix, g.ravel(), rcond=None)[0]
  return (matrix @ solution).reshape(m, n)


@pytest.mark.parametrize("delta,tol", [(0.0, 1e-10), (1e-8, 1e-6)])
def test_equivalent_gradient_is_frobenius_closest_to_full_gradient(delta, tol):
  """3.1 for t > 0 (X = 0): s (gA B.T + A gB.T) is the projection of the full
  gradient G onto {s (x B.T + A y.T)}, from G_A = s G B and G_B = s G.T A."""
  rng = np.random.default_rng(4)
  m, n, r, s = 7, 6, 2, 1.5
  a, b = rng.standard_normal((m, r)), rng.standard_normal((n, r))
  g = rng.standard_normal((m, n))
  g_a, g_b = s * g @ b, s * g.T @ a
  closest = _closest_low_rank_point(a, b, g, s)
  with jax.enable_x64(True):
    ga, gb = lora_pro_adjusted_grads(a, b, g_a, g_b, s, False, delta)
    equivalent = np.asarray(lora_pro_equivalent_gradient(a, b, ga, gb, s))
    # The first-step rule (no projection) is not the closest point: the
    # comparison can tell.
    ga0, gb0 = lora_pro_adjusted_grads(a, b, g_a, g_b, s, True, delta)
    first = np.asarray(lora_pro_equivalent_gradient(a, b, ga0, gb0, s))
  assert lp.relative_error(equivalent, closest) < tol
  best = np.linalg.norm(closest - g)
  assert best > 0.1 * np.linalg.norm(g)  # G is not in the subspace
  assert np.linalg.norm(first - g) > 1.01 * best


# ------------------------------------------------------- Sylvester solve
def _gram(rng, rows, r, rank=None):
  x = rng.standard_normal((rows, r))
  if rank is not None:
    x = x[:, :rank] @ rng.standard_normal((rank, r))
  return x.T @ x


def _residual(p, q, c, x):
  """Relative residual ||P X + X Q - C|| / ||C||."""
  p, q, c, x = (np.asarray(v, np.float64) for v in (p, q, c, x))
  return np.linalg.norm(p @ x + x @ q - c) / np.linalg.norm(c)


@pytest.mark.parametrize("p_zero", [False, True], ids=["grams", "zero_p"])
def test_sylvester_float64_solves_its_equation(p_zero):
  """Including P = B.T B = 0, the zero-initialised factor at the first step."""
  rng = np.random.default_rng(5)
  r = 4
  p = np.zeros((r, r)) if p_zero else _gram(rng, 9, r)
  q = _gram(rng, 11, r)
  c = rng.standard_normal((r, r))
  with jax.enable_x64(True):
    x = np.asarray(jax.jit(linalg.solve_sylvester_sym)(p, q, c))
  assert x.dtype == np.float64
  assert _residual(p, q, c, x) < 1e-10
  np.testing.assert_allclose(x, ref.sylvester_reference(p, q, c), rtol=1e-9,
                             atol=1e-12)


def test_sylvester_rectangular_and_batched():
  rng = np.random.default_rng(6)
  p = np.stack([_gram(rng, 9, 3) for _ in range(4)])
  q = np.stack([_gram(rng, 9, 5) for _ in range(4)])
  c = rng.standard_normal((4, 3, 5))
  with jax.enable_x64(True):
    x = np.asarray(jax.vmap(linalg.solve_sylvester_sym)(p, q, c))
  for i in range(4):
    assert _residual(p[i], q[i], c[i], x[i]) < 1e-10
    np.testing.assert_allclose(x[i], ref.sylvester_reference(p[i], q[i], c[i]),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("p_zero", [False, True], ids=["grams", "zero_p"])
def test_sylvester_float32_solves_its_equation(p_zero):
  """Float32 to rounding. The solve is orthogonal transforms and one
  elementwise division, so its backward error is a small multiple of
  r * eps32; the relative residual is that times the condition number of
  the operator, max(a_i + b_j) / min(a_i + b_j) (about 5 here; printed
  with -s). Bound: 4 * r * eps32 * cond, some 30 times the residual seen."""
  rng = np.random.default_rng(7)
  r = 8
  p = np.zeros((r, r)) if p_zero else _gram(rng, 40, r)
  q = _gram(rng, 30, r)
  c = rng.standard_normal((r, r))
  x = linalg.solve_sylvester_sym(p.astype(np.float32), q.astype(np.float32),
                                 c.astype(np.float32))
  assert x.dtype == jnp.float32
  eig_p, eig_q = np.linalg.eigvalsh(p), np.linalg.eigvalsh(q)
  denom = eig_p[:, None] + eig_q[None, :]
  cond = denom.max() / denom.min()
  tol = 4 * r * np.finfo(np.float32).eps * cond
  print(f"cond {cond:.1f}, tol {tol:.2e}, residual {_residual(p, q, c, x):.2e}")
  assert tol < 1e-3  # a meaningful bound
  # The inputs rounded to float32 are the problem actually solved.
  assert _residual(p.astype(np.float32), q.astype(np.float32),
                   c.astype(np.float32), x) < tol


@pytest.mark.parametrize("rank_q", [0, 2])
def test_sylvester_singular_operator_gives_minimum_norm_solution(rank_q):
  """P = 0 and Q singular (both factors rank-deficient; Q = 0 too for
  rank_q = 0): some a_i + b_j = 0. The result is finite and equals the
  minimum-norm least-squares solution of the Kronecker system."""
  rng = np.random.default_rng(8)
  r = 4
  p = np.zeros((r, r))
  q = np.zeros((r, r)) if rank_q == 0 else _gram(rng, 9, r, rank=rank_q)
  c = rng.standard_normal((r, r))
  kron = np.kron(np.eye(r), p) + np.kron(q.T, np.eye(r))
  expected = (np.linalg.pinv(kron, rcond=1e-10)
              @ c.reshape(-1, order="F")).reshape((r, r), order="F")
  with jax.enable_x64(True):
    x = np.asarray(linalg.solve_sylvester_sym(p, q, c))
  assert np.all(np.isfinite(x))
  np.testing.assert_allclose(x, expected, rtol=1e-8, atol=1e-10)
  if rank_q == 0:
    np.testing.assert_array_equal(x, 0.0)
  else:
    assert np.abs(x).max() > 1e-3
    # The part of C the operator can reach is solved exactly.
    reached = (kron @ np.linalg.pinv(kron, rcond=1e-10)
               @ c.reshape(-1, order="F"))
    np.testing.assert_allclose(p @ x + x @ q,
                               reached.reshape((r, r), order="F"), atol=1e-10)


def test_pinv_psd_equals_pinv():
  rng = np.random.default_rng(10)
  for x in (_gram(rng, 9, 4), _gram(rng, 9, 4, rank=2), np.zeros((4, 4)),
            1e-8 * np.eye(4)):
    with jax.enable_x64(True):
      got = np.asarray(linalg.pinv_psd(x))
    np.testing.assert_allclose(got, np.linalg.pinv(x, rcond=1e-10,
                                                   hermitian=True),
                               rtol=1e-8, atol=1e-10 * np.abs(got).max())
  assert np.abs(got).max() == pytest.approx(1e8)


def test_sylvester_float32_zero_p_matches_float64_inverse():
  """The zero-P solve in float32 equals the float64 solution to float32
  rounding (X = C Q^-1 exactly when P = 0)."""
  rng = np.random.default_rng(9)
  r = 6
  q = _gram(rng, 20, r)
  c = rng.standard_normal((r, r))
  x32 = np.asarray(linalg.solve_sylvester_sym(
      np.zeros((r, r), np.float32), q.astype(np.float32), c.astype(np.float32)))
  x64 = c @ np.linalg.inv(q.astype(np.float32).astype(np.float64))
  tol = 100 * np.finfo(np.float32).eps * np.linalg.cond(q)
  assert tol < 1e-3  # a meaningful bound
  assert lp.relative_error(x32, x64) < tol


# ------------------------------------------------------------ the state
def test_state_layout():
  tree = lp.to_tree(lp.random_pairs(10, SHAPES), jnp.float32)
  full = rite_optax.lora_pro(0.01, SCALE, mode="full").init(tree)[0]
  for (m, n, _), key in zip(SHAPES, ("pair_0", "pair_1")):
    for moment in (full.mu, full.nu):
      # Full-space moments at the input-side factor, a placeholder at the
      # output side; no zero-size arrays (checkpointers refuse them).
      assert moment[key]["lora_a"].shape == (m, n)
      assert moment[key]["lora_b"].shape == ()
  efficient = rite_optax.lora_pro(0.01, SCALE, mode="efficient").init(tree)[0]
  chex.assert_trees_all_equal_shapes(efficient.mu, tree)
  chex.assert_trees_all_equal_shapes(efficient.nu, tree)


# -------------------------------------------- optax and JAX integration
class IntegrationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree_over_two_steps(self):
    for mode in MODES:
      tree = lp.to_tree(lp.random_pairs(12, SHAPES), jnp.float32)
      tx = rite_optax.lora_pro(0.01, SCALE, mode=mode)
      update = self.variant(tx.update)
      state, ref_state = tx.init(tree), tx.init(tree)
      for step in range(2):  # t = 0 and t > 0 branches
        grads = lp.grads_like(tree, step)
        got, state = update(grads, state, tree)
        expected, ref_state = jax.jit(tx.update)(grads, ref_state, tree)
        chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)
        tree = optax.apply_updates(tree, got)
      assert float(jnp.abs(got["pair_0"]["lora_a"]).max()) > 1e-4

  def test_bfloat16_params(self):
    for mode in MODES:
      tree32 = lp.to_tree(lp.random_pairs(13, SHAPES), jnp.float32)
      tree16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree32)
      grads16 = jax.tree.map(lambda g: g.astype(jnp.bfloat16),
                             lp.grads_like(tree32, 0))
      tx = rite_optax.lora_pro(0.01, SCALE, mode=mode)
      state16 = tx.init(tree16)
      for leaf in jax.tree.leaves(state16[0]):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
          self.assertEqual(leaf.dtype, jnp.float32)
      rounded = jax.tree.map(lambda x: x.astype(jnp.float32), tree16)
      grads32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads16)
      state32 = tx.init(rounded)
      update = jax.jit(tx.update)
      for _ in range(2):
        up16, state16 = update(grads16, state16, tree16)
        up32, state32 = update(grads32, state32, rounded)
        for leaf in jax.tree.leaves(up16):
          self.assertEqual(leaf.dtype, jnp.bfloat16)
        # Same float32 math on the same inputs; only the output is rounded.
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x.astype(jnp.float32), up16), up32,
            rtol=1e-2, atol=1e-6)
        chex.assert_trees_all_close(state16, state32, rtol=1e-6)
        tree16 = optax.apply_updates(tree16, up16)
        rounded = jax.tree.map(lambda x: x.astype(jnp.float32), tree16)
      chex.assert_tree_all_finite(state16)
      self.assertGreater(float(jnp.abs(up16["pair_0"]["lora_a"]).max()), 0)

  def test_stacked_layers_equal_a_loop_over_layers(self):
    layers, m, n = 3, 10, 7
    stacked, looped, grads = lp.stacked_layers(14, layers, m, n, r=3)
    for mode in MODES:
      tx = rite_optax.lora_pro(0.01, SCALE, mode=mode)
      s_state, l_state = tx.init(stacked), tx.init(looped)
      if mode == "full":
        self.assertEqual(s_state[0].mu["lora_a"].shape, (layers, m, n))
        self.assertEqual(s_state[0].mu["lora_b"].shape, (layers,))
      for s_grads, l_grads in grads:
        s_up, s_state = jax.jit(tx.update)(s_grads, s_state, stacked)
        l_up, l_state = jax.jit(tx.update)(l_grads, l_state, looped)
        lp.assert_stacked_equals_looped(s_up, l_up, rtol=2e-4, atol=1e-6)
        if mode == "full":
          lp.assert_stacked_equals_looped(s_state[0].mu, l_state[0].mu,
                                          rtol=2e-4, atol=1e-7)
      self.assertGreater(float(jnp.abs(s_up["lora_a"]).max()), 1e-4)

  def test_peft_layout_is_the_transposed_nnx_layout(self):
    """The full moment is (m, n) = (in, out) whatever the factors' layout."""
    (a, b), = lp.random_pairs(15, [(9, 6, 2)])
    rng = np.random.default_rng(115)
    g_a, g_b = rng.standard_normal((9, 2)), rng.standard_normal((6, 2))
    nnx_tree = {"lora_a": a, "lora_b": b.T}
    peft_tree = {"lora_A": a.T, "lora_B": b}
    nnx_grads = {"lora_a": g_a, "lora_b": g_b.T}
    peft_grads = {"lora_A": g_a.T, "lora_B": g_b}
    to32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
    for mode in MODES:
      tx = rite_optax.lora_pro(0.01, SCALE, mode=mode)
      up_n, st_n = tx.update(to32(nnx_grads), tx.init(to32(nnx_tree)),
                             to32(nnx_tree))
      up_p, st_p = tx.update(to32(peft_grads), tx.init(to32(peft_tree)),
                             to32(peft_tree))
      np.testing.assert_allclose(up_n["lora_a"], up_p["lora_A"].T, rtol=1e-5)
      np.testing.assert_allclose(up_n["lora_b"], up_p["lora_B"].T, rtol=1e-5)
      if mode == "full":
        np.testing.assert_allclose(st_n[0].mu["lora_a"], st_p[0].mu["lora_A"],
                                   rtol=1e-5)

  def test_schedule_and_inject_hyperparams(self):
    tree = lp.to_tree(lp.random_pairs(16, SHAPES), jnp.float32)
    grads = lp.grads_like(tree, 0)
    for mode in MODES:
      injected = optax.inject_hyperparams(rite_optax.lora_pro)(
          learning_rate=0.01, scale=SCALE, mode=mode)
      state = injected.init(tree)
      state.hyperparams["learning_rate"] = jnp.asarray(0.005)
      state.hyperparams["scale"] = jnp.asarray(3.0)
      got, state = jax.jit(injected.update)(grads, state, tree)
      plain = rite_optax.lora_pro(0.005, 3.0, mode=mode)
      expected, _ = plain.update(grads, plain.init(tree), tree)
      chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-8)
      # The scale matters: a different one gives a different step.
      other = rite_optax.lora_pro(0.005, SCALE, mode=mode)
      different, _ = other.update(grads, other.init(tree), tree)
      self.assertGreater(float(jnp.abs(different["pair_0"]["lora_b"]
                                       - got["pair_0"]["lora_b"]).max()), 1e-6)
      schedule = optax.constant_schedule(0.005)
      scheduled = rite_optax.lora_pro(schedule, 3.0, mode=mode)
      got, _ = scheduled.update(grads, scheduled.init(tree), tree)
      chex.assert_trees_all_close(got, expected, rtol=1e-6)

  def test_errors(self):
    tree = lp.to_tree(lp.random_pairs(17, SHAPES), jnp.float32)
    with self.assertRaisesRegex(ValueError, "mode must be one of"):
      rite_optax.lora_pro(0.01, SCALE, mode="fast")
    tx = rite_optax.lora_pro(0.01, SCALE)
    with self.assertRaisesRegex(ValueError, "needs params"):
      tx.update(tree, tx.init(tree))


@pytest.mark.parametrize("mode", MODES)
def test_nnx_optimizer_train_step_reduces_loss(mode):
  """LoRA-Pro as the tx of nnx.Optimizer over nnx.LoRAParam, in nnx.jit, from
  Flax's LoRA init (lora_b = 0, so the t = 0 rules matter)."""
  model = lp.nnx_mlp()
  assert float(jnp.abs(model.l1.lora.lora_b[...]).max()) == 0.0
  # nnx.LoRA applies no alpha / r: its scale is 1.
  losses, base_unchanged = lp.nnx_train(
      model, rite_optax.lora_pro(0.01, 1.0, mode=mode), 60)
  assert losses[-1] < 0.7 * losses[0]
  assert base_unchanged
