"""The package stands on its own: a wheel carries the task data it reads.

Builds the wheel from the package's own files, installs it into a fresh
virtual environment outside the repository, and loads every local task from
there, so a run that read the repository checkout (or anything beside it)
instead of the installed package data would fail.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

from rite_optax.data import tasks

ROOT = pathlib.Path(__file__).parents[1]


def _run(*args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def test_wheel_in_fresh_venv_loads_every_local_task(tmp_path):
  # Only what the wheel is built from, so nothing else of the checkout can
  # leak into it.
  source = tmp_path / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  shutil.copytree(ROOT / "rite_optax", source / "rite_optax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  wheels = tmp_path / "wheels"
  _run(sys.executable, "-m", "pip", "wheel", "--no-deps",
       "--no-build-isolation", "-q", "-w", str(wheels), str(source))
  (wheel,) = wheels.glob("rite_optax-*.whl")

  venv = tmp_path / "venv"
  _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
  python = venv / "bin" / "python"
  _run(sys.executable, "-m", "pip", "--python", str(python), "install",
       "--no-deps", "-q", str(wheel))
  # The dependencies (jax, numpy, ...) come from this venv's site-packages
  # as a plain path entry: its .pth files, the editable install of the
  # checkout among them, are not processed there.
  venv_site = pathlib.Path(_run(
      str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
      "['purelib'])").strip())
  (venv_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

  expected = {f"{task}/{split}": len(tasks.load_local_task(task, split))
              for task, split in tasks.LOCAL_FILES}
  script = (
      "import json, rite_optax\n"
      "from rite_optax.data import tasks\n"
      "print(json.dumps({'file': rite_optax.__file__,\n"
      "  'dir': str(tasks.default_local_dir()),\n"
      "  'counts': {f'{t}/{s}': len(tasks.load_local_task(t, s))\n"
      "             for t, s in tasks.LOCAL_FILES}}))\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "RITE_OPTAX_LLM_ADAPTERS")}
  env["JAX_PLATFORMS"] = "cpu"
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  report = json.loads(_run(str(python), "-c", script, cwd=outside,
                           env=env).strip().splitlines()[-1])
  assert pathlib.Path(report["file"]).is_relative_to(venv), report["file"]
  assert pathlib.Path(report["dir"]).is_relative_to(venv), report["dir"]
  assert report["counts"] == expected
  assert all(expected.values())
