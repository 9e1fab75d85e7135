"""The README's examples and the main job run as written."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
  text = (ROOT / "README.md").read_text()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_train_step_runs_and_learns(capsys):
  block = next(b for b in _python_blocks() if "nnx.Optimizer" in b)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)
  losses = namespace["losses"]
  assert losses[-1] < 0.5 * losses[0]


def test_readme_pair_spec_example_describes_stacked_layers():
  import jax.numpy as jnp
  import rite_optax

  block = next(b for b in _python_blocks() if "FactorSpec(" in b)
  namespace = {"rite_optax": rite_optax}
  exec(compile(block, "README.md", "exec"), namespace)
  params = {"blocks": {"down": jnp.ones((3, 10, 2)), "up": jnp.ones((3, 6, 2))}}
  (pair,) = rite_optax.find_pairs(params, namespace["spec"]).pairs
  assert pair.a.batch_shape == (3,) and pair.a.rows == 10 and pair.b.rows == 6


def test_readme_multi_transform_example_runs():
  import jax
  import jax.numpy as jnp
  import optax
  import rite_optax

  block = next(b for b in _python_blocks() if "multi_transform" in b)
  params = {"l": {"lora_a": jnp.ones((6, 2)) + jnp.eye(6, 2),
                  "lora_b": jnp.ones((2, 5)), "bias": jnp.zeros(5)}}
  namespace = {"jax": jax, "optax": optax, "rite_optax": rite_optax,
               "params": params}
  exec(compile(block, "README.md", "exec"), namespace)
  tx = namespace["tx"]
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["l"]["bias"]).max()) > 0


def test_lowrank_demo_shortened():
  import lowrank_demo  # pylint: disable=import-outside-toplevel

  runs = lowrank_demo.main(["--steps", "40", "--eval-every", "20",
                            "--lrs", "0.02"])
  for name in ("LoRA-RITE", "Adam"):
    (_, first), *_, (_, last) = runs[name][0.02]
    assert last < 0.5 * first


def test_ci_calls_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  assert "make test" in readme
  assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_models_example_builds_a_paired_lora_model():
  import rite_optax

  block = next(b for b in _python_blocks() if "inject_lora" in b)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)
  pairs = rite_optax.find_pairs(namespace["trainable"]).pairs
  # tiny() has 2 layers with q, k, v, o, gate, up, down each.
  assert len(pairs) == 2 * 7
