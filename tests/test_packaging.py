"""What `pip install aiovmm` (a wheel, not the editable install the suite runs from) ships:
every Python package of the tree, and the three C libraries (aiovmm/_native/*.so) compiled by the
build itself, not only by `make setup`. A wheel built with the old list lacked aiovmm.xenstore and
backends' block and net packages, so `import aiovmm` failed outside a source checkout."""
from __future__ import annotations

import ctypes
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _packages_in_tree() -> set[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, where in cfg["package-dir"].items():
        base = ROOT / where
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_is_listed_for_the_wheel():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    tree = _packages_in_tree()
    assert "aiovmm.xenstore" in tree and "aiovmm.backends.net" in tree
    assert tree - listed == set(), f"packages missing from pyproject.toml: {sorted(tree - listed)}"
    assert listed - tree == set(), f"listed but not in the tree: {sorted(listed - tree)}"


NATIVE = ("aiovmm/_native/preempt.so", "aiovmm/_native/kvm.so", "aiovmm/_native/atomic.so")


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None, reason="no C compiler (gcc)")
def test_wheel_from_a_clean_tree_ships_and_loads_the_c_libraries(tmp_path):
    """A wheel built from the tracked files alone (no aiovmm/_native/ from `make setup`) holds
    both libraries, is tagged for this platform, and an import of the unpacked wheel from
    outside the source tree finds and loads them (kvm_engine's layout check included)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    assert not (src / "aiovmm" / "_native").exists()
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(src)], check=True, timeout=120)
    (wheel,) = dist.glob("*.whl")
    machine = platform.machine()
    assert wheel.name.endswith(f"-py3-none-linux_{machine}.whl"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert set(NATIVE) <= names, f"missing from {wheel.name}: {set(NATIVE) - names}"
        meta = zf.read("aiovmm-0.1.0.dist-info/WHEEL").decode()
        assert "Root-Is-Purelib: false" in meta
        unpacked = tmp_path / "site"
        zf.extractall(unpacked)
    assert ctypes.CDLL(str(unpacked / NATIVE[0])).aiovmm_insn_hook
    assert ctypes.CDLL(str(unpacked / NATIVE[1])).aiovmm_kvm_run
    assert ctypes.CDLL(str(unpacked / NATIVE[2])).aiovmm_atomic_cmpxchg32
    probe = ("import aiovmm.vcpu_engine as v, aiovmm.kvm_engine as k, aiovmm.memory as m\n"
             "v._native(); k._native()\n"
             "print(v._NATIVE); print(k._NATIVE); print(m._ATOMIC_SO)")
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout.split()
    assert out == [str(unpacked / n) for n in NATIVE]
