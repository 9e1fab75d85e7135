"""Pretrain a small byte-level Gemma on the LLM-Adapters train splits.

The base model of the CPU comparison (``experiments/compare.py``): a
Gemma-architecture decoder (:func:`rite_optax.models.gemma.small`, or
``mini`` for quick runs) trained from scratch, every parameter, with
``optax.adamw`` and a warmup-cosine schedule, on next-byte prediction over the
formatted texts (prompt + answer, as :func:`rite_optax.data.load_local_task`
builds them) of the **train** files only::

    arc-challenge_train  arc-easy_train  openbookqa_train  boolq_train
    math_data            mawps_trainset

No test file is ever opened (:data:`TRAIN_TASKS` is read with split
``"train"`` alone); a slice of each train file (``--val-fraction``, never
trained on) gives the held-out loss. The result is written in the released
Gemma Flax layout (:func:`rite_optax.models.gemma_loader.save_gemma_checkpoint`)
so that it loads exactly as a released checkpoint does::

    python experiments/pretrain.py --out runs/pretrain/small
    python experiments/finetune.py --model small \\
        --checkpoint runs/pretrain/small/checkpoint --task boolq

``<out>/checkpoint`` is the orbax checkpoint, ``<out>/pretrain.json`` its
provenance: the preset (which rebuilds the config: ``gemma.PRESETS[model]()``),
the full config, the files read, the settings, the loss curve and the held-out
loss before and after. The folder is written under a temporary name and
renamed when complete, so a folder that exists is a finished base
(:func:`ensure_base` pretrains only when it is missing).

Sequences: each text is ``[BOS] + text + [EOS]`` cut into windows of at most
``max_len`` tokens, the last window being the text's last ``max_len - 2``
characters (the answer with as much of its prompt as fits, as fine-tuning
sees it); only the last window ends with EOS. The loss is over every token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Optional, Sequence

# XLA's CPU runtime runs independent LAPACK calls (the eigh of Shampoo and
# LoRA-RITE) concurrently; with OpenMP/OpenBLAS threads on top they
# oversubscribe the cores by orders of magnitude (a Shampoo step on the
# `small` model takes minutes instead of a second). One thread each.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from rite_optax import data as data_lib  # noqa: E402
from rite_optax.data import tasks as tasks_lib  # noqa: E402
from rite_optax.models import gemma  # noqa: E402
from rite_optax.models import gemma_loader  # noqa: E402
from rite_optax.train import step as step_lib  # noqa: E402

# The tasks whose "train" files are read (gsm8k's is math_data.json).
TRAIN_TASKS = ("arc_challenge", "arc_easy", "openbookqa", "boolq", "gsm8k",
               "mawps")
CHECKPOINT = "checkpoint"
INFO = "pretrain.json"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """One pretraining run. Every field is a command-line flag."""

  model: str = "small"  # a preset of rite_optax.models.gemma.PRESETS
  steps: int = 700
  batch_size: int = 16
  max_len: int = 256
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  end_lr_fraction: float = 0.1  # the cosine decays to this fraction
  weight_decay: float = 0.1
  clip_grad_norm: float = 1.0
  val_fraction: float = 0.02  # of each train file, held out
  val_windows: int = 256  # held-out windows scored (the first ones)
  log_every: int = 50
  seed: int = 0
  data_dir: Optional[str] = None  # default: the package's copy


QUICK = dict(model="mini", steps=120, batch_size=16, max_len=128,
             warmup_steps=10, val_windows=64, log_every=20)


# --- data -------------------------------------------------------------------


def train_files(data_dir: Optional[str] = None) -> dict[str, pathlib.Path]:
  """The train file of each of :data:`TRAIN_TASKS`: the only files read."""
  root = pathlib.Path(data_dir or tasks_lib.default_local_dir())
  return {task: root / tasks_lib.LOCAL_FILES[task, "train"]
          for task in TRAIN_TASKS}


def load_texts(config: PretrainConfig) -> tuple[list[str], list[str]]:
  """``(train, val)`` texts: prompt + target of every train-file example.

  Each file's examples are shuffled by ``seed`` and its last
  ``val_fraction`` (at least one) held out; the train texts are then
  interleaved by the batch shuffling.
  """
  train, val = [], []
  for i, task in enumerate(TRAIN_TASKS):
    examples = data_lib.load_local_task(task, "train", config.data_dir)
    texts = [ex["prompt"] + ex["target"] for ex in examples]
    order = np.random.default_rng([config.seed, i]).permutation(len(texts))
    n_val = max(1, int(round(config.val_fraction * len(texts))))
    val += [texts[j] for j in order[len(texts) - n_val:]]
    train += [texts[j] for j in order[:len(texts) - n_val]]
  return train, val


def windows(text: str, max_len: int) -> list[dict[str, Any]]:
  """Raw LM examples covering ``text`` in windows of ``<= max_len`` tokens.

  The last window is the text's last ``max_len - 2`` characters and ends
  with EOS; the characters before it are cut into equal windows without EOS
  (a window of ``c`` characters gives ``[BOS] + c`` inputs).
  """
  size = max_len - 2
  last = text[-size:]
  head = text[:len(text) - len(last)]
  out = []
  if head:
    n = math.ceil(len(head) / size)
    step = math.ceil(len(head) / n)
    out += [{"prompt": "", "target": head[i:i + step], "eos": False}
            for i in range(0, len(head), step)]
  out.append({"prompt": "", "target": last, "eos": True})
  return out


class LMBatches(data_lib.Batches):
  """:class:`rite_optax.data.Batches` of language-model windows: the loss on
  every token (the prompt is empty), EOS only where a text ends."""

  def _encode(self, example):
    return data_lib.encode_decoder_only(
        self.tokenizer, example["prompt"], example["target"], self.max_len,
        add_eos=example.get("eos", True))


def lm_windows(texts: Sequence[str], max_len: int) -> list[dict[str, Any]]:
  return [w for text in texts for w in windows(text, max_len)]


def held_out_batches(config: PretrainConfig, tokenizer,
                     val_texts: Optional[Sequence[str]] = None) -> list:
  """The held-out LM batches: ``val_windows`` windows of the held-out texts
  (chosen by ``seed``), in a fixed order."""
  if val_texts is None:
    val_texts = load_texts(config)[1]
  val = lm_windows(val_texts, config.max_len)
  val = [val[i] for i in np.random.default_rng(config.seed).permutation(
      len(val))[:config.val_windows]]
  return list(LMBatches(val, tokenizer, batch_size=config.batch_size,
                        max_len=config.max_len, shuffle=False, num_epochs=1,
                        drop_remainder=False))


# --- training ---------------------------------------------------------------


def model_config(name: str) -> gemma.GemmaConfig:
  """The architecture of preset ``name``; it must have the byte vocabulary."""
  config = gemma.PRESETS[name]()
  vocab = data_lib.ByteTokenizer().vocab_size
  if config.vocab_size != vocab:
    raise ValueError(f"preset {name!r} has vocab_size {config.vocab_size}; a "
                     f"byte-level base needs {vocab} (use 'small' or 'mini')")
  return config


def build_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps,
      max(config.steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.end_lr_fraction)
  return optax.chain(
      optax.clip_by_global_norm(config.clip_grad_norm),
      optax.adamw(schedule, b2=0.95, weight_decay=config.weight_decay))


def _loss_sums(graphdef, params, batch):
  return step_lib.decoder_loss_sums(nnx.merge(graphdef, params), batch)


def make_steps(graphdef, tx):
  """Jitted full-parameter ``train_step`` and ``loss_sums``."""

  @jax.jit
  def loss_sums(params, batch):
    return _loss_sums(graphdef, params, batch)

  @jax.jit
  def train_step(params, opt_state, batch):
    def mean_loss(p):
      loss_sum, tokens = _loss_sums(graphdef, p, batch)
      return loss_sum / jnp.maximum(tokens, 1.0)
    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step, loss_sums


def held_out_loss(loss_sums, params, batches) -> float:
  """Token-mean loss over ``batches`` (one host sync)."""
  sums = [loss_sums(params, b) for b in batches]
  total, tokens = jax.device_get((sum(s for s, _ in sums),
                                  sum(t for _, t in sums)))
  return float(total) / max(float(tokens), 1.0)


def pretrain(config: PretrainConfig, out: str | os.PathLike,
             verbose: bool = True) -> dict[str, Any]:
  """Pretrain and write ``out/checkpoint`` and ``out/pretrain.json``.

  ``out`` must not exist; everything is written to a temporary sibling and
  renamed at the end. Returns the contents of ``pretrain.json``.
  """
  out = pathlib.Path(out)
  if out.exists():
    raise FileExistsError(f"{out} exists; remove it to pretrain again")
  start = time.perf_counter()
  log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose \
      else (lambda msg: None)
  tokenizer = data_lib.load_tokenizer(None)
  arch = model_config(config.model)
  train_texts, val_texts = load_texts(config)
  train_windows = lm_windows(train_texts, config.max_len)
  batches = LMBatches(train_windows, tokenizer, batch_size=config.batch_size,
                      max_len=config.max_len, seed=config.seed)
  val_batches = held_out_batches(config, tokenizer, val_texts)
  model = gemma.Gemma(arch, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  tx = build_optimizer(config)
  opt_state = tx.init(params)
  train_step, loss_sums = make_steps(graphdef, tx)
  initial_val = held_out_loss(loss_sums, params, val_batches)
  log(f"pretrain {config.model} ({n_params:,} parameters) on "
      f"{len(train_texts)} train texts ({len(train_windows)} windows, "
      f"{batches.batches_per_epoch} batches an epoch), held-out "
      f"{len(val_texts)} texts; initial held-out loss {initial_val:.3f}")
  curve, pending, tokens = [], [], 0
  train_start = time.perf_counter()
  for step in range(1, config.steps + 1):
    batch = next(batches)
    tokens += int(batch["loss_mask"].sum())
    params, opt_state, loss = train_step(params, opt_state, batch)
    pending.append((step, loss))
    if step % config.log_every == 0 or step == config.steps:
      values = jax.device_get([l for _, l in pending])
      curve += [(s, float(v)) for (s, _), v in zip(pending, values)]
      pending = []
      log(f"  step {step}/{config.steps}: loss {curve[-1][1]:.3f} "
          f"({time.perf_counter() - train_start:.0f}s)")
  train_time = time.perf_counter() - train_start
  final_val = held_out_loss(loss_sums, params, val_batches)
  log(f"held-out loss {initial_val:.3f} -> {final_val:.3f} "
      f"(nats per byte) in {train_time:.0f}s")

  nnx.update(model, params)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  gemma_loader.save_gemma_checkpoint(model, tmp / CHECKPOINT)
  info = {
      "model": config.model,
      "model_config": {k: (v if isinstance(v, (int, float, str, bool,
                                               type(None), tuple, list))
                           else str(v))
                       for k, v in dataclasses.asdict(arch).items()},
      "parameters": int(n_params),
      "tokenizer": "byte",
      "config": dataclasses.asdict(config),
      "files_read": {t: p.name
                     for t, p in train_files(config.data_dir).items()},
      "train_texts": len(train_texts),
      "val_texts": len(val_texts),
      "train_windows": len(train_windows),
      "tokens_seen": tokens,
      "epochs_seen": config.steps / batches.batches_per_epoch,
      "loss_curve": curve,
      "held_out_loss": {"initial": initial_val, "final": final_val},
      "train_time_s": train_time,
      "wall_time_s": time.perf_counter() - start,
      "seconds_per_step": train_time / max(config.steps, 1),
      "jax": jax.__version__,
      "checkpoint": CHECKPOINT,
  }
  (tmp / INFO).write_text(json.dumps(info, indent=2))
  os.replace(tmp, out)
  return info


def ensure_base(out: str | os.PathLike, config: PretrainConfig,
                verbose: bool = True) -> dict[str, Any]:
  """The base at ``out``: pretrained now only if ``out`` is missing.

  Returns ``pretrain.json``'s contents plus ``"path"`` (the checkpoint
  folder) and ``"cached"`` (whether it was already there). A cached base
  built from another preset than ``config.model`` is refused.
  """
  out = pathlib.Path(out)
  cached = (out / CHECKPOINT).exists()
  if cached:
    info = json.loads((out / INFO).read_text())
    if info["model"] != config.model:
      raise ValueError(f"{out} holds a pretrained {info['model']!r}, not "
                       f"{config.model!r}: remove it or choose another base")
  else:
    info = pretrain(config, out, verbose=verbose)
  return {**info, "path": str((out / CHECKPOINT).resolve()), "cached": cached}


def parse_args(argv: Optional[list[str]] = None
               ) -> tuple[PretrainConfig, str]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None,
                      help="output folder (default runs/pretrain/<model>)")
  parser.add_argument("--quick", action="store_true",
                      help="the small quick base: " + json.dumps(QUICK))
  for field in dataclasses.fields(PretrainConfig):
    kind = {"int": int, "float": float}.get(str(field.type), str)
    parser.add_argument("--" + field.name.replace("_", "-"), type=kind,
                        default=None)
  args = parser.parse_args(argv)
  config = PretrainConfig(**(QUICK if args.quick else {}))
  config = dataclasses.replace(config, **{
      f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
      if getattr(args, f.name) is not None})
  return config, args.out or f"runs/pretrain/{config.model}"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  config, out = parse_args(argv)
  return pretrain(config, out)


if __name__ == "__main__":
  main()
