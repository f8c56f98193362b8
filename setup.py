"""Builds aiovmm's three C libraries into every wheel, sdist install and editable install.

aiovmm/_native/preempt.so (the Unicorn engine's slice/preempt hook, vcpu_engine.py),
aiovmm/_native/kvm.so (the KVM engine's helper, kvm_engine.py) and aiovmm/_native/atomic.so
(locked read-modify-writes on guest-shared memory, memory.py) are plain shared libraries
loaded with ctypes by path, not CPython extension modules: they keep the bare `<name>.so`
file name the loaders look for and are compiled with exactly these flags (the Makefile's
rules call this file, so the flags live here only). Before this step they were built only
by `make setup`, so a wheel from a fresh clone shipped neither.

No Python ABI is involved, so the wheel is tagged py3-none-<platform>: any CPython 3 on the
machine type it was compiled for.
"""
from __future__ import annotations

import os
import shlex
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O2", "-shared", "-fPIC", "-Wall"]

NATIVE = [
    Extension("aiovmm._native.preempt", ["csrc/preempt.c"], libraries=["pthread"]),
    Extension("aiovmm._native.kvm", ["csrc/kvm.c"], libraries=["rt"]),
    Extension("aiovmm._native.atomic", ["csrc/atomic.c"]),
]


class build_native(build_ext):
    """Compiles each library in one compiler call with CFLAGS (not distutils' Python-module
    flags) to `aiovmm/_native/<name>.so`."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext: Extension) -> None:
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cc = shlex.split(os.environ.get("CC", "gcc"))
        cmd = [*cc, *CFLAGS, "-o", out, *ext.sources, *(f"-l{lib}" for lib in ext.libraries)]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)

    def copy_extensions_to_source(self) -> None:
        """`--inplace` (the Makefile, editable installs): aiovmm/_native/ is not in git."""
        for ext in self.extensions:
            os.makedirs(os.path.join(HERE, *ext.name.split(".")[:-1]), exist_ok=True)
        super().copy_extensions_to_source()


cmdclass: dict[str, type] = {"build_ext": build_native}

try:  # setuptools >= 70.1 has bdist_wheel; older ones need the `wheel` package for it
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:
    try:
        from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]
    except ImportError:
        bdist_wheel = None  # type: ignore[assignment,misc]

if bdist_wheel is not None:
    class bdist_wheel_native(bdist_wheel):  # type: ignore[valid-type,misc]
        """Platform wheel, any Python 3: the libraries do not link against libpython."""

        def get_tag(self) -> tuple[str, str, str]:
            _python, _abi, plat = super().get_tag()
            return "py3", "none", plat

    cmdclass["bdist_wheel"] = bdist_wheel_native

setup(ext_modules=NATIVE, cmdclass=cmdclass)
