#!/usr/bin/env python3
"""Fetch Debian's Linux kernel and busybox and build aiovmm's Linux test initramfs.

    python3 guests/linux/build.py [--out guests/build/linux]

Idempotent (what `make setup` runs): the packages are the current candidates in the apt
repository (linux-image-amd64's dependency, busybox-static), fetched with `apt-get
download` and unpacked with `dpkg-deb -x` into the output folder (never installed: that
would put a kernel into the host's /boot). Nothing is fetched or rebuilt when the stamp
names the same package versions and the inputs (/init, inittab, profile, this script) are
unchanged.

Output (guests/build/linux/):
  vmlinuz               Debian's bzImage (CONFIG_XEN_PV=y, HVC_XEN=y)
  initramfs.cpio.gz     busybox, /init (instructions from the kernel command line), the
                        kernel's own xen-netfront and xen-blkfront modules (virtio-net and
                        virtio-pci for QEMU) and the modules they depend on (from each
                        module's .modinfo `depends=`, which is what depmod's modules.dep
                        records; the package ships no modules.dep);
                        iperf3 with its shared libraries and glibc's loader (TOOLS);
                        udpecho (udpecho.c, built with the host's gcc against that glibc),
                        gibio (gibio.c: 1 MiB reads/writes with SHA-256, for 1 GiB tests)
  kernel-release        e.g. 6.1.0-57-amd64
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ("kernel/drivers/net/xen-netfront.ko", "kernel/drivers/block/xen-blkfront.ko",
           "kernel/drivers/net/virtio_net.ko", "kernel/drivers/virtio/virtio_pci.ko")
# Debian programs the benchmarks run in the guest: package -> its binaries. Each comes with
# the shared libraries it loads (DT_NEEDED, closed over), from its lib* dependencies.
TOOLS = {"iperf3": ("usr/bin/iperf3",)}
LIBDIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
INPUTS = ("init", "inittab", "profile", "build.py", "udpecho.c", "gibio.c")


def sh(*cmd: str, cwd: Path | None = None) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=cwd).stdout


def candidate(pkg: str) -> str | None:
    out = sh("apt-cache", "policy", pkg)
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            v = line.split(":", 1)[1].strip()
            return None if v == "(none)" else v
    return None


def kernel_package() -> tuple[str, str]:
    """The linux-image-<release>-amd64 package linux-image-amd64 currently points at."""
    if candidate("linux-image-amd64") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
    for line in sh("apt-cache", "depends", "linux-image-amd64").splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            pkg = line.split(":", 1)[1].strip()
            ver = candidate(pkg)
            if ver:
                return pkg, ver
    raise SystemExit("build.py: apt knows no linux-image-amd64 (is a Debian apt source configured?)")


def fetch(pkg: str, ver: str, debs: Path, root: Path) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    for old in debs.glob(f"{pkg}_*.deb"):
        old.unlink()
    # apt-get download drops privileges to _apt when it can; a root-owned folder is fine.
    try:
        sh("apt-get", "download", "-q", f"{pkg}={ver}", cwd=debs)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"build.py: apt-get download {pkg}={ver} failed: {e.stderr.strip()}") from None
    deb = next(debs.glob(f"{pkg}_*.deb"))
    sh("dpkg-deb", "-x", str(deb), str(root))
    deb.unlink()                                  # unpacked; the .deb is not needed again


def tool_packages() -> dict[str, str]:
    """TOOLS' packages and their lib* dependencies (Depends, recursively) -> candidate version."""
    todo, seen = list(TOOLS), {}
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        ver = candidate(pkg)
        if ver is None:
            raise SystemExit(f"build.py: apt knows no {pkg}")
        seen[pkg] = ver
        for line in sh("apt-cache", "depends", pkg).splitlines():
            line = line.strip()
            if line.startswith(("Depends:", "PreDepends:")):
                dep = line.split(":", 1)[1].strip().split(":")[0]
                if dep.startswith("lib") and not dep.startswith("<"):
                    todo.append(dep)
    return seen


def elf_needed(path: Path) -> list[str]:
    out = sh("readelf", "-d", str(path))
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def tool_files(root: Path) -> dict[str, bytes]:
    """Initramfs path -> content: TOOLS' binaries, the libraries they need, the loader."""
    files: dict[str, bytes] = {}
    todo = [root / b for bins in TOOLS.values() for b in bins]
    for b in todo:
        files[str(b.relative_to(root))] = b.read_bytes()
    while todo:
        for lib in elf_needed(todo.pop()):
            if f"lib/x86_64-linux-gnu/{lib}" in files:
                continue
            found = next((root / d / lib for d in LIBDIRS if (root / d / lib).exists()), None)
            if found is None:
                raise SystemExit(f"build.py: {lib} is in none of the unpacked packages")
            files[f"lib/x86_64-linux-gnu/{lib}"] = found.resolve().read_bytes()
            todo.append(found.resolve())
    files["lib64/ld-linux-x86-64.so.2"] = (root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").resolve().read_bytes()
    return files


# -- cpio (newc) ------------------------------------------------------------------------------
class Cpio:
    """A minimal `newc` archive writer: enough for an initramfs (dirs, files, symlinks,
    character devices), with fixed mtimes so the same inputs give the same bytes."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 721

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        nm = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nm), 0)
        hdr = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self.out.write(hdr + nm)
        self.out.write(b"\0" * (-(len(hdr) + len(nm)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def modinfo_depends(ko: Path) -> list[str]:
    """A module's `depends=` from its .modinfo strings (what depmod builds modules.dep from)."""
    data = ko.read_bytes()
    i = data.find(b"\0depends=")
    if i < 0:
        return []
    val = data[i + 9:data.index(b"\0", i + 9)].decode()
    return [d for d in val.split(",") if d]


def module_closure(moddir: Path) -> list[str]:
    """xen-netfront, xen-blkfront and their dependencies, dependencies first."""
    by_name = {}
    for ko in moddir.rglob("*.ko"):
        by_name[ko.stem.replace("-", "_")] = ko.relative_to(moddir).as_posix()
    order: list[str] = []

    def visit(rel: str, stack: tuple[str, ...] = ()) -> None:
        if rel in order or rel in stack:
            return
        for dep in modinfo_depends(moddir / rel):
            if dep.replace("-", "_") not in by_name:
                raise SystemExit(f"build.py: {rel} depends on {dep}, which the package does not ship")
            visit(by_name[dep.replace("-", "_")], stack + (rel,))
        order.append(rel)

    for m in MODULES:
        visit(m)
    return order


def build_initramfs(root: Path, release: str, out: Path) -> None:
    moddir = root / "lib/modules" / release
    mods = module_closure(moddir)
    c = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc",
              "root", "www", "lib", "lib/modules", f"lib/modules/{release}", "lib/x86_64-linux-gnu", "lib64"):
        c.dir(d)
    for name, data in sorted(tool_files(root).items()):
        c.file(name, data, 0o755)
    echo = out.parent / "udpecho"
    sh("gcc", "-O2", "-o", str(echo), str(HERE / "udpecho.c"))    # glibc comes with iperf3
    c.file("usr/bin/udpecho", echo.read_bytes(), 0o755)
    gibio = out.parent / "gibio"
    sh("gcc", "-O2", "-o", str(gibio), str(HERE / "gibio.c"))
    c.file("usr/bin/gibio", gibio.read_bytes(), 0o755)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.chardev("dev/hvc0", 229, 0)
    c.file("bin/busybox", (root / "bin/busybox").read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", (HERE / "init").read_bytes(), 0o755)
    c.file("etc/inittab", (HERE / "inittab").read_bytes())
    c.file("etc/profile", (HERE / "profile").read_bytes())
    c.file("etc/aiovmm-modules", ("\n".join(mods) + "\n").encode())
    made = set()
    for rel in mods:
        parts = Path(rel).parent.parts
        for i in range(1, len(parts) + 1):
            d = f"lib/modules/{release}/" + "/".join(parts[:i])
            if d not in made:
                made.add(d)
                c.dir(d)
        c.file(f"lib/modules/{release}/{rel}", (moddir / rel).read_bytes())
    data = gzip.compress(c.finish(), compresslevel=9, mtime=0)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    print(f"build.py: {out} ({len(data)} bytes): busybox, /init, {', '.join(Path(m).name for m in mods)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE.parent / "build" / "linux"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return build(out)
    except SystemExit:
        # A stale package list names versions the mirror no longer has: refresh once.
        print("build.py: refreshing the package lists (apt-get update) and retrying", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        return build(out)


def build(out: Path) -> int:
    kpkg, kver = kernel_package()
    bver = candidate("busybox-static")
    if not bver:
        raise SystemExit("build.py: apt knows no busybox-static")
    inputs = hashlib.sha256(b"".join((HERE / f).read_bytes() for f in INPUTS)).hexdigest()
    tools = tool_packages()
    want = {"kernel": f"{kpkg}={kver}", "busybox": f"busybox-static={bver}", "inputs": inputs,
            "tools": sorted(f"{p}={v}" for p, v in tools.items())}
    stamp = out / "stamp.json"
    have = json.loads(stamp.read_text()) if stamp.exists() else {}
    root = out / "root"
    release = kpkg.removeprefix("linux-image-")
    if have.get("kernel") != want["kernel"] or not (out / "vmlinuz").exists():
        shutil.rmtree(root / "boot", ignore_errors=True)
        shutil.rmtree(root / "lib" / "modules", ignore_errors=True)
        shutil.rmtree(root / "usr" / "lib" / "modules", ignore_errors=True)
        print(f"build.py: fetching {kpkg} {kver}")
        fetch(kpkg, kver, out / "debs", root)
        # Debian 12 ships modules under lib/, later releases under usr/lib/: one path here.
        if not (root / "lib/modules" / release).exists() and (root / "usr/lib/modules" / release).exists():
            (root / "lib").mkdir(exist_ok=True)
            (root / "lib/modules").symlink_to("../usr/lib/modules")
        shutil.copyfile(root / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
        (out / "kernel-release").write_text(release + "\n")
    if have.get("busybox") != want["busybox"] or not (root / "bin/busybox").exists():
        print(f"build.py: fetching busybox-static {bver}")
        fetch("busybox-static", bver, out / "debs", root)
    if have.get("tools") != want["tools"]:
        for pkg, ver in sorted(tools.items()):
            print(f"build.py: fetching {pkg} {ver}")
            fetch(pkg, ver, out / "debs", root)
    if have != want or not (out / "initramfs.cpio.gz").exists():
        build_initramfs(root, release, out / "initramfs.cpio.gz")
        stamp.write_text(json.dumps(want, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
