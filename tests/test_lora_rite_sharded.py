"""LoRA-RITE (and the Riemannian methods) with factors sharded along their
long axis (8 simulated devices).

The compiled update must move only ``r x r``-sized data between devices: the
thin QR of ALGORITHMS.md 1.2 is computed from Gram matrices (local products
all-reduced to ``r x r``), and everything else is either a product with an
``r x r`` matrix (row-local) or another such reduction. A QR of the gathered
factor would show up here as an all-gather of ``rows x r`` elements.
"""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lora_problems as lp
import rite_optax

# The benchmark's HLO reading, so that the test checks what it reports.
from bench_optimizers import MOVING, collectives_in

RANK = 4
# Long axes much longer than r^2, so that a factor-sized collective cannot be
# mistaken for an r x r one.
SHAPES = {"attn": (512, 1024), "mlp": (1024, 256)}
LAYERS = 3  # the "mlp" adapter is stacked: a leading layer axis


def _tree(seed):
  rng = np.random.default_rng(seed)
  (m, n), (k, l) = SHAPES["attn"], SHAPES["mlp"]
  return {
      "attn": {"lora_a": rng.standard_normal((m, RANK)),
               "lora_b": rng.standard_normal((RANK, n)) * 0.1},
      "mlp": {"lora_a": rng.standard_normal((LAYERS, k, RANK)),
              "lora_b": rng.standard_normal((LAYERS, RANK, l)) * 0.1},
  }


def _mesh():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py sets 8 CPU devices"
  return Mesh(np.array(devices), ("rows",))


def _param_specs():
  """Rows of lora_a, columns of lora_b (their long axes) over the mesh."""
  return {"attn": {"lora_a": P("rows", None), "lora_b": P(None, "rows")},
          "mlp": {"lora_a": P(None, "rows", None),
                  "lora_b": P(None, None, "rows")}}


def _state_specs(tx, params):
  """Factor-shaped state like its param; small state (count, (r,) escape
  eigenvalues, scalars) replicated."""
  specs = _param_specs()
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
  shapes = [x.shape for x in jax.tree.leaves(params)]

  def spec(leaf):
    return (flat_specs[shapes.index(leaf.shape)] if leaf.shape in shapes
            else P())
  return jax.tree.map(spec, jax.eval_shape(tx.init, params))


def _sharded_update(tx, params):
  mesh = _mesh()
  named = lambda spec: NamedSharding(mesh, spec)
  is_spec = lambda s: isinstance(s, P)
  param_sh = jax.tree.map(named, _param_specs(), is_leaf=is_spec)
  state_sh = jax.tree.map(named, _state_specs(tx, params), is_leaf=is_spec)
  return jax.jit(tx.update, in_shardings=(param_sh, state_sh, param_sh),
                 out_shardings=(param_sh, state_sh)), param_sh, state_sh


CASES = {
    "defaults": lambda: rite_optax.lora_rite(1e-2),
    "escape_and_capping": lambda: rite_optax.lora_rite(
        1e-2, escape=True, update_capping=0.01),
    "weight_decay": lambda: rite_optax.lora_rite(1e-2, weight_decay=0.1),
    # The Riemannian methods too: their Gram matrices are sharded matmuls
    # and r x r all-reduces, their solve a row-local product.
    "scaled_gd": lambda: rite_optax.scaled_gd(1e-2),
    "scaled_adamw": lambda: rite_optax.scaled_adamw(1e-2),
    "scaled_adamw_sequential": lambda: rite_optax.scaled_adamw(
        1e-2, sequential=True),
    # LoRA-Pro's efficient mode: its Gram and cross products too.
    "lora_pro_efficient": lambda: rite_optax.lora_pro(
        1e-2, scale=2.0, mode="efficient"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_update_moves_only_r_by_r_data(case):
  tx = CASES[case]()
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(0))
  update, _, _ = _sharded_update(tx, params)
  hlo = update.lower(params, tx.init(params), params).compile().as_text()
  collectives = collectives_in(hlo)
  assert collectives, "the Gram matrices must be all-reduced"
  moving = [c for c in collectives if c[0] in MOVING]
  assert not moving, f"factor data moved between devices: {moving}"
  # Every all-reduce is of r x r matrices (per factor and stacked layer, maybe
  # combined by XLA into one op of several operands) or smaller: far from
  # the smallest factor's rows * r / 8 elements per device.
  factors = sum(2 * (x.shape[0] if x.ndim == 3 else 1)
                for x in jax.tree.leaves(params)) // 2
  largest = max(size for _, size in collectives)
  smallest_shard = min(x.size for x in jax.tree.leaves(params)) // 8
  assert largest <= factors * RANK * RANK < smallest_shard, collectives


def test_sharded_update_equals_unsharded():
  tx = rite_optax.lora_rite(1e-2, escape=True)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(1))
  update, param_sh, state_sh = _sharded_update(tx, params)
  plain = jax.jit(tx.update)
  sharded_params = jax.device_put(params, param_sh)
  state = tx.init(params)
  sharded_state = jax.device_put(state, state_sh)
  for seed in range(3):
    grads = lp.grads_like(params, seed, scale=1e-3)
    got, sharded_state = update(jax.device_put(grads, param_sh),
                                sharded_state, sharded_params)
    expected, state = plain(grads, state, params)
    chex.assert_trees_all_close(got, expected, rtol=2e-4, atol=1e-7)
    # The stored moments are defined up to the signs of eigenvectors (the
    # basis rotation of ScaleByLoraRiteState), which rounding may flip; the
    # eigenvalues, and the updates over several steps, are not.
    chex.assert_trees_all_close(sharded_state[0].nu, state[0].nu, rtol=2e-4,
                                atol=1e-12)
    params = jax.tree.map(lambda p, u: p + u, params, expected)
    sharded_params = jax.device_put(params, param_sh)
  assert float(jnp.abs(got["attn"]["lora_a"]).max()) > 0
  leaf = sharded_state[0].basis["attn"]["lora_a"]
  assert not leaf.sharding.is_fully_replicated


def test_sharded_scaled_adamw_equals_unsharded():
  tx = rite_optax.scaled_adamw(1e-2, sequential=True)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(1))
  update, param_sh, state_sh = _sharded_update(tx, params)
  state = tx.init(params)
  sharded_state = jax.device_put(state, state_sh)
  for seed in range(3):
    grads = lp.grads_like(params, seed, scale=1e-3)
    got, sharded_state = update(jax.device_put(grads, param_sh),
                                sharded_state, jax.device_put(params, param_sh))
    expected, state = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_close(got, expected, rtol=2e-4, atol=1e-7)
    params = jax.tree.map(lambda p, u: p + u, params, expected)
