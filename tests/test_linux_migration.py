"""Save -> restore of Debian's unmodified Linux kernel (issue 13): Linux's own suspend path
(xenbus control/shutdown = suspend, SCHEDOP_shutdown(suspend) with its start_info frame,
its per-CPU GDT page, its P2M list), the file checked by Xen's verify-stream-v2, and the
restored guest carrying on: console, uptime, a tmpfs file's checksum, its vif (ping) and its
disk (through blkfront reconnecting to the new blkback).

The guest has two vCPUs: Linux's suspend runs in stop_machine, its second CPU spinning
with events masked while CPU 0 suspends; Xen saves both vCPUs' state, and after the restore
Linux takes CPU 1 down and up again around re-registering its vcpu_info (xen_vcpu_restore).
A shell loop pinned to CPU 1 (`taskset -c 1`, sleeping between counts: CPU 1's timer) keeps
counting across the save.

One Linux boot per engine (boots cost tens of seconds of emulated kernel time; KVM's half is
skipped where /dev/kvm is unusable): the fixture boots the guest with a vif on a VirtualLan
and a file disk, writes the tmpfs file and a disk pattern, pings it (so netback learns its
IPv4 and IPv6 addresses from its traffic), saves it, restores it while capturing what
reaches the LAN's host behind the bridge, and the tests look at the restored guest.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from aiovmm import Hypervisor
from aiovmm.migration.suspend import SuspendError
from aiovmm.testing import Capture, VirtualLan
from conftest import ENGINES, HV_MEMORY_MIB
from test_linux import BOOT_TIMEOUT, INITRD, KERNEL, Lab, Shell, sh, wait_ready
from test_migration import verify_stream

MEM = 96
GUEST_IP, HOST_IP = "198.18.11.2", "198.18.11.1"
MAC = "00:16:3e:11:0b:02"
DISK_MIB = 8
TMPFS_KIB = 2048
DISK_KIB = 256
CMD_TIMEOUT = 180.0
VCPUS = 2
# CPU 1's counter: a shell loop pinned to it, one count (a line appended) per 0.1 s sleep.
CPU1_LOOP = ("taskset -c 1 sh -c 'i=0; while :; do i=$((i+1)); echo $i >> /tmp/c1; sleep 0.1; "
             "done' >/dev/null 2>&1 &")

pytestmark = ENGINES


def wait_c1(at_least: int) -> str:
    """Shell: wait (up to 60 s: an emulated CPU under load is slow to fork) until CPU 1's
    count reaches `at_least`, then print it."""
    count = "$(tail -n 1 /tmp/c1 2>/dev/null)"
    return (f"t=0; while [ \"{count}\" -lt {at_least} ] 2>/dev/null || [ -z \"{count}\" ]; do "
            f"[ $t -ge 300 ] && break; sleep 0.2; t=$((t+1)); done; tail -n 1 /tmp/c1")


KMSG = re.compile(r"^\[\s*\d+\.\d+\] ")


def run(lab: Lab, cmd: str, shell: Shell | None = None, timeout: float = CMD_TIMEOUT):
    """(status, output lines) of `cmd` in the guest's shell. Kernel messages the guest
    prints on hvc0 meanwhile ("[  12.345] ...") are not the command's: printed, dropped."""
    rc, out = lab.call((shell or lab.sh).run(cmd, timeout), timeout + 30)
    for line in out:
        if KMSG.match(line):
            print(f"guest kernel: {line}")
    return rc, [line for line in out if not KMSG.match(line)]


@pytest.fixture(scope="module")
def lx(tmp_path_factory, engine):
    if not KERNEL.exists() or not INITRD.exists():
        pytest.skip("Debian kernel and initramfs not built (make setup)")
    tmp = tmp_path_factory.mktemp(f"linux-mig-{engine}")
    lab = Lab()
    lab.disk = tmp / "xvda.img"
    with open(lab.disk, "wb") as f:
        f.truncate(DISK_MIB << 20)
    lab.save_path = str(tmp / "linux.save")
    t0 = time.monotonic()
    try:
        async def start():
            lab.lan = VirtualLan(f"{HOST_IP}/24")
            await lab.lan.__aenter__()
            # The restored vif is made in the hypervisor's namespace (a save file names no
            # namespace): the LAN's, where its bridge is.
            lab.hv = Hypervisor(memory_mib=HV_MEMORY_MIB + MEM + 16, netns=lab.lan.lan_ns,
                                engine=engine)
            await lab.hv.__aenter__()
            lab.dom = await lab.hv.create(
                str(KERNEL), memory_mib=MEM, ramdisk=str(INITRD), name="lxmig",
                cmdline=f"console=hvc0 aiovmm.ip={GUEST_IP}/24", vifs=[lab.lan.vif(MAC)],
                disks=[f"target={lab.disk},vdev=xvda,access=rw"], vcpus=VCPUS)
            await wait_ready(lab.dom)
            lab.sh = Shell(lab.dom)
            lab.boot_s = time.monotonic() - t0
        lab.call(start(), BOOT_TIMEOUT + 120)
        # Before the save: traffic both ways (netback learns the guest's addresses), a
        # random tmpfs file, a random pattern on the disk written past the page cache.
        lab.ping_before = lab.call(lab.lan.run("ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST_IP))
        rc, out = run(lab, "ip -6 addr show dev eth0 scope link")
        m = re.search(r"inet6 (fe80::[0-9a-f:]+)/64", "\n".join(out))
        lab.ipv6 = m.group(1) if m else None
        # The guest's link-local address sends its own traffic (DAD is done by now): one
        # ping to all-nodes makes sure netback has seen it as a source.
        run(lab, "ping -6 -c 1 -W 2 -I eth0 ff02::1 >/dev/null 2>&1; true")
        rc, out = run(lab, f"dd if=/dev/urandom of=/tmp/blob bs=1k count={TMPFS_KIB} 2>/dev/null; "
                           f"md5sum /tmp/blob; dd if=/dev/urandom of=/tmp/pat bs=1k count={DISK_KIB} "
                           f"2>/dev/null; dd if=/tmp/pat of=/dev/xvda bs=64k oflag=direct 2>/dev/null; "
                           "md5sum /tmp/pat; cat /proc/uptime")
        assert rc == 0, out
        lab.blob_md5 = out[0].split()[0]
        lab.pat_md5 = out[1].split()[0]
        lab.uptime_before = float(out[2].split()[0])
        rc, out = run(lab, f"{CPU1_LOOP} {wait_c1(1)}")
        assert rc == 0, out
        lab.c1_before = int(out[-1])
        nb = lab.dom.backends[0]
        lab.learned = (list(nb.ipv4), list(nb.ipv6))

        async def save_restore():
            t = time.monotonic()
            await lab.dom.save(lab.save_path)
            lab.save_s = time.monotonic() - t
            lab.saved_end = lab.dom.describe_end()
            lab.cap = await asyncio.to_thread(Capture, lab.lan.host_ns, lab.lan.host_if,
                                              (0x0806, 0x8035, 0x86DD))
            t = time.monotonic()
            lab.dom2 = await lab.hv.restore(lab.save_path)
            lab.restore_s = time.monotonic() - t
            lab.t_restored = time.time_ns()
            lab.sh2 = Shell(lab.dom2)
        lab.call(save_restore())
        yield lab
    finally:
        cap = getattr(lab, "cap", None)
        if cap is not None:
            cap.close()
        lab.stop()
        print(f"\ntest_linux_migration[{engine}]: boot {getattr(lab, 'boot_s', -1):.0f} s, save "
              f"{getattr(lab, 'save_s', -1):.2f} s, restore {getattr(lab, 'restore_s', -1):.2f} s, "
              f"module {time.monotonic() - t0:.0f} s")


def test_save_file_passes_verify_stream_v2(lx):
    assert lx.saved_end == "suspend"
    r = verify_stream(lx.save_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_console_answers_and_uptime_carries_on(lx):
    rc, out = run(lx, "cat /proc/uptime; echo $((6 * 7))", lx.sh2)
    assert rc == 0 and out[-1] == "42", out
    up = float(out[0].split()[0])
    assert up > lx.uptime_before, (up, lx.uptime_before)
    rc, out = run(lx, "cat /proc/uptime", lx.sh2)
    assert float(out[0].split()[0]) >= up


def test_memory_checksum_unchanged(lx):
    rc, out = run(lx, "md5sum /tmp/blob", lx.sh2)
    assert rc == 0 and out[0].split()[0] == lx.blob_md5, out


def test_both_cpus_carry_on(lx):
    """Both vCPUs came back online and run: CPU 1's pinned loop counts on from where it
    was (the same process, its sleeps woken by CPU 1's timer), and CPU 1 takes interrupts
    after the restore (its column of /proc/interrupts grows)."""
    dom = lx.dom2
    assert len(dom.vcpus) == VCPUS and all(v.online for v in dom.vcpus)
    cpu1_irqs = "awk '/^ *[0-9]+:/ {s += $3} END {print s}' /proc/interrupts"
    rc, out = run(lx, f"cat /sys/devices/system/cpu/online; tail -n 1 /tmp/c1; {cpu1_irqs}", lx.sh2)
    assert rc == 0 and out[0] == "0-1", out
    c1, irqs = int(out[1]), int(out[2])
    assert c1 > lx.c1_before, (lx.c1_before, c1)
    rc, out = run(lx, f"{wait_c1(c1 + 3)}; {cpu1_irqs}", lx.sh2)
    assert rc == 0 and int(out[0]) >= c1 + 3 and int(out[1]) > irqs, (c1, irqs, out)


def test_ping_after_restore(lx):
    assert lx.ping_before[0] == 0, lx.ping_before[1]
    rc, out = lx.call(lx.lan.run("ping", "-c", "10", "-i", "0.1", "-W", "5", "-q", GUEST_IP))
    assert rc == 0 and re.search(r" 0% packet loss", out), out


def test_disk_after_restore(lx):
    # Read back past the page cache (O_DIRECT): blkfront reconnected to the new blkback.
    rc, out = sh(lx, f"dd if=/dev/xvda bs=64k count={DISK_KIB // 64} iflag=direct 2>/dev/null | md5sum",
                 shell=lx.sh2)
    out = [l for l in out if not KMSG.match(l)]
    assert rc == 0 and out[0].split()[0] == lx.pat_md5, out
    # A write after the restore reaches the host's file.
    rc, out = run(lx, "dd if=/dev/urandom of=/tmp/pat2 bs=64k count=1 2>/dev/null; dd if=/tmp/pat2 "
                      "of=/dev/xvda bs=64k seek=64 oflag=direct 2>/dev/null; md5sum /tmp/pat2", lx.sh2)
    assert rc == 0, out
    with open(lx.disk, "rb") as f:
        f.seek(64 * 65536)
        assert hashlib.md5(f.read(65536)).hexdigest() == out[0].split()[0], out


def test_xsave_state_carried(lx, engine):
    """Where the engine offers XSAVE (kvm-pvm), Linux enabled it on both CPUs: the file has
    an X86_PV_VCPU_XSAVE record per vCPU with the XCR0 Linux set (the offer's), and both
    restored vCPUs have it back (their processes' AVX state came with the area). The
    emulated engine offers none: no record, as Xen writes none without XSAVE."""
    from aiovmm import kvm_engine
    from test_migration_xstate import xsave_records
    data = open(lx.save_path, "rb").read()
    recs = xsave_records(data)
    offer = kvm_engine.cpl3_xstate() if engine == "kvm" else None
    if offer is None:
        assert recs == []
        return
    assert [vid for _o, vid, _n in recs] == list(range(VCPUS))
    for off, _vid, n in recs:                  # XCR0, XCR0_ACCUMULATED, the area for the latter
        accum = int.from_bytes(data[off + 24:off + 32], "little")
        assert n == 16 + offer.size(accum), (n, hex(accum))
    xcr0s = [int.from_bytes(data[off + 16:off + 24], "little") for off, _v, _n in recs]
    assert xcr0s == [int(offer.xcr0)] * VCPUS, [hex(x) for x in xcr0s]
    assert [v.xcr0 for v in lx.dom2.vcpus] == xcr0s


def test_no_oops_after_restore(lx):
    rc, out = run(lx, "dmesg | grep -E 'BUG:|Oops|WARNING:|Kernel panic|Call Trace' | head -5; "
                      "dmesg | grep -c -i 'restarting tasks'", lx.sh2)
    assert rc == 0 and out[-1] != "0" and len(out) == 1, out


def test_announce_carries_learned_ipv4_and_ipv6(lx):
    """The restored vif announces the guest (RARP, gratuitous ARP, unsolicited IPv6 NA for
    the addresses netback learnt from the guest's own traffic before the save), captured
    behind the bridge and dissected with scapy. The guest's own netfront may announce as
    well; the hypervisor's frames are the ones sent in the RARP's rounds."""
    ipv4, ipv6 = lx.learned
    assert ipv4 == [GUEST_IP], lx.learned
    if lx.ipv6 is None:
        pytest.skip("the guest has no IPv6 link-local address")
    assert ipv6 == [lx.ipv6], lx.learned
    deadline = time.monotonic() + 10
    while True:
        got = [(ts, Ether(f)) for ts, f in lx.cap.frames()]
        rarps = [ts for ts, e in got if e.type == 0x8035 and e.src == MAC]
        if len(rarps) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(rarps) == 5, [e.summary() for _, e in got]
    nas = [(ts, e) for ts, e in got if e.haslayer(ICMPv6ND_NA) and e.src == MAC]
    garps = [(ts, e) for ts, e in got if e.haslayer(ARP) and e[ARP].op == 1 and e.src == MAC
             and e[ARP].psrc == e[ARP].pdst == GUEST_IP]
    for ts in rarps:               # each round: RARP, gratuitous ARP, NA, back to back
        na = [e for t, e in nas if abs(t - ts) < 50_000_000]
        assert na, (ts, [(t, e.summary()) for t, e in nas])
        e = na[0]
        assert e[IPv6].dst == "ff02::1" and e[IPv6].hlim == 255 and e[IPv6].src == lx.ipv6
        assert e[ICMPv6ND_NA].tgt == lx.ipv6 and e[ICMPv6ND_NA].O == 1 and e[ICMPv6ND_NA].S == 0
        assert e[ICMPv6NDOptDstLLAddr].lladdr == MAC
        assert any(abs(t - ts) < 50_000_000 for t, _ in garps)
    assert lx.dom2.backends[0].announced >= 5 * 3


def test_checkpoint_resumes_linux_in_place(lx, tmp_path):
    """A checkpoint (save without destroying): Linux declares SUSPEND_CANCEL, so its
    SCHEDOP_shutdown(suspend) returns 1 and it resumes in place with its old event channels
    and devices (xen_pv_post_suspend's cancelled path). Last in the module: it works on the
    restored guest."""
    path = str(tmp_path / "ckpt.save")
    n = len(lx.dom2.console_lines)
    try:
        lx.call(lx.dom2.save(path, checkpoint=True), 300)
    except SuspendError as e:
        # Why the guest did not suspend is on its console (Linux's do_suspend: "Freezing of
        # tasks failed after 20 s ... freeze processes failed -16" and the task that refused).
        pytest.fail(f"{e}\nguest console since the request:\n" + "\n".join(lx.dom2.console_lines[n:]))
    assert not lx.dom2.dying and lx.dom2.suspended is None
    rc, out = run(lx, "md5sum /tmp/blob; echo $((6 * 7))", lx.sh2)
    assert rc == 0 and out[0].split()[0] == lx.blob_md5 and out[-1] == "42", out
    rc, out = lx.call(lx.lan.run("ping", "-c", "5", "-i", "0.1", "-W", "5", "-q", GUEST_IP))
    assert rc == 0 and re.search(r" 0% packet loss", out), out
    assert os.path.getsize(path) > (MEM << 20) // 2
