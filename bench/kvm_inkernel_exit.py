"""kvm-pvm: what an exit costs when KVM handles it in the kernel vs when it returns to user space.

The same minimal VM as bench/hypercall.py's exit floor (a CPL-3 loop of `out %al,$0x20`, one
identity-mapped 2 MiB user page), run two ways, interleaved `--reps` times:
  - user space: every `out` returns from KVM_RUN to a bare Python loop (the exit floor);
  - in the kernel: a KVM_IOEVENTFD on port 0x20 makes KVM complete the `out` itself (it only
    signals an eventfd) and enter the guest again; one KVM_RUN for all n exits.
Per exit: wall us and loop-thread CPU us, medians. On kvm-pvm (CPL 0 emulated, shadow paging)
this says how much of an exit is the return to user space, and so what an in-kernel device
(KVM's PIT, which would answer Linux's quick_pit_calibrate reads without leaving the
kernel) could save; the PIT's answers would not be Xen's (a domU reads ~0 from every port),
so it is a measurement, not a design option.

Last line: user_exit_us=<wall> user_exit_cpu_us=<cpu> kernel_exit_us=<wall> kernel_exit_cpu_us=<cpu> load=<1 min>
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aiovmm.kvm_engine import Ioctl, _system_fd, unavailable_reason  # noqa: E402

KVM_IOEVENTFD = 0x4040AE79          # _IOW(KVMIO, 0x79, struct kvm_ioeventfd)
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_RUN = 0xAE80
EXIT_IO = 2


def one(n: int, in_kernel: bool) -> tuple[float, float]:
    """(wall us, CPU us) per `out` exit over n of them."""
    kvm = _system_fd()
    vm = fcntl.ioctl(kvm, Ioctl.CREATE_VM, 0)
    mem = mmap.mmap(-1, 4 << 20)
    anchor = ctypes.c_char.from_buffer(mem)
    efd = -1
    try:
        fcntl.ioctl(vm, Ioctl.SET_USER_MEMORY_REGION,
                    struct.pack("<IIQQQ", 0, 0, 0, 4 << 20, ctypes.addressof(anchor)))
        vcpu = fcntl.ioctl(vm, Ioctl.CREATE_VCPU, 0)
        run = mmap.mmap(vcpu, fcntl.ioctl(kvm, Ioctl.GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED)
        struct.pack_into("<Q", mem, 0x1000, 0x2000 | 7)
        struct.pack_into("<Q", mem, 0x2000, 0x3000 | 7)
        struct.pack_into("<Q", mem, 0x3000, 0x87)                     # 2 MiB user page at 0
        sregs = bytearray(fcntl.ioctl(vcpu, Ioctl.GET_SREGS, bytes(312)))
        for i, (sel, typ, lng, db) in enumerate([(0x33, 0xB, 1, 0)] + [(0x2B, 3, 0, 1)] * 5):
            struct.pack_into("<QIHBBBBBBBBBx", sregs, 24 * (0 if i == 0 else (1, 2, 3, 4, 5)[i - 1]),
                             0, 0xFFFFFFFF, sel, typ, 1, 3, db, 1, lng, 1, 0, 0)
        struct.pack_into("<QQQQQQ", sregs, 224, 0x80050033, 0, 0x1000, 0x620, 0, 0xD01)
        fcntl.ioctl(vcpu, Ioctl.SET_SREGS, bytes(sregs))
        # mov $n,%rbx; 1: out %al,$0x20; dec %rbx; jnz 1b; out %al,$0x10
        code = b"\x48\xbb" + struct.pack("<Q", n) + b"\xe6\x20\x48\xff\xcb\x75\xf9\xe6\x10"
        mem[0x10000:0x10000 + len(code)] = code
        regs = [0] * 18
        regs[16], regs[17], regs[6] = 0x10000, 0x202, 0x100000
        fcntl.ioctl(vcpu, Ioctl.SET_REGS, struct.pack("<18Q", *regs))
        if in_kernel:
            efd = os.eventfd(0, os.EFD_NONBLOCK)
            fcntl.ioctl(vm, KVM_IOEVENTFD, struct.pack("<QQIiI36x", 0, 0x20, 1, efd, KVM_IOEVENTFD_FLAG_PIO))
        count = 0
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        while True:
            fcntl.ioctl(vcpu, KVM_RUN, 0)
            if struct.unpack_from("<I", run, 8)[0] != EXIT_IO or struct.unpack_from("<H", run, 34)[0] != 0x20:
                break
            count += 1
        wall, cpu = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
        last = struct.unpack_from("<H", run, 34)[0]
        signalled = os.eventfd_read(efd) if in_kernel else 0
        run.close()
        os.close(vcpu)
    finally:
        del anchor
        os.close(vm)
        if efd >= 0:
            os.close(efd)
    want = (0, n) if in_kernel else (n, 0)
    if (count, signalled) != want or last != 0x10:
        sys.exit(f"probe: {count} user exits, {signalled} eventfd signals, last port {last:#x}; "
                 f"expected {want} and 0x10")
    return wall / n / 1000, cpu / n / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    why = unavailable_reason()
    if why:
        sys.exit(f"KVM unavailable: {why}")
    res: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.reps):
        for k in (False, True):
            res[k].append(one(args.n, k))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in res.items()}
    for k, name in ((False, "user space (Python loop)"), (True, "in the kernel (ioeventfd)")):
        print(f"{name}: wall us/exit {', '.join(f'{w:.1f}' for w, _ in res[k])}; "
              f"median {med[k][0]:.1f} wall, {med[k][1]:.1f} CPU")
    print(f"user_exit_us={med[False][0]:.2f} user_exit_cpu_us={med[False][1]:.2f} "
          f"kernel_exit_us={med[True][0]:.2f} kernel_exit_cpu_us={med[True][1]:.2f} "
          f"load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
