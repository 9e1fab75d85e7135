"""The Colab notebooks of colab/: committed clean, and run top to bottom on CPU.

Each notebook is executed with nbclient in a kernel of this virtual
environment, with small parameters injected after its ``parameters`` cell
(papermill's convention: a cell tagged ``injected-parameters``). The kernel
inherits this process's environment, so it sees the 8 simulated CPU devices
of ``conftest.py``, as a Colab TPU runtime shows several devices.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "finetune_gemma.ipynb",
             "compare_optimizers.ipynb")
PROBE = "__NOTEBOOK_PROBE__"


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(COLAB / name, as_version=4)


def _parameters_index(nb) -> int:
  tagged = [i for i, cell in enumerate(nb.cells)
            if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', got {tagged}"
  return tagged[0]


def _inject(nb, params: dict) -> None:
  """Papermill's way: a cell of assignments right after the parameters cell."""
  cell = nbformat.v4.new_code_cell(
      "\n".join(f"{name} = {value!r}" for name, value in params.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(_parameters_index(nb) + 1, cell)


def _stream_text(cell) -> str:
  return "".join(out.get("text", "") for out in cell.get("outputs", [])
                 if out.output_type == "stream")


def _execute(name: str, params: dict, probe: str = "{}"):
  """Runs a notebook; returns it executed and the value of ``probe``.

  ``probe`` is a Python expression evaluated in the kernel at the end
  (JSON-serialisable); the kernel's interpreter and rite_optax are probed
  too.
  """
  nb = _read(name)
  _inject(nb, params)
  nb.cells.append(nbformat.v4.new_code_cell(
      "import json as _json, sys as _sys, rite_optax as _ro\n"
      f"print({PROBE!r} + _json.dumps({{'executable': _sys.executable, "
      f"'rite_optax': _ro.__file__, 'in_colab': IN_COLAB, "
      f"'value': {probe}}}))"))
  # The repository root as the working directory, as a checkout's user has it.
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # raises CellExecutionError on any cell's error
  line = next(l for l in _stream_text(nb.cells[-1]).splitlines()
              if l.startswith(PROBE))
  probed = json.loads(line[len(PROBE):])
  # The kernel is this venv's python, and it used the installed package.
  assert (pathlib.Path(probed["executable"]).resolve()
          == pathlib.Path(sys.executable).resolve())
  assert probed["in_colab"] is False
  assert pathlib.Path(probed["rite_optax"]).resolve().is_relative_to(ROOT)
  return nb, probed["value"]


def _cell_with(nb, text: str):
  (cell,) = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
  return cell


def _has_image(cell) -> bool:
  return any("image/png" in out.get("data", {}) for out in cell.outputs)


# --- committed clean --------------------------------------------------------


def test_colab_holds_the_three_notebooks():
  assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


def _git_index_version(path: pathlib.Path):
  """The staged (committed, if nothing is staged) text, or None if untracked."""
  try:
    out = subprocess.run(["git", "show", f":{path.relative_to(ROOT)}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout if out.returncode == 0 else None


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
  path = COLAB / name
  versions = {"working tree": path.read_text()}
  staged = _git_index_version(path)
  if staged is not None:
    versions["git"] = staged
  for where, text in versions.items():
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
      if cell.cell_type == "code":
        assert cell.outputs == [], f"{name} ({where}) cell {i} has outputs"
        assert cell.execution_count is None, (
            f"{name} ({where}) cell {i} has an execution count")
    _parameters_index(nb)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_installs_only_in_colab(name):
  nb = _read(name)
  code = [c for c in nb.cells if c.cell_type == "code"]
  setup = code[0]
  assert '"google.colab" in sys.modules' in setup.source
  colab_branch = setup.source.split("if IN_COLAB:")[1].split("\nelse:")[0]
  assert "pip" in colab_branch and "REPO_URL" in colab_branch
  assert "pip" not in setup.source.split("\nelse:")[1]
  for cell in code[1:]:
    assert "pip install" not in cell.source and "!pip" not in cell.source
  # The parameters come right after the setup, before anything heavy.
  assert code.index(nb.cells[_parameters_index(nb)]) == 1


# --- executed on CPU --------------------------------------------------------


def test_quickstart_runs_and_shows_the_invariance():
  nb, _ = _execute("quickstart.ipynb",
                   {"train_steps": 40, "invariance_steps": 12})
  plot = _cell_with(nb, "semilogy")
  assert _has_image(plot)
  found = re.search(r"largest drift over 12 steps: adam (\S+), lora_rite (\S+)",
                    _stream_text(plot))
  assert found, _stream_text(plot)
  adam, rite = float(found[1].rstrip(",")), float(found[2])
  assert rite < 1e-4 < 1e-2 < adam, (adam, rite)
  train = _stream_text(_cell_with(nb, "losses = ["))
  first, last = map(float, re.search(r"loss (\S+) -> (\S+) in", train).groups())
  assert last < first


def test_finetune_gemma_runs_both_optimizers_on_cpu(tmp_path):
  nb, results = _execute(
      "finetune_gemma.ipynb",
      {"steps": 8, "eval_every": 4, "eval_examples": 8, "batch_size": 8,
       "max_len": 64, "output_root": str(tmp_path)},
      probe="{'results': results, 'histories': histories, "
            "'model': model_preset, 'source': data_source}")
  assert results["model"] == "tiny" and results["source"] == "local"
  for name in ("adam", "lora_rite"):
    history = results["histories"][name]
    train = [v for _, v in history["train/loss"]]
    assert len(train) == 8 and train[-1] < train[0]
    assert [s for s, _ in history["eval/loss"]] == [4, 8]
    scores = results["results"][name]
    assert math.isfinite(scores["eval/loss"])
    assert 0.0 <= scores["eval/acc"] <= 1.0
    assert (tmp_path / f"tiny-arc_challenge-{name}" / "metrics.jsonl").exists()
  assert _has_image(_cell_with(nb, "ax_train"))
  table = _cell_with(nb, "display(Markdown(")
  markdown = "".join(out["data"].get("text/markdown", "")
                     for out in table.outputs if "data" in out)
  assert "| adam |" in markdown and "| lora_rite |" in markdown


def _fake_report(out: pathlib.Path) -> dict:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out.mkdir(parents=True)
  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  fig.savefig(out / "loss.png")
  plt.close(fig)
  report = {"markdown": "| optimizer | loss |\n|---|---|\n| fake_rite | 0.1 |",
            "figures": ["loss.png"], "command": "compare.py --fake",
            "wall_time_s": 1.0}
  (out / "report.json").write_text(json.dumps(report))
  return report


def test_compare_optimizers_shows_a_saved_report(tmp_path):
  _fake_report(tmp_path / "report")
  nb, _ = _execute("compare_optimizers.ipynb",
                   {"run_live": False, "report_dir": str(tmp_path / "report"),
                    "live_dir": str(tmp_path / "live")})
  table = _cell_with(nb, 'Markdown(report["markdown"])')
  assert "fake_rite" in table.outputs[0]["data"]["text/markdown"]
  assert _has_image(_cell_with(nb, "display(Image("))
  assert not (tmp_path / "live").exists()  # nothing ran


def _compare_micro(base_dir):
  """A micro live comparison: --quick (the notebook's default) cut to two
  optimizers, one task, a few steps, one seed, and a base pretrained for a
  few steps into ``base_dir``."""
  return ["--base-model", "mini", "--base-dir", str(base_dir),
          "--pretrain-steps", "10", "--optimizers", "adam,lora_rite",
          "--tasks", "boolq", "--steps", "4", "--warmup-steps", "1",
          "--seeds", "1", "--lrs", "3e-3", "--eval-examples", "8",
          "--acc-examples", "8"]


def test_compare_optimizers_runs_the_comparison_live(tmp_path):
  live = tmp_path / "live"
  nb, report = _execute(
      "compare_optimizers.ipynb",
      {"run_live": True, "report_dir": str(tmp_path / "absent"),
       "live_dir": str(live),
       "compare_args": _compare_micro(tmp_path / "base")},
      probe="report")
  assert (live / "report.json").exists()
  assert report["figures"] and all((live / f).exists() for f in report["figures"])
  table = _cell_with(nb, 'Markdown(report["markdown"])')
  assert table.outputs[0]["data"]["text/markdown"] == report["markdown"]
  assert _has_image(_cell_with(nb, "display(Image("))

  # The same report without its PNGs: the notebook redraws them.
  (tmp_path / "bare").mkdir()
  (tmp_path / "bare" / "report.json").write_text(
      (live / "report.json").read_text())
  nb, figures = _execute(
      "compare_optimizers.ipynb",
      {"report_dir": str(tmp_path / "bare"), "live_dir": str(tmp_path / "redraw")},
      probe="[str(p) for p in figures]")
  assert len(figures) == len(report["figures"])
  assert all(pathlib.Path(f).is_relative_to(tmp_path / "redraw") for f in figures)
  shown = _cell_with(nb, "display(Image(")
  assert sum("image/png" in out.get("data", {}) for out in shown.outputs) == len(figures)
