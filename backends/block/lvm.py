"""LVM logical volumes as vbd targets, with or without device-mapper.

With device-mapper (an activated LV), /dev/<vg>/<lv> is an ordinary block device and is
opened as such. Without it (this project's development kernels have no device-mapper driver,
so no LV can ever be activated), the LV is served directly from its physical volume: lvm2
still reads and writes the metadata, and reports where each segment of the LV lives:

    lvs --reportformat json --units b --config 'global { activation = 0 }' \
        -o lv_name,vg_name,seg_start,seg_size,seg_pe_ranges,segtype,vg_extent_size VG/LV
    pvs --reportformat json --units b --config 'global { activation = 0 }' -o pv_name,pe_start

Physical extent k of a PV starts at pe_start + k * extent_size bytes; a linear segment
"/dev/loop3:4-5" is extents 4..5 of that PV. We accept linear segments (and striped ones with
a single stripe) that all live on one PV, and map the LV's byte ranges onto it (io.Extent).
Anything else (mirrors, raid, thin, several PVs) is refused with a clear error.

lvm2 is called through asyncio subprocesses (never blocking the loop).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess

from .io import Extent

LVM_CONFIG = "global { activation = 0 }"
_RANGE = re.compile(r"^(?P<dev>/\S+):(?P<a>\d+)-(?P<b>\d+)$")


class LvmError(Exception):
    pass


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["LVM_SUPPRESS_FD_WARNINGS"] = "1"
    env.setdefault("LC_ALL", "C")
    return env


async def lvm(*args: str, check: bool = True) -> str:
    """Run one lvm2 command (asynchronously); its stdout."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "lvm", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env=_env())
    except FileNotFoundError:
        raise LvmError("lvm2 is not installed (no `lvm` command)") from None
    out, err = await proc.communicate()
    if check and proc.returncode:
        msg = " ".join(l.strip() for l in err.decode(errors="replace").splitlines()
                       if "WARNING: Activation disabled" not in l)
        raise LvmError(f"lvm {args[0]} failed ({proc.returncode}): {msg}")
    return out.decode()


def _bytes(v: str) -> int:
    v = v.strip()
    if v.endswith("B"):
        v = v[:-1]
    return int(v)


def _report(text: str, kind: str) -> list[dict]:
    try:
        data = json.loads(text)
        rows = []
        for rep in data["report"]:
            rows.extend(rep.get(kind, []))
        return rows
    except (ValueError, KeyError, TypeError) as e:
        raise LvmError(f"unexpected lvm JSON: {e}") from None


def split_lv_path(target: str) -> tuple[str, str] | None:
    """'/dev/VG/LV' or '/dev/mapper/VG-LV' (dashes doubled) or 'VG/LV' -> (VG, LV)."""
    m = re.fullmatch(r"/dev/mapper/((?:[^-]|--)+)-((?:[^-]|--)+)", target)
    if m:
        return m.group(1).replace("--", "-"), m.group(2).replace("--", "-")
    m = re.fullmatch(r"(?:/dev/)?([A-Za-z0-9+_.][A-Za-z0-9+_.-]*)/([A-Za-z0-9+_.][A-Za-z0-9+_.-]*)", target)
    if m and m.group(1) not in ("dev", "mapper"):
        return m.group(1), m.group(2)
    return None


async def lv_extents(vg: str, lv: str) -> tuple[str, list[Extent], int]:
    """(pv_path, extents, lv_size_bytes) of a linear LV on one PV."""
    out = await lvm("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "--config", LVM_CONFIG,
                    "-o", "lv_name,vg_name,seg_start,seg_size,seg_pe_ranges,segtype,vg_extent_size,lv_size",
                    f"{vg}/{lv}")
    segs = _report(out, "lv")
    if not segs:
        raise LvmError(f"no logical volume {vg}/{lv}")
    pv_path = None
    extents: list[Extent] = []
    ext_size = _bytes(segs[0]["vg_extent_size"])
    lv_size = _bytes(segs[0]["lv_size"])
    parsed = []
    for s in segs:
        if s["segtype"] not in ("linear", "striped"):
            raise LvmError(f"{vg}/{lv}: segment type {s['segtype']!r} is not supported without device-mapper")
        ranges = s["seg_pe_ranges"].split()
        if len(ranges) != 1:
            raise LvmError(f"{vg}/{lv}: striped/mirrored segments are not supported without device-mapper")
        m = _RANGE.match(ranges[0])
        if not m:
            raise LvmError(f"{vg}/{lv}: cannot parse segment {ranges[0]!r}")
        if pv_path is None:
            pv_path = m.group("dev")
        elif pv_path != m.group("dev"):
            raise LvmError(f"{vg}/{lv}: spans several PVs ({pv_path}, {m.group('dev')})")
        parsed.append((_bytes(s["seg_start"]), _bytes(s["seg_size"]), int(m.group("a")), int(m.group("b"))))
    out = await lvm("pvs", "--reportformat", "json", "--units", "b", "--nosuffix", "--config", LVM_CONFIG,
                    "-o", "pv_name,pe_start", pv_path)
    pvs = [p for p in _report(out, "pv") if p["pv_name"] == pv_path]
    if not pvs:
        raise LvmError(f"{vg}/{lv}: PV {pv_path} not reported by pvs")
    pe_start = _bytes(pvs[0]["pe_start"])
    for vstart, size, a, b in parsed:
        if (b - a + 1) * ext_size != size:
            raise LvmError(f"{vg}/{lv}: segment size {size} != {b - a + 1} extents")
        extents.append(Extent(vstart, pe_start + a * ext_size, size))
    extents.sort(key=lambda e: e.vstart)
    pos = 0
    for e in extents:
        if e.vstart != pos:
            raise LvmError(f"{vg}/{lv}: hole in the segment map at byte {pos}")
        pos += e.length
    if pos != lv_size:
        raise LvmError(f"{vg}/{lv}: segments cover {pos} of {lv_size} bytes")
    return pv_path, extents, lv_size


def device_mapper_present(misc: str = "/proc/misc", devices: str = "/proc/devices") -> bool:
    """Does the running kernel have a device-mapper driver (can an LV be activated)?

    Asked of the kernel, not of /dev: /dev/mapper/control is created by user space (lvm2's
    `vgchange -an` and even `dmsetup version` mknod it from the misc major/minor) also on a
    kernel without device-mapper, and its existence then says nothing. The driver registers a
    misc device "device-mapper" (/proc/misc) and a block major "device-mapper"
    (/proc/devices); either listed means it is loaded. A driver built as a module that is not
    loaded yet counts as absent: the LV is then served from its PV, which works either way.
    `dmsetup` is not run: it would create the node as a side effect. The paths are
    parameters so a test can point them at files of its own."""
    for path in (misc, devices):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            fields = line.split(None, 1)
            if len(fields) == 2 and fields[0].isdigit() and fields[1].strip() == "device-mapper":
                return True
    return False


def lv_info_blocking(vg: str, lv: str) -> dict:
    """{'uuid', 'read_only', 'pv'} of an LV (blocking `lvm lvs`, for the pre-boot check).
    Raises LvmError with a one-line reason (no such VG/LV, lvm2 missing, several PVs)."""
    try:
        r = subprocess.run(["lvm", "lvs", "--reportformat", "json", "--config", LVM_CONFIG,
                            "-o", "lv_uuid,lv_attr,seg_pe_ranges", f"{vg}/{lv}"],
                           capture_output=True, text=True, env=_env(), timeout=30,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise LvmError("lvm2 is not installed (no `lvm` command)") from None
    except subprocess.TimeoutExpired:
        raise LvmError("lvm lvs timed out") from None
    if r.returncode:
        msg = " ".join(l.strip() for l in r.stderr.splitlines()
                       if l.strip() and "WARNING" not in l)
        raise LvmError(f"no logical volume {vg}/{lv}" + (f" ({msg})" if msg else ""))
    rows = _report(r.stdout, "lv")
    if not rows:
        raise LvmError(f"no logical volume {vg}/{lv}")
    pvs = set()
    for row in rows:
        for rng in row.get("seg_pe_ranges", "").split():
            m = _RANGE.match(rng)
            if m:
                pvs.add(m.group("dev"))
    if len(pvs) != 1:
        raise LvmError(f"{vg}/{lv}: expected one PV, found {sorted(pvs) or 'none'}")
    attr = rows[0].get("lv_attr", "")
    return {"uuid": rows[0]["lv_uuid"], "read_only": len(attr) > 1 and attr[1] == "r",
            "pv": pvs.pop()}
