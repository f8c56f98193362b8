"""Event channels, 2-level ABI, on real domains (xen-pv-abi.md §4.3, §4.5; Xen's
event_channel.c and event_2l.c).

Domains are built from hello.elf and paused before they ever run, so the test drives their
port tables and shared_info pages directly and nothing else touches them.
"""
from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aiovmm import Hypervisor, builder, hypercall
from aiovmm.abi import (DOMID_SELF, EVTCHN_2L_NR_CHANNELS, PAGE_SHIFT, Errno, EvtchnOp,
                        EvtchnStat, Hypercall, SharedInfo, VcpuInfo, Virq)
from aiovmm.events import EventError
from conftest import guest

ALL_ENGINES = True        # guest-booting tests run on every engine (conftest.py)


async def _paused(hv, name):
    dom = await hv.create(guest("hello"), memory_mib=4, name=name)
    dom.paused = True            # never scheduled: the test owns its event state
    # The domain's own backends (console ring, xenstore ring) bind their ports when its task
    # first runs: let them, so that they never race with the test's event operations.
    for _ in range(2000):
        if all(dom.evtchn.ports.get(p) is not None and dom.evtchn.ports[p].state == EvtchnStat.interdomain
               for p in (dom.store_port, dom.console_port)):
            break
        await asyncio.sleep(0.001)
    else:
        raise AssertionError("the domain's console and xenstore backends never connected")
    return dom


# -- shared_info views ---------------------------------------------------------------------------
def pending_word(dom, word=0) -> int:
    return dom.mem.read_u64(dom.shared_info_maddr + SharedInfo.evtchn_pending + 8 * word)


def mask_word(dom, word=0) -> int:
    return dom.mem.read_u64(dom.shared_info_maddr + SharedInfo.evtchn_mask + 8 * word)


def sel(dom, vcpu=0) -> int:
    return dom.mem.read_u64(dom.shared_info_maddr + 64 * vcpu + VcpuInfo.evtchn_pending_sel)


def upcall_pending(dom, vcpu=0) -> int:
    return dom.mem.map[dom.shared_info_maddr + 64 * vcpu + VcpuInfo.evtchn_upcall_pending]


def guest_mask(dom, port):
    a = dom.shared_info_maddr + SharedInfo.evtchn_mask + (port >> 3)
    dom.mem.map[a] |= 1 << (port & 7)


def guest_clear_pending(dom, port):
    a = dom.shared_info_maddr + SharedInfo.evtchn_pending + (port >> 3)
    dom.mem.map[a] &= ~(1 << (port & 7)) & 0xFF


def guest_ack(dom):
    """What the upcall handler does first: clear upcall_pending, take the selector."""
    base = dom.shared_info_maddr
    dom.mem.map[base + VcpuInfo.evtchn_upcall_pending] = 0
    dom.mem.write_u64(base + VcpuInfo.evtchn_pending_sel, 0)


def errno_of(fn, *args):
    with pytest.raises(EventError) as ei:
        fn(*args)
    return ei.value.errno


@pytest.fixture
async def two(hv):
    a = await _paused(hv, "a")
    b = await _paused(hv, "b")
    return a, b


# -- start of day --------------------------------------------------------------------------------
async def test_initial_ports(hv):
    """The toolstack's ports: xenstore first, then console, both offered to domid 0 and bound
    by the host's xenstore and console backends once the domain runs."""
    a = await _paused(hv, "a")
    assert (a.store_port, a.console_port) == (1, 2)
    for p in (1, 2):
        st_ = a.evtchn.status(p)
        assert st_.state == EvtchnStat.interdomain and st_.remote_dom == 0
    assert a.evtchn.status(3).state == EvtchnStat.closed
    assert pending_word(a) == 0 and sel(a) == 0 and upcall_pending(a) == 0


async def test_console_backend_binds_console_port(two):
    """Once the domain's task runs, the host console backend is bound to the console port."""
    a, _ = two
    s = a.evtchn.status(a.console_port)
    assert (s.state, s.remote_dom) == (EvtchnStat.interdomain, 0)


# -- interdomain -----------------------------------------------------------------------------------
async def test_alloc_unbound_lowest_free(two):
    a, b = two
    p = a.evtchn.alloc_unbound(b.domid)
    assert p == 3
    s = a.evtchn.status(p)
    assert s.state == EvtchnStat.unbound and s.remote_dom == b.domid
    assert a.evtchn.alloc_unbound(b.domid) == 4
    a.evtchn.close(3)
    assert a.evtchn.alloc_unbound(b.domid) == 3


async def test_bind_interdomain_links_and_marks_local_pending(two):
    a, b = two
    pa = a.evtchn.alloc_unbound(b.domid)
    pb = b.evtchn.bind_interdomain(a.domid, pa)
    assert pb == 3
    sa, sb = a.evtchn.status(pa), b.evtchn.status(pb)
    assert (sa.state, sa.remote_dom, sa.remote_port) == (EvtchnStat.interdomain, b.domid, pb)
    assert (sb.state, sb.remote_dom, sb.remote_port) == (EvtchnStat.interdomain, a.domid, pa)
    # Xen always marks the new local port pending (lost notifications before the bind).
    assert pending_word(b) == 1 << pb
    assert sel(b) == 1 and upcall_pending(b) == 1
    assert pending_word(a) == 0 and upcall_pending(a) == 0


async def test_send_sets_remote_pending(two):
    a, b = two
    pa = a.evtchn.alloc_unbound(b.domid)
    pb = b.evtchn.bind_interdomain(a.domid, pa)
    guest_clear_pending(b, pb)
    guest_ack(b)
    a.evtchn.send(pa)
    assert b.evtchn.is_pending(pb)
    assert sel(b) == 1 and upcall_pending(b) == 1
    assert not a.evtchn.is_pending(pa) and upcall_pending(a) == 0
    # A second send while still pending is coalesced: selector and upcall untouched.
    guest_ack(b)
    a.evtchn.send(pa)
    assert sel(b) == 0 and upcall_pending(b) == 0
    # And the other direction.
    b.evtchn.send(pb)
    assert a.evtchn.is_pending(pa) and upcall_pending(a) == 1


async def test_mask_blocks_selector_and_unmask_reraises(two):
    a, b = two
    pa = a.evtchn.alloc_unbound(b.domid)
    pb = b.evtchn.bind_interdomain(a.domid, pa)
    guest_clear_pending(b, pb)
    guest_ack(b)
    guest_mask(b, pb)
    a.evtchn.send(pa)
    assert b.evtchn.is_pending(pb), "a masked port still records the event"
    assert sel(b) == 0 and upcall_pending(b) == 0
    b.evtchn.unmask(pb)
    assert not b.evtchn.is_masked(pb)
    assert sel(b) == 1 and upcall_pending(b) == 1
    # Unmasking an unmasked port does nothing more.
    guest_ack(b)
    b.evtchn.unmask(pb)
    assert sel(b) == 0 and upcall_pending(b) == 0


async def test_unmask_without_pending_is_quiet(two):
    a, _ = two
    p = a.evtchn.bind_ipi(0)
    guest_mask(a, p)
    a.evtchn.unmask(p)
    assert sel(a) == 0 and upcall_pending(a) == 0 and mask_word(a) == 0


async def test_close_resets_peer_to_unbound(two):
    a, b = two
    pa = a.evtchn.alloc_unbound(b.domid)
    pb = b.evtchn.bind_interdomain(a.domid, pa)
    a.evtchn.send(pa)
    a.evtchn.close(pa)
    assert a.evtchn.status(pa).state == EvtchnStat.closed
    s = b.evtchn.status(pb)
    assert (s.state, s.remote_dom) == (EvtchnStat.unbound, a.domid)
    # Sending on an unbound port is silently dropped.
    guest_ack(a)
    b.evtchn.send(pb)
    assert pending_word(a) == 0 and upcall_pending(a) == 0
    # The orphaned end is offered back to the domain that closed: it can re-bind.
    pa2 = a.evtchn.bind_interdomain(b.domid, pb)
    assert pa2 == pa
    assert b.evtchn.status(pb).remote_port == pa2


async def test_close_clears_pending(two):
    a, _ = two
    p = a.evtchn.bind_ipi(0)
    a.evtchn.send(p)
    assert a.evtchn.is_pending(p)
    a.evtchn.close(p)
    assert not a.evtchn.is_pending(p)


async def test_loopback(two):
    a, _ = two
    p1 = a.evtchn.alloc_unbound(DOMID_SELF)
    assert a.evtchn.status(p1).remote_dom == a.domid
    p2 = a.evtchn.bind_interdomain(DOMID_SELF, p1)
    guest_clear_pending(a, p2)
    a.evtchn.send(p1)
    assert a.evtchn.is_pending(p2) and not a.evtchn.is_pending(p1)


async def test_ipi_and_virq(two):
    a, _ = two
    ipi = a.evtchn.bind_ipi(0)
    a.evtchn.send(ipi)
    assert a.evtchn.is_pending(ipi) and upcall_pending(a) == 1
    v = a.evtchn.bind_virq(Virq.TIMER, 0)
    s = a.evtchn.status(v)
    assert (s.state, s.virq, s.vcpu) == (EvtchnStat.virq, Virq.TIMER, 0)
    a.evtchn.send_virq(Virq.TIMER, 0)
    assert a.evtchn.is_pending(v)


async def test_send_on_virq_port_is_einval(two):
    """Xen's evtchn_send: interdomain -> remote, IPI -> local, unbound -> dropped, any other
    state (VIRQ, PIRQ, closed) -> -EINVAL (xen-pv-abi.md §4.3)."""
    a, _ = two
    v = a.evtchn.bind_virq(Virq.TIMER, 0)
    assert errno_of(a.evtchn.send, v) == Errno.EINVAL
    assert not a.evtchn.is_pending(v)


# -- errors ----------------------------------------------------------------------------------------
async def test_enospc(two):
    a, b = two
    n = 0
    with pytest.raises(EventError) as ei:
        while True:
            a.evtchn.alloc_unbound(b.domid)
            n += 1
    assert ei.value.errno == Errno.ENOSPC
    assert n == EVTCHN_2L_NR_CHANNELS - 3          # port 0 reserved, 1 and 2 taken
    assert errno_of(a.evtchn.bind_ipi, 0) == Errno.ENOSPC
    a.evtchn.close(100)
    assert a.evtchn.bind_ipi(0) == 100


async def test_bind_interdomain_errors(two, hv):
    a, b = two
    c = await _paused(hv, "c")
    pa = a.evtchn.alloc_unbound(c.domid)                 # offered to c, not b
    assert errno_of(b.evtchn.bind_interdomain, a.domid, pa) == Errno.EINVAL
    assert errno_of(b.evtchn.bind_interdomain, a.domid, 50) == Errno.EINVAL    # closed
    assert errno_of(b.evtchn.bind_interdomain, a.domid, 0) == Errno.EINVAL     # reserved
    assert errno_of(b.evtchn.bind_interdomain, a.domid, 4096) == Errno.EINVAL
    assert errno_of(b.evtchn.bind_interdomain, 999, 1) == Errno.ESRCH
    pc = c.evtchn.bind_interdomain(a.domid, pa)
    # Already bound: not unbound any more.
    assert errno_of(c.evtchn.bind_interdomain, a.domid, pa) == Errno.EINVAL
    assert c.evtchn.status(pc).state == EvtchnStat.interdomain
    # Failed binds allocated nothing.
    assert b.evtchn.status(3).state == EvtchnStat.closed


async def test_bind_virq_errors(two):
    a, _ = two
    assert errno_of(a.evtchn.bind_virq, 24, 0) == Errno.EINVAL
    assert errno_of(a.evtchn.bind_virq, Virq.CONSOLE, 1) == Errno.EINVAL    # global, vCPU != 0
    assert errno_of(a.evtchn.bind_virq, Virq.TIMER, 1) == Errno.ENOENT      # no vCPU 1
    a.evtchn.bind_virq(Virq.TIMER, 0)
    assert errno_of(a.evtchn.bind_virq, Virq.TIMER, 0) == Errno.EEXIST
    assert errno_of(a.evtchn.bind_ipi, 3) == Errno.ENOENT


async def test_close_send_errors(two):
    a, _ = two
    for port in (0, 77, EVTCHN_2L_NR_CHANNELS, -1):
        assert errno_of(a.evtchn.close, port) == Errno.EINVAL, port
        assert errno_of(a.evtchn.send, port) == Errno.EINVAL, port
    p = a.evtchn.bind_ipi(0)
    a.evtchn.close(p)
    assert errno_of(a.evtchn.close, p) == Errno.EINVAL


async def test_unmask_and_status_port_range(two):
    """Ports 0 .. NR_CHANNELS-1 are valid (port 0 is reserved and reads closed), anything
    else is EINVAL (Xen: port_is_valid in evtchn_unmask and evtchn_status). An out-of-range
    unmask must not touch shared_info past the mask array."""
    a, _ = two
    si = a.shared_info_maddr
    before = bytes(a.mem.map[si:si + 4096])
    a.evtchn.unmask(0)                                      # valid: returns 0 in Xen
    assert a.evtchn.status(0).state == EvtchnStat.closed
    for port in (EVTCHN_2L_NR_CHANNELS, EVTCHN_2L_NR_CHANNELS + 1, 2 * EVTCHN_2L_NR_CHANNELS - 1,
                 -1):
        assert errno_of(a.evtchn.unmask, port) == Errno.EINVAL, port
        assert errno_of(a.evtchn.status, port) == Errno.EINVAL, port
    after = bytes(a.mem.map[si:si + 4096])
    mask_end = SharedInfo.evtchn_mask + EVTCHN_2L_NR_CHANNELS // 8
    assert after[mask_end:] == before[mask_end:]


def _evtchn_op(dom, cmd: int, payload: bytes) -> tuple[int, bytes]:
    """HYPERVISOR_event_channel_op(cmd, arg) as the (paused) guest would make it: the
    argument written into its own memory (pfn 0, mapped read-write), the call through the
    real dispatcher; returns the result and the argument area afterwards."""
    v = dom.vcpus[0]
    va = builder.parse_kernel(guest("hello")).virt_base + 0x800
    ma = dom.hypervisor.pagetables.translate(v.current_root << PAGE_SHIFT, va, True)
    dom.mem.write(ma, payload.ljust(32, b"\0"))
    rc = hypercall.call(v, Hypercall.event_channel_op, cmd, va)
    return rc, dom.mem.read(ma, 32)


async def test_event_channel_op_subops_through_the_hypercall(two):
    """Each sub-op reaches its handler; operations on another domain's table are EPERM for
    an unprivileged caller (Xen: xsm checks in evtchn_alloc_unbound / evtchn_status /
    evtchn_reset); pirqs are not the domain's (EPERM); unknown sub-ops ENOSYS."""
    a, b = two
    rc, out = _evtchn_op(a, EvtchnOp.alloc_unbound, struct.pack("<HHI", DOMID_SELF, b.domid, 0))
    port = struct.unpack_from("<I", out, 4)[0]
    assert rc == 0 and a.evtchn.status(port).state == EvtchnStat.unbound
    rc, out = _evtchn_op(a, EvtchnOp.alloc_unbound, struct.pack("<HHI", a.domid, b.domid, 0))
    assert rc == 0
    for foreign in (b.domid, 0):
        assert _evtchn_op(a, EvtchnOp.alloc_unbound,
                          struct.pack("<HHI", foreign, a.domid, 0))[0] == -Errno.EPERM
    rc, out = _evtchn_op(a, EvtchnOp.bind_ipi, struct.pack("<II", 0, 0))
    ipi = struct.unpack_from("<I", out, 4)[0]
    assert rc == 0 and a.evtchn.status(ipi).state == EvtchnStat.ipi
    assert _evtchn_op(a, EvtchnOp.bind_vcpu, struct.pack("<II", port, 0))[0] == 0
    assert _evtchn_op(a, EvtchnOp.bind_vcpu, struct.pack("<II", port, 5))[0] == -Errno.ENOENT
    rc, out = _evtchn_op(a, EvtchnOp.status, struct.pack("<HxxI", DOMID_SELF, port))
    assert rc == 0
    assert struct.unpack_from("<IIH", out, 8) == (EvtchnStat.unbound, 0, b.domid)
    for foreign in (b.domid, 0):
        assert _evtchn_op(a, EvtchnOp.status,
                          struct.pack("<HxxI", foreign, port))[0] == -Errno.EPERM
        assert _evtchn_op(a, EvtchnOp.reset, struct.pack("<H", foreign))[0] == -Errno.EPERM
    assert a.evtchn.status(ipi).state == EvtchnStat.ipi       # the refused reset did nothing
    assert _evtchn_op(a, EvtchnOp.bind_pirq, struct.pack("<III", 1, 0, 0))[0] == -Errno.EPERM
    assert _evtchn_op(a, 99, b"")[0] == -Errno.ENOSYS
    assert _evtchn_op(a, EvtchnOp.reset, struct.pack("<H", DOMID_SELF))[0] == 0
    assert a.evtchn.status(ipi).state == EvtchnStat.closed
    assert a.evtchn.status(port).state == EvtchnStat.closed


async def test_bind_vcpu_rules(two):
    a, b = two
    ipi = a.evtchn.bind_ipi(0)
    assert errno_of(a.evtchn.bind_vcpu, ipi, 0) == Errno.EINVAL
    timer = a.evtchn.bind_virq(Virq.TIMER, 0)
    assert errno_of(a.evtchn.bind_vcpu, timer, 0) == Errno.EINVAL
    assert errno_of(a.evtchn.bind_vcpu, 99, 0) == Errno.EINVAL
    pa = a.evtchn.alloc_unbound(b.domid)
    a.evtchn.bind_vcpu(pa, 0)
    assert errno_of(a.evtchn.bind_vcpu, pa, 5) == Errno.ENOENT


async def test_host_endpoint(two):
    """A port the guest offers to domid 0 is bound by a host backend endpoint."""
    a, _ = two
    hv = a.hypervisor
    port = a.evtchn.alloc_unbound(0)
    ep = hv.host.endpoint_bind(a.domid, port)
    s = a.evtchn.status(port)
    assert (s.state, s.remote_dom, s.remote_port) == (EvtchnStat.interdomain, 0, ep.port)
    # Like any bind_interdomain, the binder's new local port starts pending.
    assert ep.pending()
    await asyncio.wait_for(ep.wait(), 5)
    assert not ep.pending()
    guest_clear_pending(a, port)
    guest_ack(a)
    a.evtchn.send(port)
    assert ep.pending()
    ep.notify()
    assert a.evtchn.is_pending(port) and upcall_pending(a) == 1
    ep.close()
    s = a.evtchn.status(port)
    assert (s.state, s.remote_dom) == (EvtchnStat.unbound, 0)


# -- property: the 2-level semantics against a model of Xen -----------------------------------------
class Model:
    """Xen's event_channel.c + event_2l.c for one vCPU per domain, ports < 64."""

    def __init__(self, domids, host_links=None):
        """`host_links`: {domid: {port: host_port}} for the ports the domain's own console
        and xenstore backends (the host, domid 0) have bound; without them, the toolstack's
        two ports are still unbound. The host is modelled as domain 0, never checked."""
        host_links = host_links or {}
        every = [0] + list(domids)
        self.ports = {d: {1: ("unbound", 0, 0), 2: ("unbound", 0, 0)} for d in domids}
        self.ports[0] = {}
        for d, links in host_links.items():
            for p, hp in links.items():
                self.ports[d][p] = ("interdomain", 0, hp)
                self.ports[0][hp] = ("interdomain", d, p)
        self.virqs = {d: {} for d in every}
        self.pending = {d: set() for d in every}
        self.mask = {d: set() for d in every}
        self.sel = {d: 0 for d in every}
        self.upcall = {d: 0 for d in every}

    def free_port(self, d):
        p = 1
        while p in self.ports[d]:
            p += 1
        return p

    def set_pending(self, d, p):
        if p in self.pending[d]:
            return
        self.pending[d].add(p)
        if p not in self.mask[d] and not self.sel[d] & 1:
            self.sel[d] |= 1
            self.upcall[d] = 1

    def apply(self, op):
        kind, d, *args = op
        if kind == "alloc":
            (r,) = args
            p = self.free_port(d)
            self.ports[d][p] = ("unbound", d if r == DOMID_SELF else r, 0)
            return p
        if kind == "bind":
            rd, rp = args
            rd = d if rd == DOMID_SELF else rd
            if rd not in self.ports:
                return Errno.ESRCH
            rs = self.ports[rd].get(rp)
            if rs is None or rs[0] != "unbound" or rs[1] != d:
                return Errno.EINVAL
            lp = self.free_port(d)
            self.ports[d][lp] = ("interdomain", rd, rp)
            self.ports[rd][rp] = ("interdomain", d, lp)
            self.set_pending(d, lp)
            return lp
        if kind == "ipi":
            p = self.free_port(d)
            self.ports[d][p] = ("ipi", 0, 0)
            return p
        if kind == "virq":
            (virq,) = args
            if virq in self.virqs[d]:
                return Errno.EEXIST
            p = self.free_port(d)
            self.ports[d][p] = ("virq", virq, 0)
            self.virqs[d][virq] = p
            return p
        if kind == "fire":
            (virq,) = args
            if virq in self.virqs[d]:
                self.set_pending(d, self.virqs[d][virq])
            return None
        if kind == "send":
            (p,) = args
            s = self.ports[d].get(p)
            if s is None:
                return Errno.EINVAL
            if s[0] == "interdomain":
                self.set_pending(s[1], s[2])
            elif s[0] == "ipi":
                self.set_pending(d, p)
            return None
        if kind == "close":
            (p,) = args
            s = self.ports[d].get(p)
            if s is None:
                return Errno.EINVAL
            if s[0] == "interdomain":
                self.ports[s[1]][s[2]] = ("unbound", d, 0)
            if s[0] == "virq":
                del self.virqs[d][s[1]]
            del self.ports[d][p]
            self.pending[d].discard(p)
            return None
        if kind == "unmask":
            (p,) = args
            if p in self.mask[d]:
                self.mask[d].discard(p)
                if p in self.pending[d] and not self.sel[d] & 1:
                    self.sel[d] |= 1
                    self.upcall[d] = 1
            return None
        if kind == "mask":
            self.mask[d].add(args[0])
        elif kind == "clear":
            self.pending[d].discard(args[0])
        elif kind == "ack":
            self.sel[d] = 0
            self.upcall[d] = 0
        return None


def _ops(domids):
    d = st.sampled_from(domids)
    port = st.integers(0, 12)
    uport = st.integers(1, 12)
    return st.lists(st.one_of(
        st.tuples(st.just("alloc"), d, st.sampled_from(domids + [DOMID_SELF])),
        st.tuples(st.just("bind"), d, st.sampled_from(domids + [DOMID_SELF, 99]), port),
        st.tuples(st.just("ipi"), d),
        st.tuples(st.just("virq"), d, st.sampled_from([Virq.TIMER, Virq.DEBUG])),
        st.tuples(st.just("fire"), d, st.sampled_from([Virq.TIMER, Virq.DEBUG])),
        st.tuples(st.just("send"), d, port),
        st.tuples(st.just("send"), d, port),
        st.tuples(st.just("close"), d, port),
        st.tuples(st.just("unmask"), d, uport),
        st.tuples(st.just("mask"), d, uport),
        st.tuples(st.just("clear"), d, uport),
        st.tuples(st.just("ack"), d),
    ), max_size=40)


def _real(doms, op):
    kind, d, *args = op
    dom = doms[d]
    ch = dom.evtchn
    try:
        if kind == "alloc":
            return ch.alloc_unbound(args[0])
        if kind == "bind":
            return ch.bind_interdomain(*args)
        if kind == "ipi":
            return ch.bind_ipi(0)
        if kind == "virq":
            return ch.bind_virq(args[0], 0)
        if kind == "fire":
            return ch.send_virq(args[0], 0)
        if kind == "send":
            return ch.send(args[0])
        if kind == "close":
            return ch.close(args[0])
        if kind == "unmask":
            return ch.unmask(args[0])
    except EventError as e:
        return e.errno
    if kind == "mask":
        guest_mask(dom, args[0])
    elif kind == "clear":
        guest_clear_pending(dom, args[0])
    elif kind == "ack":
        guest_ack(dom)
    return None


def _compare(model, doms, where):
    for d, dom in doms.items():
        want_pending = sum(1 << p for p in model.pending[d])
        assert pending_word(dom) == want_pending, (where, d, "pending")
        assert mask_word(dom) == sum(1 << p for p in model.mask[d]), (where, d, "mask")
        assert sel(dom) == model.sel[d], (where, d, "selector")
        assert upcall_pending(dom) == model.upcall[d], (where, d, "upcall_pending")
        for p in range(1, 64):
            s = dom.evtchn.status(p)
            m = model.ports[d].get(p)
            if m is None:
                assert s.state == EvtchnStat.closed, (where, d, p)
            elif m[0] == "unbound":
                assert (s.state, s.remote_dom) == (EvtchnStat.unbound, m[1]), (where, d, p)
            elif m[0] == "interdomain":
                assert (s.state, s.remote_dom, s.remote_port) == \
                    (EvtchnStat.interdomain, m[1], m[2]), (where, d, p)
            elif m[0] == "ipi":
                assert s.state == EvtchnStat.ipi, (where, d, p)
            else:
                assert (s.state, s.virq) == (EvtchnStat.virq, m[1]), (where, d, p)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_two_level_semantics_property(data):
    async def run():
        async with Hypervisor(memory_mib=32) as hv:
            a = await _paused(hv, "a")
            b = await _paused(hv, "b")
            doms = {a.domid: a, b.domid: b}
            ops = data.draw(_ops([a.domid, b.domid]))
            model = Model(list(doms), {d: {p: dom.evtchn.ports[p].remote_port
                                              for p in (dom.store_port, dom.console_port)}
                                          for d, dom in doms.items()})
            for i, op in enumerate(ops):
                if op[0] == "send":
                    # Sending on a VIRQ port is its own test (test_send_on_virq_port_is_einval).
                    s = model.ports[op[1]].get(op[2])
                    if s is not None and s[0] == "virq":
                        continue
                want = model.apply(op)
                got = _real(doms, op)
                assert got == want, (i, op, got, want)
                _compare(model, doms, (i, op))
    asyncio.run(run())
