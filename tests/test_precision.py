"""Matmul precision (issue 18): what the CPU cannot show.

On a CPU every float32 product is a float32 product, so the invariance tests
would pass whatever precision the optimizers ask for. Two checks that do not
depend on the CPU: the traced update carries the configured precision on
every product with a factor-sized operand (and HIGHEST on the ``r x r``
ones), and the float32 invariance still holds when each product's operands
are rounded as a TPU or GPU rounds them at that precision
(:func:`rite_optax.linalg.emulate_precision`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from threadpoolctl import threadpool_info

import lora_problems as lp
import rite_optax
from rite_optax import linalg

P = jax.lax.Precision
M, N, R = 40, 24, 4  # rows distinct from each other and from the rank
OPTIMIZERS = {
    "lora_rite": lambda **kw: rite_optax.lora_rite(0.1, **kw),
    "lora_rite (escape)": lambda **kw: rite_optax.lora_rite(0.1, escape=True,
                                                            **kw),
    "scaled_gd": lambda **kw: rite_optax.scaled_gd(0.1, **kw),
    "scaled_adamw": lambda **kw: rite_optax.scaled_adamw(0.1, **kw),
    "scaled_adamw (sequential)": lambda **kw: rite_optax.scaled_adamw(
        0.1, sequential=True, **kw),
    "lora_pro": lambda **kw: rite_optax.lora_pro(0.1, scale=2.0, **kw),
    "lora_pro (efficient)": lambda **kw: rite_optax.lora_pro(
        0.1, scale=2.0, mode="efficient", **kw),
    "shampoo": lambda **kw: rite_optax.shampoo(0.1, **kw),
}
# Optimizers whose products of factor-sized arrays fall in both classes
# (Gram / cross products, and products with a small matrix).
BOTH_CLASSES = ("lora_rite", "lora_rite (escape)", "lora_pro",
                "lora_pro (efficient)", "shampoo", "scaled_gd",
                "scaled_adamw", "scaled_adamw (sequential)")


def _tree():
  rng = np.random.default_rng(0)
  return {"proj": {"lora_a": jnp.asarray(rng.standard_normal((M, R)),
                                         jnp.float32),
                   "lora_b": jnp.asarray(rng.standard_normal((R, N)),
                                         jnp.float32)}}


def _factor_sized(aval) -> bool:
  """A factor's (or its gradient's, moment's) shape: the rank and a row count."""
  return R in aval.shape and (M in aval.shape or N in aval.shape)


def _dots(tx):
  """``(precision, lhs aval, rhs aval, out aval)`` of every dot_general in
  the traced update (nested jaxprs included)."""
  tree = _tree()
  grads = jax.tree.map(lambda x: 0.01 * jnp.cos(x), tree)
  state = tx.init(tree)
  closed = jax.make_jaxpr(tx.update)(grads, state, tree)
  found = []
  for jaxpr in linalg.iter_jaxprs(closed):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append((eqn.params["precision"], eqn.invars[0].aval,
                      eqn.invars[1].aval, eqn.outvars[0].aval))
  assert found, "no products traced"
  return found


def _precision(params_precision):
  assert params_precision is not None, "a product with no precision"
  lhs, rhs = params_precision
  assert lhs == rhs
  return lhs


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("precision", [None, "high", P.DEFAULT])
def test_every_factor_sized_product_carries_the_configured_precision(
    name, precision):
  kwargs = {} if precision is None else dict(precision=precision)
  dots = _dots(OPTIMIZERS[name](**kwargs))
  expected = (linalg.DEFAULT_PRECISION.product if precision is None
              else linalg.matmul_precision(precision).product)
  factor_sized = [d for d in dots if _factor_sized(d[1]) or _factor_sized(d[2])]
  assert factor_sized, "no product with a factor-sized operand"
  for prec, lhs, rhs, _ in dots:
    got = _precision(prec)
    if _factor_sized(lhs) or _factor_sized(rhs):
      assert got == expected, (name, lhs.shape, rhs.shape, got)
    else:  # r x r (or Shampoo's block x block) work: always HIGHEST
      assert got == P.HIGHEST, (name, lhs.shape, rhs.shape, got)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gram_and_product_precisions_are_separate(name):
  """``precision=(gram, product)``: both occur where both kinds of product
  do, and passing another value changes what is traced."""
  seen = {_precision(prec) for prec, lhs, rhs, _ in _dots(
      OPTIMIZERS[name](precision=("highest", "default")))
          if _factor_sized(lhs) or _factor_sized(rhs)}
  assert seen == ({P.HIGHEST, P.DEFAULT} if name in BOTH_CLASSES
                  else {P.HIGHEST})


def test_lora_rite_grams_and_products_are_told_apart():
  """In LoRA-RITE the Gram / cross products are those of two factor-sized
  operands reducing to ``r x r``: they get ``gram``, the others ``product``."""
  for prec, lhs, rhs, out in _dots(rite_optax.lora_rite(
      0.1, precision=(P.HIGH, P.DEFAULT))):
    if not (_factor_sized(lhs) or _factor_sized(rhs)):
      continue
    is_gram = _factor_sized(lhs) and _factor_sized(rhs) and not _factor_sized(
        out)
    assert _precision(prec) == (P.HIGH if is_gram else P.DEFAULT)


@pytest.mark.parametrize("bad", ["fast", 3, ("highest",), ("a", "b")])
def test_a_bad_precision_is_refused_when_built(bad):
  for make in OPTIMIZERS.values():
    with pytest.raises(ValueError, match="precision"):
      make(precision=bad)


def test_registry_and_inject_hyperparams_take_precision():
  tree = _tree()
  grads = jax.tree.map(lambda x: 0.01 * jnp.cos(x), tree)
  for name in ("lora_rite", "scaled_gd", "scaled_adamw", "lora_pro",
               "shampoo"):
    assert "precision" in rite_optax.registry.hyperparameters(name)
  tx = rite_optax.get_optimizer("lora_rite", 0.1, precision="high")
  assert {_precision(p) for p, lhs, rhs, _ in _dots(tx)
          if _factor_sized(lhs) or _factor_sized(rhs)} == {P.HIGH}
  injected = optax.inject_hyperparams(rite_optax.lora_rite)(
      learning_rate=0.1, precision="high")
  got, _ = jax.jit(injected.update)(grads, injected.init(tree), tree)
  plain = rite_optax.lora_rite(0.1)
  expected, _ = plain.update(grads, plain.init(tree), tree)
  np.testing.assert_allclose(got["proj"]["lora_a"], expected["proj"]["lora_a"],
                             rtol=1e-5, atol=1e-8)  # the CPU: float32 anyway


# ---------------------------------------------- emulated reduced precision


def test_emulated_products_round_as_the_hardware_does():
  """Relative error of one emulated product, against float64: bfloat16
  operands (8 bits), TF32 (11 bits), three bfloat16 passes (about 16)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 256)).astype(np.float32)
  y = rng.standard_normal((256, 16)).astype(np.float32)
  exact = x.astype(np.float64) @ y

  def error(platform, precision):
    dot = linalg.emulate_precision(
        lambda a, b: jnp.matmul(a, b, precision=precision), platform)
    got = np.asarray(jax.jit(dot)(x, y), np.float64)
    return np.linalg.norm(got - exact) / np.linalg.norm(exact)

  assert 2**-10 < error("tpu", P.DEFAULT) < 2**-7
  assert 2**-13 < error("gpu", P.DEFAULT) < 2**-10
  assert error("gpu", P.HIGH) == error("gpu", P.DEFAULT)
  assert 2**-24 < error("tpu", P.HIGH) < 2**-15
  for platform in ("tpu", "gpu", "cpu"):
    assert error(platform, P.HIGHEST) < 2**-21
  assert error("cpu", P.DEFAULT) < 2**-21
  # A product with no precision runs at DEFAULT on the hardware.
  unannotated = linalg.emulate_precision(jnp.matmul, "tpu")
  assert np.array_equal(np.asarray(unannotated(x, y)), np.asarray(
      linalg.emulate_precision(lambda a, b: jnp.matmul(
          a, b, precision=P.DEFAULT), "tpu")(x, y)))


def _emulated(tx, platform, override=None):
  return optax.GradientTransformation(
      tx.init, linalg.emulate_precision(tx.update, platform, override))


STEPS, COND = 50, 1e4
# test_lora_rite.test_products_invariant_in_float32's tolerance.
TOL = float(jnp.finfo(jnp.float32).eps) * COND * np.sqrt(STEPS)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_float32_invariance_at_the_defaults_on_emulated_hardware(platform):
  """The float32 invariance test's bound holds with every product rounded
  as ``platform`` rounds it at the precision the optimizer asks for."""
  errors, moved = lp.factorization_drift(
      _emulated(rite_optax.lora_rite(0.05), platform), steps=STEPS, cond=COND)
  assert max(errors) < TOL
  assert moved > 0.1


@pytest.mark.parametrize("platform,precision", [
    ("tpu", None),  # no precision anywhere: the code before issue 18
    ("gpu", None),
    ("gpu", "high"),  # HIGH is TF32 on a GPU
])
def test_reduced_precision_breaks_float32_invariance(platform, precision):
  """The emulation can tell: the same run with reduced-precision products
  drifts by more than 10 times the bound (measured: 80 to 105 times)."""
  tx = (rite_optax.lora_rite(0.05) if precision is None
        else rite_optax.lora_rite(0.05, precision=precision))
  override = P.DEFAULT if precision is None else None
  errors, _ = lp.factorization_drift(_emulated(tx, platform, override),
                                     steps=STEPS, cond=COND)
  assert max(errors) > 10 * TOL


# --------------------------------------------------------- LAPACK threads


def _blas_threads():
  return {i["filepath"]: i["num_threads"] for i in threadpool_info()
          if i["user_api"] == "blas"}


def test_limit_lapack_threads_is_scoped():
  before = _blas_threads()
  with linalg.limit_lapack_threads(1):
    inside = _blas_threads()
    jnp.linalg.eigh(jnp.eye(8)[None] * 2.0)[0].block_until_ready()
  assert inside and set(inside.values()) == {1}
  # SciPy's OpenBLAS, the LAPACK of JAX's CPU kernels, is among them.
  assert any("scipy" in path for path in inside)
  after = _blas_threads()
  assert {k: v for k, v in after.items() if k in before} == before
