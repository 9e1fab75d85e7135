"""Run one fine-tuning config on every worker of a Cloud TPU VM slice.

    python experiments/tpu/launch.py --tpu my-v4-32 --zone us-central2-b \\
        --config experiments/tpu/configs/gemma_7b_gsm8k.yaml \\
        --checkpoint /ckpt/gemma-7b --tokenizer /ckpt/tokenizer.model \\
        --output-dir /mnt/shared/runs/gemma_7b_gsm8k [-- --optimizer adam ...]

runs, with ``gcloud compute tpus tpu-vm ssh/scp ... --worker=all``:

1. setup: clone the repository at ``--ref`` into ``--workdir`` on every
   worker (or update it), and install it with ``pip install -e
   '.[experiments]' 'jax[tpu]'`` in a virtual environment (``--skip-setup``
   skips the clone and install);
2. the config file, copied to every worker;
3. with ``--prepare-data``: the TFDS splits of the task, downloaded and
   prepared as array_record on every worker;
4. ``experiments/finetune.py --config ...`` on every worker at once, in the
   background (``--foreground`` to stream it), logging to
   ``~/rite_optax_launch/<config>.log``. ``finetune.py`` joins the workers
   into one JAX system itself (``jax.distributed.initialize`` on a TPU VM).

Flags after ``--`` are passed to ``finetune.py`` (they override the config).

``--dry-run`` prints those commands instead of running them, then checks the
config on this machine: it builds everything for it on CPU with the model
swapped to the family's ``tiny`` preset, the data to generated records in the
task's TFDS format (``source: mock``) and the mesh and batch scaled down to
4 of 8 simulated CPU devices, keeping the config's optimizer, its
hyperparameters, rank, learning-rate schedule, dtype, gradient accumulation
and mesh layout, runs two training steps and an evaluation through
``rite_optax.train.finetune.fit``, and exits 0 only if the loss is finite and the LoRA factors
changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
from typing import Any, NamedTuple, Optional, Sequence

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIGS = HERE / "configs"
REMOTE_DIR = "rite_optax_launch"  # under each worker's home
# Devices of the dry run's mesh: 4 of the 8 simulated CPU devices it starts
# JAX with. When every device of the process runs LoRA-RITE's eigh at once,
# jaxlib's CPU eigh (lapack_ssyevd_ffi, which splits its batch over the
# intra-op thread pool that also runs the devices' programs) deadlocks on a
# small machine: every pool thread waits in an eigh for work no thread is
# free to run. Half the devices leave threads free. (TPUs have no such pool.)
DRY_RUN_DEVICES = 4
DRY_RUN_STEPS = 2
# Narrowest projection the tiny presets put LoRA on (Gemma's k/v: 1 head of
# 16; T5's q/k/v: 4 heads of 8): a larger rank is capped there.
TINY_MAX_RANK = {"gemma": 16, "t5": 32}


def _finetune():
  """:mod:`rite_optax.train.finetune` (imported late: it imports JAX)."""
  from rite_optax.train import finetune  # pylint: disable=import-outside-toplevel
  return finetune


# --- the commands -----------------------------------------------------------


def _git(*args: str) -> Optional[str]:
  try:
    out = subprocess.run(["git", "-C", str(REPO), *args], check=True,
                         capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return out or None


def _where(args: argparse.Namespace) -> list[str]:
  out = ["--zone", args.zone]
  if args.project:
    out += ["--project", args.project]
  return out


def ssh(args: argparse.Namespace, command: str, worker: str = "all"
        ) -> list[str]:
  """``gcloud compute tpus tpu-vm ssh NAME ... --worker=W --command C``."""
  return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu]
          + _where(args) + [f"--worker={worker}", "--command", command])


def remote_config(args: argparse.Namespace) -> str:
  return f"{REMOTE_DIR}/{pathlib.Path(args.config).name}"


def finetune_flags(args: argparse.Namespace) -> list[str]:
  """The ``finetune.py`` arguments of the run, as a list."""
  flags = ["--config", f"$HOME/{remote_config(args)}"]
  for name in ("checkpoint", "tokenizer", "data_dir", "output_dir"):
    value = getattr(args, name)
    if value:
      flags += ["--" + name.replace("_", "-"), value]
  return flags + list(args.finetune_args)


def _quote(arg: str) -> str:
  # $HOME must reach the remote shell unquoted to expand there.
  if arg.startswith("$HOME/"):
    return "$HOME/" + shlex.quote(arg[len("$HOME/"):])
  return shlex.quote(arg)


def commands(args: argparse.Namespace, config: Any) -> list[list[str]]:
  """Every gcloud command of the launch, in order (argv lists)."""
  workdir = args.workdir
  setup = [f"mkdir -p ~/{REMOTE_DIR}"]
  if not args.skip_setup:
    setup += [
        f"if [ ! -d {workdir}/.git ]; then git clone {shlex.quote(args.repo)} "
        f"{workdir}; fi",
        f"cd {workdir}",
        "git fetch --quiet origin",
        f"git checkout --quiet {shlex.quote(args.ref)}",
        "python3 -m venv .venv",
        ".venv/bin/pip install --quiet --upgrade pip",
        ".venv/bin/pip install --quiet -e '.[experiments]' 'jax[tpu]'",
    ]
  out = [ssh(args, "set -e; " + "; ".join(setup))]
  out.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", args.config,
              f"{args.tpu}:{remote_config(args)}"] + _where(args)
             + ["--worker=all"])
  if args.prepare_data:
    if config.source != "tfds":
      raise SystemExit(f"--prepare-data: the config reads source "
                       f"{config.source!r}, not tfds")
    # JSON string literals are Python's too, and keep the quoting simple.
    prepare = (
        "from rite_optax.data import tfds_task; "
        + "; ".join(f"tfds_task({json.dumps(config.task)}, {json.dumps(split)}"
                    f", {json.dumps(args.data_dir) if args.data_dir else None}"
                    ", download=True)"
                    for split in (config.train_split, config.eval_split)))
    out.append(ssh(args, f"cd {workdir} && .venv/bin/python -c "
                   + shlex.quote(prepare)))
  run = (f"cd {workdir} && .venv/bin/python experiments/finetune.py "
         + " ".join(_quote(f) for f in finetune_flags(args)))
  log = f"~/{REMOTE_DIR}/{pathlib.Path(args.config).stem}.log"
  if not args.foreground:
    run = f"{run} > {log} 2>&1 < /dev/null & disown; echo started, log {log}"
    run = "setsid bash -c " + shlex.quote(run)
  out.append(ssh(args, run))
  return out


def follow_command(args: argparse.Namespace) -> list[str]:
  log = f"~/{REMOTE_DIR}/{pathlib.Path(args.config).stem}.log"
  return ssh(args, f"tail -f {log}", worker="0")


# --- the dry run ------------------------------------------------------------


def scaled_mesh(spec: str, devices: int) -> str:
  """``spec`` made explicit for ``devices`` devices, keeping its layout.

  ``"auto"`` (every device on ``data``) gives ``"devices,1,1"``; fixed sizes
  that do not fit are halved, largest first, until they divide ``devices``;
  a ``-1`` takes the rest, and without one the largest axis does.
  """
  if spec == "auto":
    return f"{devices},1,1"
  sizes = [int(x) for x in spec.split(",")]
  fixed = [i for i, x in enumerate(sizes) if x != -1]

  def product():
    return math.prod(sizes[i] for i in fixed)

  while devices % product():
    i = max(fixed, key=lambda j: sizes[j])
    sizes[i] = max(1, sizes[i] // 2)
  rest = devices // product()
  if -1 in sizes:
    sizes[sizes.index(-1)] = rest
  else:
    sizes[max(range(3), key=lambda j: sizes[j])] *= rest
  return ",".join(str(x) for x in sizes)


class DryRunConfig(NamedTuple):
  config: Any          # the FinetuneConfig the dry run trains
  changes: dict        # field -> (the config's value, the dry run's)


def dry_run_config(config: Any, devices: int, output_dir: str) -> DryRunConfig:
  """The config's tiny twin: what only TPU-scale runs need is swapped out,
  the optimizer and training logic are kept (see the module docstring)."""
  finetune = _finetune()
  mesh = scaled_mesh(config.mesh, devices)
  data, fsdp, _ = finetune.mesh_sizes(mesh, devices)
  small = dict(
      model="tiny", checkpoint=None, tokenizer=None, source="mock",
      data_dir=None,
      # One padded length (the smallest bucket), so the step compiles once.
      max_len=32, max_target_len=16 if config.family == "t5" else 0,
      max_new_tokens=min(config.max_new_tokens, 8), mesh=mesh,
      # One row per (data x fsdp) shard and microbatch: the config's layout,
      # fewest rows.
      batch_size=data * fsdp * config.grad_accum_steps,
      lora_rank=min(config.lora_rank, TINY_MAX_RANK[config.family]),
      warmup_steps=min(config.warmup_steps, 1), steps=DRY_RUN_STEPS,
      eval_every=DRY_RUN_STEPS, eval_examples=4,
      checkpoint_every=DRY_RUN_STEPS, keep_checkpoints=1, resume=False,
      output_dir=output_dir)
  changes = {name: (getattr(config, name), value)
             for name, value in small.items() if getattr(config, name) != value}
  return DryRunConfig(dataclasses.replace(config, **small), changes)


class DryRunReport(NamedTuple):
  ok: bool
  config: Any                # what was trained
  changes: dict              # field -> (config's value, dry run's value)
  losses: list[float]        # train/loss at each step
  eval: dict[str, float]     # the final evaluation
  changed_factors: int       # LoRA factors that moved
  num_factors: int


def dry_run(config: Any, output_dir: Optional[str] = None) -> DryRunReport:
  """Train the tiny twin of ``config`` for two steps on the local devices."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  finetune = _finetune()
  with tempfile.TemporaryDirectory(prefix="rite_optax_dry_run_") as tmp:
    devices = max(1, min(DRY_RUN_DEVICES, jax.device_count() // 2))
    tiny = dry_run_config(config, devices,
                          output_dir or os.path.join(tmp, "run"))
    result = finetune.fit(tiny.config, keep_initial_params=True)
  losses = [float(v) for _, v in result.history.get("train/loss", [])]
  before = jax.tree.leaves(result.initial_params)
  after = jax.tree.leaves(jax.device_get(result.state.params))
  changed = sum(not np.array_equal(a, b) for a, b in zip(before, after))
  evaluation = {k: float(v[-1][1]) for k, v in result.history.items()
                if k.startswith("eval/")}
  ok = (len(losses) == DRY_RUN_STEPS and all(map(math.isfinite, losses))
        and changed > 0 and all(map(math.isfinite, evaluation.values())))
  return DryRunReport(ok, tiny.config, tiny.changes, losses, evaluation,
                      changed, len(after))


def print_report(report: DryRunReport, file=None) -> None:
  file = file or sys.stdout
  print("\ndry run: the config's tiny twin on the local CPU devices", file=file)
  for name, (was, now) in report.changes.items():
    print(f"  {name}: {was!r} -> {now!r}", file=file)
  kept = ("family", "optimizer", "hparams", "learning_rate", "schedule",
          "warmup_steps", "clip_grad_norm", "lora_rank", "lora_alpha",
          "lora_attn", "lora_mlp", "grad_accum_steps", "compute_dtype",
          "task")
  print("  kept: " + ", ".join(f"{k}={getattr(report.config, k)!r}"
                               for k in kept if k not in report.changes),
        file=file)
  print(f"  train/loss: {', '.join(f'{x:.4f}' for x in report.losses)}",
        file=file)
  print("  eval: " + ", ".join(f"{k} {v:.4f}" for k, v in report.eval.items()),
        file=file)
  print(f"  LoRA factors changed: {report.changed_factors} of "
        f"{report.num_factors}", file=file)
  print(f"dry run: {'OK' if report.ok else 'FAILED'}", file=file)


# --- the command line -------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra: list[str] = []
  if "--" in argv:
    extra = argv[argv.index("--") + 1:]
    argv = argv[:argv.index("--")]
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Flags after -- go to experiments/finetune.py.")
  parser.add_argument("--config", required=True,
                      help="a YAML/JSON FinetuneConfig file "
                      "(experiments/tpu/configs/*.yaml)")
  parser.add_argument("--tpu", default=None, help="TPU VM name")
  parser.add_argument("--zone", default=None)
  parser.add_argument("--project", default=None)
  parser.add_argument("--checkpoint", default=None,
                      help="released weights, a path on every worker")
  parser.add_argument("--tokenizer", default=None,
                      help="SentencePiece model, a path on every worker")
  parser.add_argument("--data-dir", default=None, help="TFDS data dir")
  parser.add_argument("--output-dir", default=None,
                      help="run folder; on a multi-host slice, a file system "
                      "every worker shares at the same path")
  parser.add_argument("--repo", default=None,
                      help="git URL to clone (default: this checkout's origin)")
  parser.add_argument("--ref", default=None,
                      help="commit/branch to run (default: this checkout's "
                      "HEAD, which must be pushed)")
  parser.add_argument("--workdir", default="rite_optax",
                      help="checkout folder on the workers, under their home")
  parser.add_argument("--skip-setup", action="store_true",
                      help="the workers are set up already")
  parser.add_argument("--prepare-data", action="store_true",
                      help="download and prepare the TFDS splits first")
  parser.add_argument("--foreground", action="store_true",
                      help="stream the run instead of detaching it")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the commands; train the config's tiny twin "
                      "on CPU for two steps")
  args = parser.parse_args(argv)
  args.finetune_args = extra
  if args.dry_run:
    args.tpu = args.tpu or "TPU_NAME"
    args.zone = args.zone or "ZONE"
  elif not (args.tpu and args.zone and args.checkpoint and args.tokenizer):
    parser.error("--tpu, --zone, --checkpoint and --tokenizer are required "
                 "(or --dry-run)")
  args.repo = args.repo or _git("remote", "get-url", "origin")
  args.ref = args.ref or _git("rev-parse", "HEAD") or "main"
  if not args.repo:
    if not (args.dry_run or args.skip_setup):
      parser.error("this checkout has no git remote 'origin': pass --repo")
    args.repo = "REPO_URL"
  return args


class Launch(NamedTuple):
  commands: list[list[str]]
  report: Optional[DryRunReport]


def launch(argv: Optional[Sequence[str]] = None) -> Launch:
  """What ``main`` does, returning the commands and the dry run's report."""
  args = parse_args(argv)
  if args.dry_run and "jax" not in sys.modules:
    # The dry run's devices: simulated CPU devices, set before JAX starts.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flag = f"--xla_force_host_platform_device_count={2 * DRY_RUN_DEVICES}"
    if "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                 + flag).strip()
  finetune = _finetune()
  # The config as the workers will read it, extra flags included: a bad
  # field fails here, not on the TPU.
  config = finetune.parse_config(["--config", args.config]
                                 + list(args.finetune_args))
  cmds = commands(args, config)
  if args.dry_run:
    print("dry run: the commands a launch would run")
    for command in cmds:
      print(shlex.join(command))
    print("then follow it with: " + shlex.join(follow_command(args)))
    report = dry_run(config)
    print_report(report)
    return Launch(cmds, report)
  for command in cmds:
    print("+ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)
  if not args.foreground:
    print("follow it with: " + shlex.join(follow_command(args)))
  return Launch(cmds, None)


def main(argv: Optional[Sequence[str]] = None) -> int:
  result = launch(argv)
  return 0 if result.report is None or result.report.ok else 1


if __name__ == "__main__":
  sys.exit(main())
