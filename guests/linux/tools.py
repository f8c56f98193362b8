#!/usr/bin/env python3
"""Debian's benchmark tools for the Linux guests, as a second initramfs archive.

    python3 guests/linux/tools.py [--out guests/build/linux]

The kernel unpacks concatenated cpio archives in order, so `initramfs.cpio.gz` + `tools.cpio.gz`
(`initramfs-tools.cpio.gz`, written here too) is the test initramfs plus:
  - the programs of PACKAGES (fio) with every shared library they load: the ELF NEEDED
    closure, each soname found in the fetched packages or, for libraries the host has
    installed from the same Debian release, on the host; and the dynamic loader;
  - the virtio modules a QEMU guest needs for its disk and network (virtio_blk, virtio_net,
    virtio_pci and what they depend on), listed in /etc/aiovmm-virtio-modules (the test
    /init loads only the Xen frontends; a script loads these when not on Xen).
Kept apart from the base initramfs so the ordinary Linux boots stay small: fio alone pulls
~30 MB of libraries (its rbd, gluster and rdma engines are linked in).

Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`, never
installed; nothing is fetched again while the stamp names the same versions.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build  # noqa: E402  (the base initramfs builder: apt helpers, Cpio, modinfo)

# Debian package -> the programs of it that go into the archive (path inside the package).
PACKAGES = {"fio": ["usr/bin/fio"]}
VIRTIO_MODULES = ("kernel/drivers/block/virtio_blk.ko", "kernel/drivers/net/virtio_net.ko",
                  "kernel/drivers/virtio/virtio_pci.ko")
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/ceph")
LOADER = "lib64/ld-linux-x86-64.so.2"


def needed(elf: Path) -> list[str]:
    out = build.sh("readelf", "-d", str(elf))
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def host_installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip().endswith("installed")


def lib_depends(pkg: str) -> list[str]:
    """`Depends:` of a package that are libraries (what the loader may need)."""
    out = build.sh("apt-cache", "depends", pkg)
    deps = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].strip().strip("<>")
            if name.startswith(("lib", "zlib")):
                deps.append(name.split(":")[0])
    return deps


def fetch_closure(root: Path, debs: Path) -> dict[str, str]:
    """Fetch PACKAGES and, recursively, the library packages they depend on that the host
    does not have installed. Returns {package: version}."""
    todo = list(PACKAGES)
    seen: dict[str, str] = {}
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        ver = build.candidate(pkg)
        if ver is None:
            raise SystemExit(f"tools.py: apt knows no {pkg}")
        seen[pkg] = ver
        if pkg not in PACKAGES and host_installed(pkg):
            continue                     # the host's copy is the same release's
        build.fetch(pkg, ver, debs, root)
        todo.extend(d for d in lib_depends(pkg) if d not in seen)
    return seen


def resolve(soname: str, root: Path) -> Path:
    for base in (root, Path("/")):
        for d in LIB_DIRS:
            p = base / d / soname
            if p.exists():
                return p
    raise SystemExit(f"tools.py: no {soname} in the fetched packages or on the host")


def build_tools(root: Path, release: str, moddir: Path, out: Path) -> None:
    c = build.Cpio()
    for d in ("lib", "lib64", "lib/x86_64-linux-gnu", "usr", "usr/bin", "etc"):
        c.dir(d)
    libs: dict[str, Path] = {}
    todo: list[Path] = []
    for pkg, progs in PACKAGES.items():
        for prog in progs:
            c.file(prog, (root / prog).read_bytes(), 0o755)
            todo.append(root / prog)
    while todo:
        for so in needed(todo.pop()):
            if so not in libs and so != Path(LOADER).name:
                libs[so] = resolve(so, root)
                todo.append(libs[so])
    for so, path in sorted(libs.items()):
        c.file(f"lib/x86_64-linux-gnu/{so}", path.resolve().read_bytes(), 0o755)
    c.file(LOADER, Path("/" + LOADER).resolve().read_bytes(), 0o755)
    # The virtio modules and their dependencies, dependencies first (as build.module_closure).
    by_name = {ko.stem.replace("-", "_"): ko.relative_to(moddir).as_posix() for ko in moddir.rglob("*.ko")}
    order: list[str] = []

    def visit(rel: str) -> None:
        if rel in order:
            return
        for dep in build.modinfo_depends(moddir / rel):
            visit(by_name[dep.replace("-", "_")])
        order.append(rel)

    for m in VIRTIO_MODULES:
        visit(m)
    made = set()
    for rel in order:
        parts = ("lib", "modules", release) + Path(rel).parent.parts
        for i in range(2, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                c.dir(d)
        c.file(f"lib/modules/{release}/{rel}", (moddir / rel).read_bytes())
    c.file("etc/aiovmm-virtio-modules", ("\n".join(order) + "\n").encode())
    data = gzip.compress(c.finish(), compresslevel=6, mtime=0)
    out.write_bytes(data)
    print(f"tools.py: {out} ({len(data)} bytes): {', '.join(PACKAGES)}, {len(libs)} libraries, "
          f"{len(order)} virtio modules")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE.parent / "build" / "linux"))
    args = ap.parse_args()
    out = Path(args.out)
    base = out / "initramfs.cpio.gz"
    if not base.exists():
        build.main.__globals__["sys"].argv = [sys.argv[0], "--out", str(out)]
        build.main()
    release = (out / "kernel-release").read_text().strip()
    moddir = out / "root" / "lib" / "modules" / release
    troot = out / "tools-root"
    want = {"packages": {p: build.candidate(p) for p in PACKAGES}, "release": release,
            "inputs": hashlib.sha256((HERE / "tools.py").read_bytes()).hexdigest(),
            "base": hashlib.sha256(base.read_bytes()).hexdigest()}
    stamp = out / "tools-stamp.json"
    have = json.loads(stamp.read_text()) if stamp.exists() else {}
    tools = out / "tools.cpio.gz"
    if have != want or not tools.exists():
        if have.get("packages") != want["packages"] or not troot.exists():
            shutil.rmtree(troot, ignore_errors=True)
            fetch_closure(troot, out / "debs")
        build_tools(troot, release, moddir, tools)
        (out / "initramfs-tools.cpio.gz").write_bytes(base.read_bytes() + tools.read_bytes())
        stamp.write_text(json.dumps(want, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
