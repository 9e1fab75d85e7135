"""experiments/tpu: the paper's configs, the launch script and its dry run."""

import dataclasses
import math
import pathlib
import re
import shlex

import pytest

import launch
from rite_optax.train import finetune

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "experiments" / "tpu" / "configs"
TASKS = ("natural_instructions", "hellaswag", "arc_challenge", "gsm8k",
         "openbookqa")
# The paper's runs (its abstract): Gemma 2B and 7B on Super-Natural
# Instructions and the four benchmarks, and mT5-XXL. name -> (family, model,
# task).
ROWS = {f"gemma_{size}_{task}": ("gemma", f"gemma_{size}", task)
        for size in ("2b", "7b") for task in TASKS}
ROWS["mt5_xxl_natural_instructions"] = ("t5", "mt5_xxl", "natural_instructions")
# The values every config states, and the source its comment must give.
STATED = {"lora_rank": (16, "[R]"), "batch_size": (64, "[R]"),
          "lora_alpha": (16.0, "[R]"), "optimizer": ("lora_rite", "[P]"),
          "model": (None, "[P]"), "family": (None, "[P]")}
SOURCE = re.compile(r"#\s*(\[P\]|\[R\]|ours)")


def _config_path(name):
  return CONFIGS / f"{name}.yaml"


def _key_lines(path):
  return {line.split(":", 1)[0]: line for line in path.read_text().splitlines()
          if line and not line.startswith("#")}


def test_there_is_one_config_per_run_of_the_paper():
  assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(ROWS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_config_is_a_finetune_config_with_the_stated_values(name):
  path = _config_path(name)
  config = finetune.parse_config(["--config", str(path)])
  family, model, task = ROWS[name]
  assert (config.family, config.model, config.task) == (family, model, task)
  lines = _key_lines(path)
  assert set(lines) <= {f.name for f in dataclasses.fields(config)}
  for key, line in lines.items():
    assert SOURCE.search(line), f"{name}: {key} does not say its source"
  for key, (value, source) in STATED.items():
    if value is not None:
      assert getattr(config, key) == value, (name, key)
    assert SOURCE.search(lines[key]).group(1) == source, (name, key)
  # The task is the paper's for Gemma; mT5-XXL's is not in what we could read.
  assert SOURCE.search(lines["task"]).group(1) == (
      "[P]" if family == "gemma" else "ours")
  # The global batch splits over every slice up to 64 chips.
  for chips in (1, 4, 8, 16, 32, 64):
    data, fsdp, _ = finetune.mesh_sizes(config.mesh, chips)
    assert config.batch_size % (data * fsdp * config.grad_accum_steps) == 0
  assert 0 < config.warmup_steps < config.steps
  assert config.eval_every <= config.steps
  assert config.compute_dtype == "bfloat16" and config.source == "tfds"


def test_an_unknown_or_mistyped_field_is_refused_naming_it(tmp_path):
  text = _config_path("gemma_2b_gsm8k").read_text()
  unknown = tmp_path / "unknown.yaml"
  unknown.write_text(text + "lora_rnak: 8\n")
  with pytest.raises(ValueError, match=r"unknown FinetuneConfig field\(s\) "
                     r"'lora_rnak'"):
    finetune.parse_config(["--config", str(unknown)])
  with pytest.raises(ValueError, match="lora_rnak"):  # before any command
    launch.launch(["--dry-run", "--config", str(unknown)])
  mistyped = tmp_path / "mistyped.yaml"
  mistyped.write_text(text.replace("batch_size: 64", "batch_size: sixty"))
  with pytest.raises(ValueError, match="field 'batch_size' must be an "
                     "integer, got 'sixty'"):
    finetune.parse_config(["--config", str(mistyped)])


def test_flags_override_the_config_file_and_the_file_the_preset():
  config = finetune.parse_config(
      ["--preset", "gemma_2b_sni", "--config",
       str(_config_path("gemma_2b_hellaswag")), "--steps", "7"])
  assert (config.task, config.schedule, config.steps) == (
      "hellaswag", "linear", 7)


def test_the_dry_run_scales_mesh_and_batch_and_keeps_the_training_settings():
  assert launch.scaled_mesh("auto", 4) == "4,1,1"
  assert launch.scaled_mesh("1,-1,1", 4) == "1,4,1"
  assert launch.scaled_mesh("4,4,2", 8) == "2,2,2"
  assert launch.scaled_mesh("4,4,2", 4) == "1,2,2"
  assert launch.scaled_mesh("2,1,1", 4) == "4,1,1"
  config = finetune.parse_config(
      ["--config", str(_config_path("gemma_7b_gsm8k")),
       "--grad-accum-steps", "2"])
  tiny = launch.dry_run_config(config, 4, "/tmp/x").config
  assert tiny.mesh == "1,4,1"  # still FSDP
  assert tiny.batch_size == 8  # one row per shard and microbatch
  for field in ("family", "optimizer", "hparams", "learning_rate", "schedule",
                "clip_grad_norm", "lora_rank", "lora_alpha", "lora_attn",
                "lora_mlp", "grad_accum_steps", "compute_dtype", "task"):
    assert getattr(tiny, field) == getattr(config, field), field
  assert (tiny.model, tiny.source, tiny.checkpoint, tiny.steps) == (
      "tiny", "mock", None, 2)


def _no_gcloud(monkeypatch):
  real = launch.subprocess.run

  def run(command, *args, **kwargs):
    assert command[0] != "gcloud", f"a dry run ran {command}"
    return real(command, *args, **kwargs)

  monkeypatch.setattr(launch.subprocess, "run", run)


def _check_report(report, config):
  assert report.ok
  assert len(report.losses) == 2 and all(map(math.isfinite, report.losses))
  assert 0 < report.changed_factors <= report.num_factors
  assert report.eval and all(map(math.isfinite, report.eval.values()))
  for field in ("optimizer", "learning_rate", "schedule", "lora_rank",
                "family", "task", "compute_dtype"):
    assert getattr(report.config, field) == getattr(config, field), field
  assert (report.config.model, report.config.source) == ("tiny", "mock")


def test_the_launch_dry_run_prints_the_commands_and_trains_a_gemma_config(
    capsys, monkeypatch):
  _no_gcloud(monkeypatch)
  path = _config_path("gemma_2b_hellaswag")
  result = launch.launch(
      ["--dry-run", "--tpu", "my-tpu", "--zone", "us-central2-b", "--config",
       str(path), "--checkpoint", "/ckpt/gemma-2b", "--tokenizer",
       "/ckpt/tokenizer.model", "--", "--learning-rate", "1e-3"])
  out = capsys.readouterr().out
  printed = [shlex.split(line) for line in out.splitlines()
             if line.startswith("gcloud compute tpus tpu-vm")]
  assert printed == result.commands and len(printed) == 3
  for command in printed:
    assert command[4] in ("ssh", "scp") and "--worker=all" in command
    assert command[command.index("--zone") + 1] == "us-central2-b"
  setup, copy, run = printed
  assert "pip install --quiet -e '.[experiments]' 'jax[tpu]'" in setup[-1]
  assert copy[5:7] == [str(path), "my-tpu:rite_optax_launch/"
                       "gemma_2b_hellaswag.yaml"]
  assert ("experiments/finetune.py --config "
          "$HOME/rite_optax_launch/gemma_2b_hellaswag.yaml --checkpoint "
          "/ckpt/gemma-2b --tokenizer /ckpt/tokenizer.model --learning-rate "
          "1e-3") in run[-1]
  assert "dry run: OK" in out
  config = finetune.parse_config(["--config", str(path), "--learning-rate",
                                  "1e-3"])
  _check_report(result.report, config)
  assert result.report.config.learning_rate == 1e-3  # the extra flag


def test_the_mt5_config_dry_run_trains_two_steps(monkeypatch):
  _no_gcloud(monkeypatch)
  config = finetune.parse_config(
      ["--config", str(_config_path("mt5_xxl_natural_instructions"))])
  report = launch.dry_run(config)
  _check_report(report, config)
  assert report.config.family == "t5" and report.config.max_target_len == 16
  assert set(report.eval) == {"eval/loss", "eval/exact_match", "eval/rouge_l"}


def test_a_launch_runs_setup_copy_and_job_on_all_workers(monkeypatch, capsys):
  ran = []
  monkeypatch.setattr(launch.subprocess, "run",
                      lambda command, **kwargs: ran.append(command))
  assert launch.main(
      ["--tpu", "pod", "--zone", "europe-west4-a", "--project", "p", "--config",
       str(_config_path("mt5_xxl_natural_instructions")), "--checkpoint",
       "/ckpt/mt5-xxl", "--tokenizer", "/ckpt/spiece.model", "--repo",
       "https://example.com/rite_optax.git", "--ref", "abc123",
       "--output-dir", "/mnt/runs/mt5"]) == 0
  assert [c[4] for c in ran] == ["ssh", "scp", "ssh"]
  assert all("--worker=all" in c and c[c.index("--project") + 1] == "p"
             for c in ran)
  assert "git checkout --quiet abc123" in ran[0][-1]
  assert "git clone https://example.com/rite_optax.git rite_optax" in ran[0][-1]
  assert ran[2][-1].startswith("setsid bash -c ")  # detached from the ssh
  assert "--output-dir /mnt/runs/mt5" in ran[2][-1]
  assert "--worker=0" in capsys.readouterr().out  # how to follow the log
