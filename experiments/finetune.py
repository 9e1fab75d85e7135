"""LoRA fine-tuning of Gemma with any optimizer of the registry.

The main job: ``python experiments/finetune.py`` fine-tunes the ``tiny``
Gemma with LoRA-RITE on ARC-Challenge from ``../shared/data/llm_adapters``
on a CPU, with nothing downloaded, in a few minutes. The same script runs the
paper's settings on TPU through presets and command-line overrides::

    python experiments/finetune.py --preset gemma_2b_sni \\
        --checkpoint /ckpt/gemma-2b-flax --tokenizer /ckpt/tokenizer.model

Every field of :class:`FinetuneConfig` is a flag (``--steps 50``,
``--optimizer adam``, ``--hparams '{"escape": true}'``). A run writes to
``--output-dir``: orbax checkpoints (resumed automatically, saved on SIGTERM),
TensorBoard events (``tb/``), ``metrics.jsonl`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rite_optax
from rite_optax import data as data_lib
from rite_optax.models import gemma
from rite_optax.models import gemma_loader
from rite_optax.models import inject_lora
from rite_optax.models import sharding
from rite_optax.train import checkpoints as ckpt_lib
from rite_optax.train import eval as eval_lib
from rite_optax.train import step as step_lib

MULTIPLE_CHOICE = {"arc_challenge", "arc_easy", "openbookqa", "boolq",
                   "hellaswag"}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """One fine-tuning run. Every field is a command-line flag."""

  # Model.
  model: str = "tiny"  # a preset of rite_optax.models.gemma.PRESETS
  checkpoint: Optional[str] = None  # released Gemma Flax checkpoint (orbax)
  tokenizer: Optional[str] = None  # SentencePiece model; None: bytes
  compute_dtype: str = "float32"  # "bfloat16" on TPU
  # LoRA.
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_attn: bool = True
  lora_mlp: bool = True
  # Data.
  task: str = "arc_challenge"
  source: str = "local"  # "local": ../shared/data/llm_adapters; "tfds"
  data_dir: Optional[str] = None
  train_split: str = "train"
  eval_split: str = "test"
  max_len: int = 256
  batch_size: int = 16
  grad_accum_steps: int = 1
  # Optimizer.
  optimizer: str = "lora_rite"
  learning_rate: float = 2e-3
  hparams: str = "{}"  # JSON: extra hyperparameters of the optimizer
  warmup_steps: int = 20
  clip_grad_norm: float = 1.0  # 0 disables
  # Schedule of the run.
  steps: int = 300
  eval_every: int = 100
  eval_examples: int = 200  # held-out examples for task metrics
  max_new_tokens: int = 64  # generation tasks (gsm8k, natural_instructions)
  mesh: str = "auto"  # "data,fsdp,tensor" sizes, or auto: all devices on data
  output_dir: str = ""  # default: runs/<model>-<task>-<optimizer>
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  resume: bool = True
  seed: int = 0


PRESETS = {
    # The main job: CPU, nothing downloaded.
    "cpu_tiny": FinetuneConfig(),
    # The paper's Gemma 2B settings on a TPU VM (released checkpoint and
    # tokenizer supplied by the user; data from TFDS).
    "gemma_2b_sni": FinetuneConfig(
        model="gemma_2b", compute_dtype="bfloat16", task="natural_instructions",
        source="tfds", train_split="train[:95%]", eval_split="train[95%:]",
        max_len=1024, batch_size=64, lora_rank=16, lora_alpha=16.0,
        learning_rate=2e-4, steps=5000, eval_every=500, eval_examples=1000,
        max_new_tokens=128, mesh="auto", checkpoint_every=500),
}


def parse_config(argv: Optional[list[str]] = None) -> FinetuneConfig:
  """``--preset NAME`` then one flag per :class:`FinetuneConfig` field."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cpu_tiny", choices=sorted(PRESETS))
  for field in dataclasses.fields(FinetuneConfig):
    flag = "--" + field.name.replace("_", "-")
    if field.type in ("bool", bool):
      parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"),
                          default=None, metavar="BOOL")
    elif field.type in ("int", int):
      parser.add_argument(flag, type=int, default=None)
    elif field.type in ("float", float):
      parser.add_argument(flag, type=float, default=None)
    else:
      parser.add_argument(flag, type=str, default=None)
  args = parser.parse_args(argv)
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(
      FinetuneConfig) if getattr(args, f.name) is not None}
  return dataclasses.replace(PRESETS[args.preset], **overrides)


def build_mesh(spec: str) -> jax.sharding.Mesh:
  if spec == "auto":
    return sharding.make_mesh(data=jax.device_count(), fsdp=1, tensor=1)
  data, fsdp, tensor = (int(x) for x in spec.split(","))
  return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)


def load_examples(config: FinetuneConfig, split: str) -> list[dict[str, Any]]:
  if config.source == "local":
    return data_lib.load_local_task(config.task, split, config.data_dir)
  if config.source == "tfds":
    return list(data_lib.tfds_task(config.task, split, config.data_dir))
  raise ValueError(f"source must be 'local' or 'tfds', got {config.source!r}")


def build_model(config: FinetuneConfig, tokenizer, mesh) -> nnx.Module:
  model_config = gemma.PRESETS[config.model]()
  model_config = dataclasses.replace(
      model_config, dtype=jnp.dtype(config.compute_dtype),
      **({"vocab_size": tokenizer.vocab_size} if config.checkpoint is None
         else {}))
  if config.checkpoint is not None:
    model = gemma_loader.load_gemma_checkpoint(config.checkpoint, model_config,
                                               mesh)
  else:
    # No released weights: a randomly initialised base (CPU smoke runs).
    with nnx.use_eager_sharding(False):
      model = gemma.Gemma(model_config, rngs=nnx.Rngs(config.seed))
  inject_lora(model, config.lora_rank, config.lora_alpha,
              gemma.lora_targets(attn=config.lora_attn, mlp=config.lora_mlp),
              rngs=nnx.Rngs(config.seed + 1))
  return model


def build_optimizer(config: FinetuneConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps,
      max(config.steps, config.warmup_steps + 1))
  inner = rite_optax.get_optimizer(config.optimizer, schedule,
                                   **json.loads(config.hparams))
  if config.clip_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), inner)
  return inner


class MetricsLog:
  """``metrics.jsonl``, TensorBoard events and ``loss.png`` of a run."""

  def __init__(self, output_dir: pathlib.Path):
    from tensorboardX import SummaryWriter  # an experiments dependency
    self.output_dir = output_dir
    self.writer = SummaryWriter(str(output_dir / "tb"))
    self.history: dict[str, list[tuple[int, float]]] = {}
    path = output_dir / "metrics.jsonl"
    if path.exists():  # a resumed run: its curves continue the earlier ones
      for line in path.read_text().splitlines():
        record = json.loads(line)
        for name, value in record.items():
          if name != "step":
            self.history.setdefault(name, []).append((record["step"], value))
    self.jsonl = open(path, "a", encoding="utf-8")

  def log(self, step: int, values: dict[str, float]) -> None:
    for name, value in values.items():
      self.writer.add_scalar(name, value, step)
      self.history.setdefault(name, []).append((step, value))
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()

  def plot(self) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("train/loss", "eval/loss"):
      if name in self.history:
        steps, values = zip(*self.history[name])
        ax.plot(steps, values, label=name, marker="o" if "eval" in name else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (token mean over targets)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = self.output_dir / "loss.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path

  def close(self) -> None:
    self.writer.close()
    self.jsonl.close()


# The settings that define the checkpointed state: a run may only resume
# from checkpoints written with the same ones.
STATE_FIELDS = ("model", "checkpoint", "lora_rank", "lora_alpha", "lora_attn",
                "lora_mlp", "optimizer", "hparams", "clip_grad_norm", "task",
                "source", "train_split", "batch_size", "max_len", "seed")


def check_resumable(config: FinetuneConfig, output_dir: pathlib.Path) -> None:
  """Refuse to resume checkpoints written by a run with another state."""
  saved = output_dir / "config.json"
  if not (config.resume and saved.exists()
          and (output_dir / "checkpoints").exists()):
    return
  before = json.loads(saved.read_text())
  changed = [f for f in STATE_FIELDS if before.get(f) != getattr(config, f)]
  if changed:
    raise ValueError(
        f"{output_dir} holds checkpoints of a run with other "
        + ", ".join(f"{f}={before.get(f)!r}" for f in changed)
        + "; choose another --output-dir or pass --resume false")


def evaluate(config, setup, params, eval_step, eval_examples, tokenizer,
             mesh) -> dict[str, float]:
  """Held-out loss, and the task's metric on ``eval_examples`` examples."""
  batches = data_lib.Batches(eval_examples, tokenizer,
                             batch_size=config.batch_size,
                             max_len=config.max_len, shuffle=False,
                             num_epochs=1, drop_remainder=False)
  loss_sum = tokens = 0.0
  for batch in batches:
    out = eval_step(setup.frozen, params, step_lib.shard_batch(batch, mesh))
    loss_sum += float(out["loss_sum"])
    tokens += float(out["tokens"])
  results = {"eval/loss": loss_sum / max(tokens, 1.0)}
  model = nnx.merge(setup.graphdef, params, setup.frozen)
  task = data_lib.tasks.canonical_task(config.task)
  if task in MULTIPLE_CHOICE:
    scores = eval_lib.multiple_choice_accuracy(
        model, tokenizer, eval_examples, batch_size=config.batch_size,
        max_length=config.max_len)
    results.update({"eval/acc": scores["acc"], "eval/acc_norm": scores["acc_norm"]})
  elif task == "gsm8k":
    results["eval/accuracy"] = eval_lib.gsm8k_accuracy(
        model, tokenizer, eval_examples, config.max_new_tokens)["accuracy"]
  elif task == "natural_instructions":
    scores = eval_lib.sni_metrics(model, tokenizer, eval_examples,
                                  config.max_new_tokens)
    results.update({"eval/exact_match": scores["exact_match"],
                    "eval/rouge_l": scores["rouge_l"]})
  return results


def run(config: FinetuneConfig) -> dict[str, Any]:
  """Fine-tune, evaluating every ``eval_every`` steps; returns the history."""
  from tqdm.auto import tqdm  # an experiments dependency

  step_lib.initialize_distributed()
  output_dir = pathlib.Path(config.output_dir or (
      f"runs/{config.model}-{config.task}-{config.optimizer}"))
  output_dir.mkdir(parents=True, exist_ok=True)
  check_resumable(config, output_dir)
  (output_dir / "config.json").write_text(
      json.dumps(dataclasses.asdict(config), indent=2))
  mesh = build_mesh(config.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"] * config.grad_accum_steps
  if config.batch_size % shards:
    raise ValueError(
        f"--batch-size {config.batch_size} must be a multiple of data x fsdp "
        f"x grad_accum_steps = {shards} (mesh {dict(mesh.shape)})")
  tokenizer = data_lib.load_tokenizer(config.tokenizer)
  train_examples = load_examples(config, config.train_split)
  eval_examples = load_examples(config, config.eval_split)
  eval_examples = [eval_examples[i] for i in np.random.default_rng(
      config.seed).permutation(len(eval_examples))[:config.eval_examples]]

  model = build_model(config, tokenizer, mesh)
  tx = build_optimizer(config)
  setup = step_lib.create_train_state(model, tx, mesh)
  compute_dtype = jnp.dtype(config.compute_dtype)
  train_step = step_lib.make_train_step(
      setup.graphdef, tx, mesh, setup.shardings,
      grad_accum_steps=config.grad_accum_steps, compute_dtype=compute_dtype)
  eval_step = step_lib.make_eval_step(setup.graphdef, mesh, setup.shardings,
                                      compute_dtype=compute_dtype)
  batches = data_lib.Batches(train_examples, tokenizer,
                             batch_size=config.batch_size,
                             max_len=config.max_len, seed=config.seed)
  efficiency = data_lib.padding_efficiency(
      [next(iter(data_lib.Batches(train_examples, tokenizer,
                                  batch_size=config.batch_size,
                                  max_len=config.max_len, seed=config.seed)))])
  log = MetricsLog(output_dir)
  state = setup.state
  with ckpt_lib.Checkpoints(output_dir / "checkpoints",
                            max_to_keep=config.keep_checkpoints,
                            save_every=config.checkpoint_every) as checkpoints:
    if config.resume:
      restored = checkpoints.restore_latest_valid(
          ckpt_lib.abstract_like(state, setup.shardings.state))
      if restored is not None:
        state = restored.state
        batches.restore(restored.data_state)
        print(f"resumed from step {restored.step}", file=sys.stderr)
    start = int(jax.device_get(state.step))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"{config.model} + LoRA r={config.lora_rank} ({n_params:,} trainable)"
          f" | {config.optimizer} lr={config.learning_rate:g} | "
          f"{config.task}: {len(train_examples)} train, {len(eval_examples)} "
          f"eval | mesh {dict(mesh.shape)} | padding efficiency "
          f"{efficiency:.2f}", file=sys.stderr)

    progress = tqdm(total=config.steps, initial=start, desc="fine-tune",
                    dynamic_ncols=True, disable=None)
    pending: list[tuple[int, dict]] = []

    def flush():
      for s, m in jax.device_get(pending):
        log.log(s, {"train/loss": float(m["loss"]),
                    "train/grad_norm": float(m["grad_norm"])})
      if pending:
        progress.set_postfix(loss=f"{float(pending[-1][1]['loss']):.4f}")
      pending.clear()

    def on_step(step, metrics):
      pending.append((step, metrics))
      if step % 10 == 0:  # one host sync per 10 steps, not per step
        flush()
      progress.update(1)

    if start >= config.steps:
      print(f"{output_dir} is already at step {start} of {config.steps}",
            file=sys.stderr)
    wall = time.perf_counter()
    with ckpt_lib.PreemptionGuard() as guard:
      step = start
      while step < config.steps:
        stop = min(config.steps, (step // config.eval_every + 1)
                   * config.eval_every)
        result = ckpt_lib.train_loop(train_step, setup.frozen, state, batches,
                                     checkpoints, num_steps=stop, guard=guard,
                                     on_step=on_step)
        state, step = result.state, result.step
        flush()
        if result.preempted:
          print(f"preempted: checkpoint saved at step {step}", file=sys.stderr)
          break
        scores = evaluate(config, setup, state.params, eval_step,
                          eval_examples, tokenizer, mesh)
        log.log(step, scores)
        progress.write(f"step {step}: " + ", ".join(
            f"{k.split('/')[1]} {v:.4f}" for k, v in scores.items()))
    progress.close()
  plot = log.plot()
  log.close()
  print(f"done in {time.perf_counter() - wall:.0f}s: {output_dir} "
        f"(TensorBoard events in tb/, curves in {plot.name})", file=sys.stderr)
  return log.history


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  logging.basicConfig(level=logging.WARNING)
  return run(parse_config(argv))


if __name__ == "__main__":
  main()
