"""``pip install .`` into an environment that already holds torch leaves that torch alone.

A fresh virtual environment sees this test session's packages (torch included) through a ``.pth`` file, the
way a user's environment already holds its own torch build. Installing fastjepa from the checkout must not
download, upgrade or shadow torch; the console scripts must run; and ``fastjepa_kernels`` must import with
torch alone (``--no-deps`` into a second environment, no pydantic), as a timm user would use it.
"""
from __future__ import annotations

import json
import os
import site
import subprocess
import venv
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.subprocess
REPO = Path(__file__).resolve().parents[1]


def make_env(root: Path, see_packages: list[str]) -> Path:
    """A venv at ``root`` (with pip) whose interpreter also sees ``see_packages`` (read-only, after its own)."""
    venv.EnvBuilder(with_pip=True, symlinks=True).create(root)
    python = root / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    (Path(own) / "seen_packages.pth").write_text("\n".join(see_packages) + "\n")
    return python


def pip_install(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def probe(python: Path, code: str) -> dict:
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TORCH_FACTS = "import json, torch; print(json.dumps({'version': torch.__version__, 'file': torch.__file__}))"


TORCH_SITE = str(Path(torch.__file__).resolve().parents[1])  # the site-packages holding torch (and triton)


def test_pip_install_keeps_the_torch_it_finds(tmp_path):
    python = make_env(tmp_path / "env", [TORCH_SITE, *site.getsitepackages()])
    before = probe(python, TORCH_FACTS)
    assert before == {"version": torch.__version__, "file": torch.__file__}  # the environment's own torch
    result = pip_install(python, str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    after = probe(python, TORCH_FACTS)
    assert after == before, "pip replaced or shadowed the torch the environment held"
    own = tmp_path / "env" / "lib"
    assert not list(own.rglob("torch-*.dist-info")), "a second torch was installed into the environment"
    facts = probe(python, "import json, fastjepa, fastjepa.cli; print(json.dumps({'version': fastjepa.__version__}))")
    assert facts["version"] == probe(python, "import json, importlib.metadata as m; "
                                             "print(json.dumps({'v': m.version('fastjepa')}))")["v"]
    scripts = tmp_path / "env" / "bin"
    for name in ("fastjepa", "fastjepa-train", "fastjepa-convert"):
        assert (scripts / name).exists(), name
    shown = subprocess.run([str(scripts / "fastjepa"), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "train" in shown.stdout
    # the packaged presets travel with a regular (non-editable) install
    preset = probe(python, "import json; from fastjepa.config import load_config; "
                           "print(json.dumps(load_config('vith14').model.model_dump()))")
    assert preset["arch"] == "huge" and preset["patch_size"] == 14


def test_kernels_import_with_torch_alone(tmp_path):
    """``fastjepa_kernels`` imports torch (and triton for the kernels) only: neither pydantic nor fastjepa."""
    python = make_env(tmp_path / "env", [TORCH_SITE])
    result = pip_install(python, "--no-deps", str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    facts = probe(python, "import json, sys; import fastjepa_kernels as k; "
                          "from fastjepa_kernels.timm_vit import VarlenAttention; "
                          "print(json.dumps({'fastjepa': 'fastjepa' in sys.modules, "
                          "'pydantic': 'pydantic' in sys.modules, 'ops': sorted(k.__all__)}))")
    assert not facts["fastjepa"] and not facts["pydantic"]
    assert "varlen_attention" in facts["ops"] and "ema_" in facts["ops"]
