"""Pair discovery: every layout maps to the same canonical pair, bad trees fail
with the pytree path in the message."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rite_optax
from rite_optax import pairs as pairs_lib
from rite_optax.pairs import FactorSpec

M, N, R = 12, 10, 3


def _canonical():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((M, R)), rng.standard_normal((N, R))
  ga, gb = 0.05 * rng.standard_normal((M, R)), 0.05 * rng.standard_normal((N, R))
  return [jnp.asarray(x, jnp.float32) for x in (a, b, ga, gb)]


def _explicit_canonical_spec(path, leaf):
  name = pairs_lib.path_str(path)
  return FactorSpec("adapter", "in" if name.endswith("['A']") else "out", -1)


def _einsum_spec(path, leaf):
  # a: (2, 6, r) input-side, rows 2 x 6; b: (r, 5, 2) output-side, rank first.
  name = pairs_lib.path_str(path)
  if name.endswith("['w_a']"):
    return FactorSpec("attn", "in", 2)
  if name.endswith("['w_b']"):
    return FactorSpec("attn", "out", 0)
  return None


# Each layout: (build the tree from canonical A, B; read canonical A, B back).
LAYOUTS = {
    "explicit_canonical": (
        lambda a, b: {"A": a, "B": b},
        lambda t: (t["A"], t["B"]),
        _explicit_canonical_spec),
    "nnx": (
        lambda a, b: {"layer": {"lora": {"lora_a": a, "lora_b": b.T}}},
        lambda t: (t["layer"]["lora"]["lora_a"], t["layer"]["lora"]["lora_b"].T),
        None),
    "gemma_dense": (
        lambda a, b: {"mlp": {"lora": {"a": a, "b": b.T}}},
        lambda t: (t["mlp"]["lora"]["a"], t["mlp"]["lora"]["b"].T),
        None),
    # Gemma's einsum adapters: a (heads, head_dim, r), b (r, d_model).
    "gemma_einsum": (
        lambda a, b: {"attn_vec_einsum": {"lora": {"a": a.reshape(3, 4, R),
                                                   "b": b.T}}},
        lambda t: (t["attn_vec_einsum"]["lora"]["a"].reshape(M, R),
                   t["attn_vec_einsum"]["lora"]["b"].T),
        None),
    "gemma_einsum_out_axes": (
        lambda a, b: {"q_einsum": {"lora": {"a": a, "b": b.T.reshape(R, 2, 5)}}},
        lambda t: (t["q_einsum"]["lora"]["a"],
                   t["q_einsum"]["lora"]["b"].reshape(R, N).T),
        None),
    "peft": (
        lambda a, b: {"q_proj": {"lora_A": a.T, "lora_B": b}},
        lambda t: (t["q_proj"]["lora_A"].T, t["q_proj"]["lora_B"]),
        None),
    "peft_nested": (
        lambda a, b: {"q_proj": {"lora_A": {"default": {"weight": a.T}},
                                 "lora_B": {"default": {"weight": b}}}},
        lambda t: (t["q_proj"]["lora_A"]["default"]["weight"].T,
                   t["q_proj"]["lora_B"]["default"]["weight"]),
        None),
    "explicit_einsum": (
        lambda a, b: {"w_a": jnp.transpose(a.reshape(6, 2, R), (1, 0, 2)),
                      "w_b": jnp.transpose(b.reshape(5, 2, R), (2, 0, 1))},
        lambda t: (jnp.transpose(t["w_a"], (1, 0, 2)).reshape(M, R),
                   jnp.transpose(t["w_b"], (1, 2, 0)).reshape(N, R)),
        _einsum_spec),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_gives_the_canonical_update(layout):
  build, read, spec = LAYOUTS[layout]
  a, b, ga, gb = _canonical()
  reference = rite_optax.lora_rite(0.1, pair_spec=_explicit_canonical_spec)
  params_c = {"A": a, "B": b}
  grads_c = {"A": ga, "B": gb}
  state_c = reference.init(params_c)
  tx = rite_optax.lora_rite(0.1, pair_spec=spec)
  params, grads = build(a, b), build(ga, gb)
  assert read(params)[0].shape == (M, R)  # the layout round-trips
  state = tx.init(params)
  for _ in range(3):
    up_c, state_c = reference.update(grads_c, state_c, params_c)
    up, state = jax.jit(tx.update)(grads, state, params)
    got_a, got_b = read(up)
    np.testing.assert_allclose(got_a, up_c["A"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_b, up_c["B"], rtol=1e-5, atol=1e-7)
    params_c = optax.apply_updates(params_c, up_c)
    params = optax.apply_updates(params, up)
  assert float(jnp.abs(up_c["A"]).max()) > 1e-4


def test_stacked_layouts_find_batch_axes():
  tree = {
      "nnx": {"lora_a": jnp.zeros((4, M, R)), "lora_b": jnp.zeros((4, R, N))},
      "peft": {"lora_A": jnp.zeros((2, 3, R, M)), "lora_B": jnp.zeros((2, 3, N, R))},
  }
  found = pairs_lib.find_pairs(tree)
  by_name = {p.name: p for p in found.pairs}
  nnx_pair = by_name["params['nnx']"]
  assert nnx_pair.a.batch_shape == (4,) and nnx_pair.a.rows == M
  assert nnx_pair.b.batch_shape == (4,) and nnx_pair.b.rows == N
  peft_pair = by_name["params['peft']"]
  assert peft_pair.a.batch_shape == (2, 3) and peft_pair.a.rows == M
  canon = found.split(tree)
  assert {tuple(x.shape) for pair in canon for x in pair} == {
      (4, M, R), (4, N, R), (6, M, R), (6, N, R)}


def test_canonical_round_trip_is_exact():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  layout = pairs_lib.FactorLayout("p", x.shape, "in", rank_axis=1,
                                  batch_axes=(2,))
  y = layout.to_canonical(x)
  assert y.shape == (4, 10, 3)
  np.testing.assert_array_equal(layout.from_canonical(y), x)


def test_nnx_variables_pair_like_arrays():
  from flax import nnx
  model = nnx.LoRALinear(6, 8, lora_rank=2, rngs=nnx.Rngs(0))
  found = pairs_lib.find_pairs(nnx.state(model, nnx.LoRAParam))
  (pair,) = found.pairs
  assert pair.name == "params['lora']"
  assert (pair.a.rows, pair.b.rows, pair.a.rank) == (6, 8, 2)


def test_multi_transform_recipe_from_the_docs():
  """The recipe of the pairs module docstring trains LoRA factors with
  LoRA-RITE and the other leaves with AdamW."""
  a, b, ga, gb = _canonical()
  params = {"layer": {"lora": {"lora_a": a, "lora_b": b.T},
                      "bias": jnp.ones(N), "norm": {"scale": jnp.ones(N)}}}
  grads = {"layer": {"lora": {"lora_a": ga, "lora_b": gb.T},
                     "bias": jnp.ones(N), "norm": {"scale": jnp.ones(N)}}}
  labels = jax.tree_util.tree_map_with_path(
      lambda p, x: "lora" if pairs_lib.is_lora_factor(p) else "other", params)
  tx = optax.multi_transform(
      {"lora": rite_optax.lora_rite(0.1), "other": optax.adamw(1e-3)}, labels)
  updates, _ = tx.update(grads, tx.init(params), params)
  alone = rite_optax.lora_rite(0.1)
  lora_only = {"layer": {"lora": params["layer"]["lora"]}}
  expected, _ = alone.update({"layer": {"lora": grads["layer"]["lora"]}},
                             alone.init(lora_only), lora_only)
  chex.assert_trees_all_close(updates["layer"]["lora"], expected["layer"]["lora"])
  assert float(jnp.abs(updates["layer"]["bias"]).max()) > 0


# ----------------------------------------------------------------- errors
ERROR_CASES = {
    "unknown_leaf": (
        {"layer": {"lora_a": jnp.zeros((M, R)), "lora_b": jnp.zeros((R, N)),
                   "bias": jnp.zeros(N)}},
        None, "params['layer']['bias']: leaf of shape (10,) belongs to no LoRA pair"),
    "missing_partner": (
        {"layer_0": {"lora_a": jnp.zeros((M, R))},
         "layer_1": {"lora_a": jnp.zeros((M, R)), "lora_b": jnp.zeros((R, N))}},
        None, "params['layer_0']['lora_a']: LoRA factor has no output-side partner"),
    "missing_input_side": (
        {"q_proj": {"lora_B": jnp.zeros((N, R))}},
        None, "params['q_proj']['lora_B']: LoRA factor has no input-side partner"),
    "rank_mismatch": (
        {"layer_3": {"attn": {"q": {"lora_a": jnp.zeros((M, 8)),
                                    "lora_b": jnp.zeros((16, N))}}}},
        None, "params['layer_3']['attn']['q']: input-side factor "
              "params['layer_3']['attn']['q']['lora_a'] has rank 8 but output-side "
              "factor params['layer_3']['attn']['q']['lora_b'] has rank 16"),
    "batch_mismatch": (
        {"blocks": {"lora_a": jnp.zeros((4, M, R)), "lora_b": jnp.zeros((3, R, N))}},
        None, "params['blocks']: input-side factor params['blocks']['lora_a'] has "
              "batch shape (4,) but output-side factor params['blocks']['lora_b'] "
              "has (3,)"),
    "two_inputs_one_pair": (
        {"x": jnp.zeros((M, R)), "y": jnp.zeros((M, R))},
        lambda p, x: FactorSpec("one", "in", -1),
        "params['y']: second 'in'-side factor of one LoRA pair (the first is "
        "params['x'])"),
    "axis_out_of_range": (
        {"x": jnp.zeros((M, R)), "y": jnp.zeros((N, R))},
        lambda p, x: FactorSpec("one", "in" if "x" in str(p) else "out", 2),
        "params['x']: rank axis 2 / batch axes () out of range for shape (12, 3)"),
    "rank_exceeds_rows": (
        {"tiny": {"lora_a": jnp.zeros((M, 4)), "lora_b": jnp.zeros((4, 3))}},
        None, "params['tiny']['lora_b']: LoRA-RITE needs rank <= rows, but this "
              "factor has 3 rows and rank 4"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_trees_raise_with_the_path(case):
  tree, spec, message = ERROR_CASES[case]
  tx = rite_optax.lora_rite(0.1, pair_spec=spec)
  with pytest.raises(ValueError, match=re.escape(message)):
    tx.init(tree)


def test_gradient_of_the_wrong_shape_names_the_path():
  params = {"layer": {"lora_a": jnp.ones((M, R)), "lora_b": jnp.ones((R, N))}}
  grads = {"layer": {"lora_a": jnp.ones((M, R)), "lora_b": jnp.ones((R, N + 1))}}
  tx = rite_optax.lora_rite(0.1)
  with pytest.raises(ValueError, match=re.escape(
      "params['layer']['lora_b']: gradient has shape (3, 11) but the parameter "
      "has shape (3, 10)")):
    tx.update(grads, tx.init(params), params)


def test_gradient_with_other_leaves_is_rejected():
  params = {"layer": {"lora_a": jnp.ones((M, R)), "lora_b": jnp.ones((R, N))}}
  grads = {"layer": {"lora_a": jnp.ones((M, R))}}
  tx = rite_optax.lora_rite(0.1)
  with pytest.raises(ValueError, match="gradient has 1 leaves but the LoRA "
                     "parameters have 2"):
    tx.update(grads, tx.init(params), params)
