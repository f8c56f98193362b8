"""Issue 12 with Debian's unmodified kernel (issue 10's guests/linux): the xl-style verbs as
the real CLI against a real `aiovmm serve`, on one booted Linux guest shared by the module
where the checks leave it intact (create, list, console, pause/unpause, mem-set through its
balloon driver, network- and block-attach into the running guest and detach), then reboot
(a second boot), shutdown -w, and destroy of a third guest in the middle of its boot.

Linux boots take tens of seconds of emulated kernel time (more on a loaded machine): the
tests run in file order and each depends on the guest the previous ones left running.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import time
import uuid

import pytest

from aiovmm.testing import VirtualLan
from .ctlhelp import BUILD, Daemon
from .test_cli_verbs import list_rows, snapshot

LINUX = BUILD / "linux"
KERNEL, INITRD = LINUX / "vmlinuz", LINUX / "initramfs.cpio.gz"
BOOT_TIMEOUT = 600.0
CMD_TIMEOUT = 120.0
MEM = 160                       # MiB populated at boot (xl memory=); the initramfs with iperf3 unpacks to 11 MB
MAXMEM = 192                    # the balloon's ceiling (xl maxmem=): Linux starts 32 MiB ballooned
BALLOON_TO = 128
GUEST_IP, HOST_IP = "198.18.9.2", "198.18.9.1"
XVDB = (202 << 8) | 16
# A printk line on hvc0 ("[   91.375219] ..."): the kernel's own messages can land between a
# command's output lines (blkfront's "xvdb: flush diskcache ..." as a disk is attached).
KMSG = re.compile(r"\[\s*\d+\.\d+\] ")


class LinuxShell:
    """The busybox shell on a daemon domain's hvc0, typed through the console API. The
    markers are typed as A""B so that the tty's echo of the line never matches them."""

    def __init__(self, d: Daemon, dom: str) -> None:
        self.d, self.dom, self.n = d, dom, 0

    def run(self, cmd: str, timeout: float = CMD_TIMEOUT) -> tuple[int, list[str]]:
        self.n += 1
        tag = f"{self.n}x{uuid.uuid4().hex[:6]}"
        start, end = f"BEGIN{tag}", f"END{tag}"
        line = f'echo {start[:3]}""{start[3:]}; {cmd}; echo {end[:3]}""{end[3:]} $?\n'
        self.d.api("POST", f"/api/v1/domains/{self.dom}/console", {"data": line})
        text = self.d.wait_console(self.dom, rf"^{end} \d+\r?$", timeout=timeout)
        lines = [l.rstrip("\r") for l in text.splitlines()]
        i = max(k for k, l in enumerate(lines) if l == start)
        j = max(k for k, l in enumerate(lines) if l.startswith(end + " "))
        return int(lines[j].split()[1]), lines[i + 1:j]

    def ok(self, cmd: str, timeout: float = CMD_TIMEOUT) -> list[str]:
        rc, out = self.run(cmd, timeout)
        assert rc == 0, (cmd, out)
        return out


def meminfo_total_kib(sh: LinuxShell) -> int:
    out = sh.ok("grep MemTotal /proc/meminfo")
    return int(re.fullmatch(r"MemTotal:\s+(\d+) kB", out[-1]).group(1))


def xs_read(d: Daemon, path: str) -> str:
    r = subprocess.run(["xenstore-read", path], capture_output=True, text=True,
                       env=dict(os.environ, XENSTORED_PATH=d.xs_socket))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def xs_exists(d: Daemon, path: str) -> bool:
    return subprocess.run(["xenstore-exists", path], capture_output=True,
                          env=dict(os.environ, XENSTORED_PATH=d.xs_socket)).returncode == 0


def linux_cfg(d: Daemon, name: str, cmdline: str = "console=hvc0") -> str:
    return d.write_cfg(name, kernel=str(KERNEL), ramdisk=str(INITRD), memory=MEM, maxmem=MAXMEM, extra=cmdline)


@pytest.fixture(scope="module")
def lx():
    if not KERNEL.exists() or not INITRD.exists():
        pytest.skip(f"{LINUX}: Debian kernel and initramfs not built (make setup)")
    d = Daemon(machine_memory=MAXMEM + 64)
    try:
        d.baseline = snapshot(d)
        d.sh = LinuxShell(d, "lx")
        yield d
    finally:
        d.stop()


@pytest.fixture
def lan():
    v = VirtualLan(f"{HOST_IP}/24")
    asyncio.run(v.__aenter__())
    try:
        yield v
    finally:
        asyncio.run(v.aclose())


def test_linux_create_list(lx):
    r = lx.cli("create", linux_cfg(lx, "lx"))
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    text = lx.wait_console("lx", r"^aiovmm-init: ready", timeout=BOOT_TIMEOUT)
    print(f"linux boot through the daemon: {time.monotonic() - t0:.1f} s")
    assert "Linux version" in text
    domid, mem, vcpus, state, cpu = list_rows(lx)["lx"]
    assert (mem, vcpus) == (MEM, 1)
    assert state[2:] == "----" and state[:2] in ("r-", "-b") and cpu > 0
    lx.domid = domid
    d = lx.api("GET", "/api/v1/domains/lx")
    assert d["memory_kib"] == d["target_kib"] == MEM * 1024 and d["max_memory_kib"] == MAXMEM * 1024
    assert xs_read(lx, f"/local/domain/{domid}/memory/static-max") == str(MAXMEM * 1024)
    # Linux's xenbus shutdown watcher announced what it supports (xl's shutdown path).
    assert xs_read(lx, f"/local/domain/{domid}/control/feature-poweroff") == "1"


def test_linux_console_send_line_read_echo(lx):
    text = lx.console_session("lx", b"echo through-the-console-$((6 * 7))\n",
                              r"^through-the-console-42\r?$", timeout=CMD_TIMEOUT)
    assert "aiovmm-init: ready" in text                     # the history
    assert "echo through-the-console-$((6 * 7))" in text    # the tty's echo of the typed line
    assert re.search(r"^through-the-console-42\r?$", text, re.M)   # the shell's answer
    assert "lx" in list_rows(lx)


TICK = re.compile(r"^lxtick (\d+)\r?$", re.M)


def _last_tick(d: Daemon) -> int:
    found = TICK.findall(d.console_text("lx"))
    return int(found[-1]) if found else 0


def test_linux_pause_unpause(lx):
    """A background loop in the guest prints a counter every 0.1 s of guest time: paused,
    it stops (and the domain's CPU time with it); unpaused, it goes on."""
    out = lx.sh.ok("(i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo lxtick $i; sleep 0.1; done) & "
                   "echo tickpid $!")
    pid = int(next(l for l in out if l.startswith("tickpid")).split()[1])
    try:
        deadline = time.monotonic() + CMD_TIMEOUT
        while _last_tick(lx) < 5:
            assert time.monotonic() < deadline, "the guest's ticker did not start"
            time.sleep(0.2)
        lx.ok("pause", "lx")
        row = list_rows(lx)["lx"]
        assert row[3] == "--p---"
        time.sleep(0.3)
        paused_at, cpu_at = _last_tick(lx), lx.api("GET", "/api/v1/domains/lx")["cpu_time_s"]
        time.sleep(1.5)
        assert _last_tick(lx) == paused_at
        assert lx.api("GET", "/api/v1/domains/lx")["cpu_time_s"] == cpu_at
        lx.ok("unpause", "lx")
        assert list_rows(lx)["lx"][3] in ("r-----", "-b----")
        deadline = time.monotonic() + CMD_TIMEOUT
        while _last_tick(lx) < paused_at + 5:
            assert time.monotonic() < deadline, "the ticker did not resume"
            time.sleep(0.2)
    finally:
        lx.sh.run(f"kill {pid}")


def _wait_meminfo(sh: LinuxShell, want_kib: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while True:
        kib = meminfo_total_kib(sh)
        if kib == want_kib or time.monotonic() > deadline:
            return kib
        time.sleep(1)


def _wait_list_mem(d: Daemon, mib: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while list_rows(d)["lx"][1] != mib and time.monotonic() < deadline:
        time.sleep(0.2)
    return list_rows(d)["lx"][1]


BALLOON_SYSFS = "/sys/devices/system/xen_memory/xen_memory0"


def _memory_ops(lx) -> int:
    """The guest's memory_op hypercalls so far, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    _, text = lx.request("GET", "/metrics")
    return sum(int(s.value) for f in text_string_to_metric_families(text) if f.name == "aiovmm_hypercalls"
               for s in f.samples if s.labels.get("domid") == str(lx.domid) and s.labels.get("family") == "memory_op")


def test_linux_mem_set_moves_balloon(lx):
    """xl mem-set writes memory/target (KiB); Linux's balloon driver hands pages back with
    XENMEM_decrease_reservation and takes them again with XENMEM_populate_physmap: its
    MemTotal moves by the difference, the hypervisor's free frames with it, and `list`
    shows the domain's pages. Above the boot memory (up to maxmem) it fills the space Linux
    reserved at boot from XENMEM_maximum_reservation."""
    before_kib = meminfo_total_kib(lx.sh)
    free0 = snapshot(lx)[0]
    lx.ok("mem-set", "lx", f"{BALLOON_TO}m")
    assert xs_read(lx, f"/local/domain/{lx.domid}/memory/target") == str(BALLOON_TO * 1024)
    delta = (MEM - BALLOON_TO) * 1024
    assert _wait_meminfo(lx.sh, before_kib - delta) == before_kib - delta
    assert _wait_list_mem(lx, BALLOON_TO) == BALLOON_TO
    d = lx.api("GET", "/api/v1/domains/lx")
    assert (d["memory_kib"], d["target_kib"], d["max_memory_kib"]) == (BALLOON_TO * 1024, BALLOON_TO * 1024, MAXMEM * 1024)
    assert snapshot(lx)[0] == free0 + delta // 4          # the frames went back to the host
    # mem-set lowered the hypervisor's limit too (xl's enforce, XEN_DOMCTL_max_mem): the
    # guest asking its own balloon driver for the memory back (its sysfs target) is refused.
    calls = _memory_ops(lx)
    lx.sh.ok(f"echo {MEM * 1024} > {BALLOON_SYSFS}/target_kb")
    deadline = time.monotonic() + 30
    while _memory_ops(lx) == calls and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _memory_ops(lx) > calls, "the balloon driver made no memory_op"
    time.sleep(0.5)
    assert lx.sh.ok(f"cat {BALLOON_SYSFS}/info/current_kb") == [str(BALLOON_TO * 1024)]
    assert _wait_list_mem(lx, BALLOON_TO) == BALLOON_TO and snapshot(lx)[0] == free0 + delta // 4
    lx.sh.ok(f"echo {BALLOON_TO * 1024} > {BALLOON_SYSFS}/target_kb")
    # The guest's memory still works: 16 MiB of new pages in its tmpfs.
    out = lx.sh.ok("dd if=/dev/zero of=/tmp/big bs=64k count=256 2>/dev/null && wc -c < /tmp/big && rm /tmp/big")
    assert out[-1] == "16777216"
    # Above the maximum: refused by the toolstack, nothing changes.
    r = lx.cli("mem-set", "lx", f"{MAXMEM + 8}m")
    assert r.returncode == 1 and "above" in r.stderr
    # Up to maxmem: past what it booted with.
    grow = (MAXMEM - MEM) * 1024
    lx.ok("mem-set", "lx", f"{MAXMEM}m")
    assert _wait_meminfo(lx.sh, before_kib + grow) == before_kib + grow
    assert _wait_list_mem(lx, MAXMEM) == MAXMEM
    assert snapshot(lx)[0] == free0 - grow // 4
    lx.ok("mem-set", "lx", f"{MEM}m")
    assert _wait_meminfo(lx.sh, before_kib) == before_kib
    assert _wait_list_mem(lx, MEM) == MEM
    assert snapshot(lx)[0] == free0
    out = lx.sh.ok("cat /sys/devices/system/xen_memory/xen_memory0/info/current_kb; "
                   "dmesg | grep -E 'BUG|WARNING|Oops|Call Trace' || true")
    assert out == [str(MEM * 1024)], out


def test_linux_network_attach_detach(lx, lan):
    lx.ok("network-attach", "lx", "mac=00:16:3e:12:09:01", "bridge=br0", f"netns={lan.lan_ns}")
    # Linux's xenbus saw device/vif/0 appear, xen-netfront probed it and connected.
    lx.sh.ok(f"for i in $(seq 300); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done; "
             f"cat /sys/class/net/eth0/address && ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up")
    ping = subprocess.run(
        ["ip", "netns", "exec", lan.host_ns, "ping", "-c", "5", "-i", "0.2", "-W", "5", GUEST_IP],
        capture_output=True, text=True, timeout=120)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    out = lx.ok("network-list", "lx").splitlines()
    assert re.match(rf"^0\s+0\s+00:16:3e:12:09:01\s+0\s+4\s+\d+\s+\d+/\d+\s+/local/domain/0/backend/vif/{lx.domid}/0$",
                    out[1]), out
    vif = lx.api("GET", "/api/v1/domains/lx/vifs")[0]
    assert vif["frontend_state"] == 4 and vif["rx_packets"] >= 5 and vif["tx_packets"] >= 5
    lx.ok("network-detach", "lx", "0")
    assert lx.ok("network-list", "lx").splitlines()[1:] == []
    assert not xs_exists(lx, f"/local/domain/{lx.domid}/device/vif/0")
    # xen-netfront saw its backend close and the device go: eth0 is gone in the guest.
    lx.sh.ok("for i in $(seq 300); do [ -e /sys/class/net/eth0 ] || break; sleep 0.1; done; "
             "[ ! -e /sys/class/net/eth0 ]")


def test_linux_block_attach_detach(lx, tmp_path):
    img = tmp_path / "lxhp.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    lx.ok("block-attach", "lx", f"target={img},vdev=xvdb,access=rw")
    out = lx.sh.ok("for i in $(seq 300); do [ -e /sys/block/xvdb ] && break; sleep 0.1; done; "
                   "cat /sys/block/xvdb/size /sys/block/xvdb/ro && "
                   "head -c 262144 /dev/urandom > /tmp/p && md5sum /tmp/p && "
                   "dd if=/tmp/p of=/dev/xvdb bs=64k conv=fsync 2>/dev/null && sync")
    out = [l for l in out if not KMSG.match(l)]
    assert out[:2] == [str(8 << 11), "0"], out
    md5 = next(l.split()[0] for l in out if re.fullmatch(r"[0-9a-f]{32}  \S+", l))
    with open(img, "rb") as f:
        assert hashlib.md5(f.read(262144)).hexdigest() == md5
    out = lx.ok("block-list", "lx").splitlines()
    assert re.match(rf"^{XVDB}\s+0\s+{XVDB}\s+4\s+\d+\s+\d+\s+/local/domain/0/backend/vbd/{lx.domid}/{XVDB}$",
                    out[1]), out
    lx.ok("block-detach", "lx", "xvdb")
    assert lx.ok("block-list", "lx").splitlines()[1:] == []
    assert not xs_exists(lx, f"/local/domain/{lx.domid}/device/vbd/{XVDB}")
    lx.sh.ok("for i in $(seq 300); do [ -e /sys/block/xvdb ] || break; sleep 0.1; done; "
             "[ ! -e /sys/block/xvdb ]")


def test_linux_reboot(lx):
    """xl reboot: control/shutdown=reboot; Linux's watcher reboots it (busybox init), the
    domain goes with SHUTDOWN_reboot and the daemon builds it again: a second boot."""
    old = lx.domid
    lx.ok("reboot", "lx")
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        rows = list_rows(lx)
        if "lx" in rows and rows["lx"][0] != old:
            break
        assert time.monotonic() < deadline, "not rebuilt"
        time.sleep(0.2)
    lx.domid = rows["lx"][0]
    assert lx.domid > old
    text = lx.wait_console("lx", r"^aiovmm-init: ready", timeout=BOOT_TIMEOUT)
    assert text.count("aiovmm-init: ready") == 1           # the new domain's console
    assert lx.sh.ok("echo again-$((3 * 3))") == ["again-9"]


def test_linux_shutdown_wait(lx):
    domid = lx.domid
    r = lx.cli("shutdown", "-w", "lx", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "lx" not in list_rows(lx)
    assert snapshot(lx) == lx.baseline                    # every frame, every node released
    assert f"d{domid} (lx): gone (poweroff)" in lx.log()


def test_linux_destroy_while_booting(lx):
    lx.ok("create", linux_cfg(lx, "lx2"))
    lx.wait_console("lx2", r"Linux version", timeout=BOOT_TIMEOUT)
    lx.ok("destroy", "lx2")
    assert "lx2" not in list_rows(lx)
    assert snapshot(lx) == lx.baseline
