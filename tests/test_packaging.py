"""The wheel built from the repository carries every module, every preset (the presets live
at the top level, `presets/`, and install as `ds2d2_cli/presets/`) and the demo teacher."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("ds2d2-*.whl")
    return found


@pytest.mark.slow
def test_wheel_holds_every_module_and_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ds2d2_cli").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    presets = {f"ds2d2_cli/presets/{p.name}" for p in (ROOT / "presets").glob("*.yaml")}
    assert len(presets) >= 6 and presets <= names, sorted(presets - names)
    assert {"ds2d2_cli/assets/demo_teacher.safetensors", "ds2d2_cli/assets/demo_teacher.json"} <= names


@pytest.mark.slow
def test_wheel_declares_its_license_and_carries_the_text(wheel):
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    (text,) = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert archive.read(text) == (ROOT / "LICENSE").read_bytes()


@pytest.mark.slow
def test_installed_wheel_finds_every_preset_and_the_demo_teacher(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    shipped = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import ds2d2_cli\n"
        "from ds2d2_cli.config import available_presets, load_config, presets_folder\n"
        "assert ds2d2_cli.__file__.startswith(sys.argv[1]), ds2d2_cli.__file__\n"
        "assert str(presets_folder()).startswith(sys.argv[1]), presets_folder()\n"
        "from ds2d2_cli.demo import shipped_teacher, shipped_teacher_record\n"
        "assert str(shipped_teacher()).startswith(sys.argv[1]) and shipped_teacher_record()['iterations'] > 0\n"
        "print(','.join(available_presets())); [load_config(n) for n in available_presets()]\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(",") == shipped
