"""Shared fixtures for the aiovmm test suite.

Everything here runs real guests on the real hypervisor: nothing is mocked.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from aiovmm import Hypervisor
from aiovmm.backends.block.lvm import device_mapper_present

ROOT = Path(__file__).resolve().parents[1]
GUESTS_DIR = ROOT / "guests"
BUILD = GUESTS_DIR / "build"

# Machine memory for hypervisors created by tests: small enough to be cheap to set up,
# large enough for ten 8 MiB guests at once.
HV_MEMORY_MIB = 256

_REQUIRED = ["kernel.elf"] + [f"tests/{n}.elf" for n in
                              ("hello", "hcall_errors", "traps", "unhandled_pf", "privops", "pv_hcalls",
                               "fault_in_handler", "trap_after_event", "fault_storm", "last_words")]


def kernel() -> str:
    return str(BUILD / "kernel.elf")


def guest(name: str) -> str:
    """Path of guests/build/tests/<name>.elf."""
    return str(BUILD / "tests" / f"{name}.elf")


@pytest.fixture(scope="session", autouse=True)
def guests_built() -> Path:
    """Build the guests once per session if any of them is missing."""
    if not all((BUILD / p).exists() for p in _REQUIRED):
        subprocess.run(["make", "-C", str(GUESTS_DIR)], check=True,
                       stdout=subprocess.DEVNULL)
    missing = [p for p in _REQUIRED if not (BUILD / p).exists()]
    assert not missing, f"make -C guests did not produce {missing}"
    return BUILD


def _kvm_skip_reason() -> str | None:
    from aiovmm.kvm_engine import unavailable_reason
    why = unavailable_reason()
    return f"KVM engine unavailable: {why}" if why else None


# vCPU engines a module runs its guests on: `pytestmark = ENGINES` parametrizes the module's
# `engine` fixture (and so `hv`, and the boot helpers given engine=engine) over both; the
# KVM half is skipped with the reason where /dev/kvm is absent or unusable.
ENGINE_PARAMS = ["unicorn", pytest.param("kvm", marks=pytest.mark.skipif(
    _kvm_skip_reason() is not None, reason=_kvm_skip_reason() or ""))]
ENGINES = pytest.mark.parametrize("engine", ENGINE_PARAMS, indirect=True, scope="module")


def pytest_generate_tests(metafunc) -> None:
    """A module with `ALL_ENGINES = True` runs every test that boots guests (uses `engine`,
    directly or through `hv`) on each engine; its other tests run once."""
    if getattr(metafunc.module, "ALL_ENGINES", False) and "engine" in metafunc.fixturenames:
        metafunc.parametrize("engine", ENGINE_PARAMS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def engine(request) -> str:
    """The vCPU engine of this test's guests ("unicorn" unless the module uses ENGINES)."""
    return getattr(request, "param", "unicorn")


@pytest.fixture
async def hv(engine):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as h:
        yield h


@dataclass
class Boot:
    """What one guest run produced."""
    lines: list[str]
    reason: object
    crash_reason: str
    end: str


async def boot_async(path: str, *, memory_mib: int = 8, cmdline: str = "",
                     timeout: float = 60.0, engine: str = "unicorn") -> Boot:
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as h:
        dom = await h.create(path, memory_mib=memory_mib, cmdline=cmdline)
        async with asyncio.timeout(timeout):
            reason = await dom.wait()
        return Boot(list(dom.console_lines), reason, dom.crash_reason, dom.describe_end())


def boot(path: str, **kw) -> Boot:
    """Boot one guest to completion in a fresh event loop (for module-scoped sync fixtures)."""
    return asyncio.run(boot_async(path, **kw))


def results(lines: list[str]) -> dict[str, str]:
    """`result <key> <rest>` lines -> {key: rest}; a duplicate key is an error."""
    out: dict[str, str] = {}
    for line in lines:
        m = re.fullmatch(r"result (\S+) ?(.*)", line)
        if m:
            assert m.group(1) not in out, f"duplicate result line for {m.group(1)}: {line!r}"
            out[m.group(1)] = m.group(2)
    return out


def uncontended_time() -> float:
    """Seconds on a clock that runs with wall time except while this thread was runnable
    but waiting for a CPU (/proc/thread-self/schedstat's run delay): what a bound on how long
    the hypervisor takes should count. On a host at load 10-18 the event loop's thread
    waited for a core 93 % of the time (10,000 grant round trips: 2 s of CPU in 30 s of
    wall); an idle host leaves this clock at wall speed, so a hang still times out. Read on
    the thread it is about (the event loop's, for `within`). Plain wall time where the
    kernel keeps no schedstats."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            waited_ns = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        waited_ns = 0
    return time.monotonic() - waited_ns / 1e9


async def within(aw, timeout: float):
    """`aw`'s result, or TimeoutError once `timeout` seconds of uncontended_time() passed
    (asyncio.wait_for on a clock the host's load does not advance)."""
    fut = asyncio.ensure_future(aw)
    start = uncontended_time()
    try:
        while not fut.done():
            left = timeout - (uncontended_time() - start)
            if left <= 0:
                raise TimeoutError(f"not done in {timeout} s of uncontended time")
            await asyncio.wait({fut}, timeout=left)
        return fut.result()
    finally:
        if not fut.done():
            fut.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fut


def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "aiovmm"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "aiovmm.cli"]


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `aiovmm ARGS...` as a subprocess; text stdout/stderr captured."""
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(_cli_command() + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture
def cli():
    return run_cli


def elf_symbols(path: str) -> dict[str, int]:
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        return {s.name: s["st_value"] for s in symtab.iter_symbols() if s.name}


def probe_sites(path: str) -> dict[str, tuple[int, int]]:
    """{'div0': (insn_va, next_va), ...} from the guest's .probes table (probes.S)."""
    import struct as _struct
    from elftools.elf.elffile import ELFFile
    syms = elf_symbols(path)
    start, end = syms["__probes_start"], syms["__probes_end"]
    with open(path, "rb") as f:
        elf = ELFFile(f)
        raw = b""
        for sec in elf.iter_sections():
            a, n = sec["sh_addr"], sec["sh_size"]
            if a and a <= start and end <= a + n and sec["sh_type"] != "SHT_NOBITS":
                raw = sec.data()[start - a:end - a]
                break
    pairs = sorted(_struct.iter_unpack("<QQ", raw))
    assert pairs, f"no probe table in {path}"
    out = {}
    for name, va in syms.items():
        if name.startswith("probe_") and name != "probe_insn_len":
            after = [p for p in pairs if p[0] >= va]
            if after:
                out[name[len("probe_"):]] = after[0]
    return out


@pytest.fixture
def sock_dir(tmp_path: Path):
    """A directory for unix sockets: tmp_path, unless it is too long for the 108-byte limit
    of a socket path."""
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="av", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ LVM on a loop device
LVM_CONFIG = "global { activation = 0 }"      # the host's own LVM leaves the test VGs alone


def host_run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """A host tool (losetup, lvm2, blockdev), output captured as text."""
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, env=env)


def attach_loop(backing: str | Path) -> str:
    """`losetup --find --show`: the new loop device's path (the test skipped if none)."""
    r = host_run("losetup", "--find", "--show", str(backing), check=False)
    if r.returncode:
        pytest.skip(f"cannot attach a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    # A read-only flag (blockdev --setro) outlives a detach: a run killed before its teardown
    # leaves the next user of the same loop number read-only. A new device starts writable.
    host_run("blockdev", "--setrw", dev, check=False)
    return dev


@dataclass
class LoopVG:
    """A volume group on one loop device (4 MiB extents); its PV's data starts at pe_start."""
    vg: str
    dev: str
    backing: str
    pe_start: int
    extent: int = 4 << 20


@contextlib.contextmanager
def lvm_on_loop(directory: Path, vg_prefix: str, size_mib: int,
                lvs: list[tuple[str, str]]) -> Iterator[LoopVG]:
    """A VG (unique name `vg_prefix` + 8 hex digits) on a loop device over a sparse file in
    `directory`, with the LVs `lvs` = [(name, size), ...] made in order: a name seen again is
    extended to the new size (its extents then lie in two segments). The LVs are activated
    where device-mapper exists (blkback does not need it). Everything is removed on exit, also
    on failure."""
    for tool in ("losetup", "vgcreate"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make setup)")
    backing = Path(directory) / f"{vg_prefix}-{uuid.uuid4().hex[:8]}-pv.img"
    with open(backing, "wb") as f:
        f.truncate(size_mib << 20)
    dev = attach_loop(backing)
    vg = f"{vg_prefix}{uuid.uuid4().hex[:8]}"
    cfg = ["--config", LVM_CONFIG]
    created_pv = created_vg = False
    dm_present = device_mapper_present()
    try:
        host_run("pvcreate", "-q", *cfg, dev)
        created_pv = True
        host_run("vgcreate", "-q", *cfg, "-s", "4M", vg, dev)
        created_vg = True
        made: list[str] = []
        for name, size in lvs:
            if name in made:
                host_run("lvextend", "-q", *cfg, "-L", size, f"{vg}/{name}")
            else:
                host_run("lvcreate", "-q", *cfg, "-an", "-Zn", "-L", size, "-n", name, vg)
                made.append(name)
        pe_start = int(host_run("pvs", *cfg, "--noheadings", "--units", "b", "--nosuffix", "-o",
                                "pe_start", dev).stdout.strip())
        if dm_present:
            for name in made:
                host_run("lvchange", "-q", "-ay", f"{vg}/{name}")
        yield LoopVG(vg, dev, str(backing), pe_start)
    finally:
        if created_vg:
            if dm_present:
                host_run("vgchange", "-q", "-an", vg, check=False)
            host_run("vgremove", "-q", "-f", *cfg, vg, check=False)
        if created_pv:
            host_run("pvremove", "-q", "-ff", "-y", *cfg, dev, check=False)
        host_run("blockdev", "--setrw", dev, check=False)
        host_run("losetup", "-d", dev, check=False)
