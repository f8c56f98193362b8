"""Event channels, 2-level ABI (Xen's event_channel.c + event_2l.c semantics).

Pending and mask bits live in the domain's shared_info page (guest-visible), per-port state
lives here. `set_pending` follows Xen's order exactly: pending bit, then (if unmasked) the
vCPU's selector bit, then evtchn_upcall_pending, then a kick that wakes a blocked vCPU.

Host-side endpoints for backends arrive with the device-channel issue; the port table already
records interdomain peers so that both ends of a channel can be in this hypervisor.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
from typing import TYPE_CHECKING

from .abi import (
    DOMID_SELF, EVTCHN_2L_NR_CHANNELS, NR_VIRQS, PER_VCPU_VIRQS, Errno, EvtchnStat, SharedInfo,
    VcpuInfo, VCPU_INFO_SIZE,
)

if TYPE_CHECKING:
    from .domain import Domain

log = logging.getLogger("aiovmm.events")
_U64 = struct.Struct("<Q")


class EventError(Exception):
    def __init__(self, errno: Errno, msg: str = "") -> None:
        super().__init__(msg or errno.name)
        self.errno = errno


@dataclasses.dataclass
class Port:
    state: EvtchnStat = EvtchnStat.closed
    vcpu: int = 0                  # notified vCPU
    virq: int = -1
    remote_dom: int = 0            # unbound: who may bind; interdomain: the peer
    remote_port: int = 0


_CLOSED = Port()      # shared, never mutated: the state of every port not in a table


class EventChannels:
    """The port table of one domain."""

    def __init__(self, domain: "Domain", nr_ports: int = EVTCHN_2L_NR_CHANNELS) -> None:
        self.dom = domain
        self.nr_ports = nr_ports
        # Only ports in use are stored (a 4096-entry table per domain cost 7 ms to build);
        # a missing port is closed. Port 0 is never handed out.
        self.ports: dict[int, Port] = {}
        self.virq_ports: dict[tuple[int, int], int] = {}   # (virq, vcpu) -> port

    # -- shared_info bit helpers ------------------------------------------------------------------
    @property
    def _si(self) -> int:
        return self.dom.shared_info_maddr

    def _test_and_set(self, byte_addr: int, bit: int) -> bool:
        """Xen's guest_test_and_set_bit: a locked `or` (also a full barrier), so the guest's
        own locked clear of a neighbouring bit in the same byte is never lost."""
        return bool(self.dom.mem.atomic_or8(byte_addr, bit) & bit)

    def _bit(self, off: int, port: int) -> tuple[int, int]:
        return self._si + off + (port >> 3), 1 << (port & 7)

    def is_pending(self, port: int) -> bool:
        a, b = self._bit(SharedInfo.evtchn_pending, port)
        return bool(self.dom.mem.map[a] & b)

    def is_masked(self, port: int) -> bool:
        a, b = self._bit(SharedInfo.evtchn_mask, port)
        return bool(self.dom.mem.map[a] & b)

    def _clear_bit(self, off: int, port: int) -> bool:
        """Xen's guest_test_and_clear_bit (locked `and`); returns whether the bit was set."""
        a, b = self._bit(off, port)
        return bool(self.dom.mem.atomic_and8(a, ~b & 0xFF) & b)

    def _mark_vcpu_pending(self, vcpu_id: int, word: int) -> None:
        v = self.dom.vcpu(vcpu_id)              # its vcpu_info may have moved (register_vcpu_info)
        vi = v.info_maddr if v is not None else self._si + VCPU_INFO_SIZE * vcpu_id
        sel_addr = vi + VcpuInfo.evtchn_pending_sel
        if self._test_and_set(sel_addr + (word >> 3), 1 << (word & 7)):
            return
        self.dom.mem.atomic_or8(vi + VcpuInfo.evtchn_upcall_pending, 1)
        vcpu = self.dom.vcpu(vcpu_id)
        if vcpu is not None:
            vcpu.kick()

    def set_pending(self, port: int) -> None:
        """Raise an event on `port` (Xen's evtchn_2l_set_pending)."""
        a, b = self._bit(SharedInfo.evtchn_pending, port)
        already = self._test_and_set(a, b)     # locked: a full barrier, the guest's scan sees it
        p = self.ports.get(port, _CLOSED)
        vcpu = self.dom.vcpu(p.vcpu)
        if vcpu is not None:
            vcpu.poll_kick(port)
        if already:
            return
        if not self.is_masked(port):
            self._mark_vcpu_pending(p.vcpu, port >> 6)

    # -- port allocation -----------------------------------------------------------------------------
    def _alloc(self) -> int:
        for i in range(1, self.nr_ports):
            if i not in self.ports:
                return i
        raise EventError(Errno.ENOSPC, "no free event channel")

    def _port(self, port: int) -> Port:
        # Port 0 is valid but reserved (always reads as closed), as in Xen.
        if not 0 <= port < self.nr_ports:
            raise EventError(Errno.EINVAL, f"bad port {port}")
        return self.ports.get(port, _CLOSED)

    def _check_vcpu(self, vcpu: int) -> None:
        if self.dom.vcpu(vcpu) is None:
            raise EventError(Errno.ENOENT, f"no vCPU {vcpu}")

    # -- operations ------------------------------------------------------------------------------------
    def alloc_unbound(self, remote_dom: int) -> int:
        if remote_dom == DOMID_SELF:
            remote_dom = self.dom.domid
        port = self._alloc()
        self.ports[port] = Port(EvtchnStat.unbound, 0, -1, remote_dom, 0)
        return port

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        if remote_dom == DOMID_SELF:
            remote_dom = self.dom.domid
        rd = self.dom.hypervisor.domain(remote_dom)
        if rd is None:
            raise EventError(Errno.ESRCH, f"no domain {remote_dom}")
        rch = rd.evtchn
        port = self._alloc()                      # Xen's order: ENOSPC before EINVAL
        # _port is the one range check (EINVAL); port 0 reads closed, so it is refused below.
        rp = rch._port(remote_port)
        if rp.state != EvtchnStat.unbound or rp.remote_dom != self.dom.domid:
            raise EventError(Errno.EINVAL, "remote port is not offered to this domain")
        self.ports[port] = Port(EvtchnStat.interdomain, 0, -1, remote_dom, remote_port)
        rp.state = EvtchnStat.interdomain
        rp.remote_dom, rp.remote_port = self.dom.domid, port
        self.set_pending(port)          # cover notifications sent before the bind
        return port

    def bind_virq(self, virq: int, vcpu: int) -> int:
        if not 0 <= virq < NR_VIRQS:
            raise EventError(Errno.EINVAL, f"bad virq {virq}")
        if virq not in PER_VCPU_VIRQS and vcpu != 0:
            raise EventError(Errno.EINVAL, "global virq must bind to vCPU 0")
        self._check_vcpu(vcpu)
        if (virq, vcpu) in self.virq_ports:
            raise EventError(Errno.EEXIST, f"virq {virq} already bound")
        port = self._alloc()
        self.ports[port] = Port(EvtchnStat.virq, vcpu, virq)
        self.virq_ports[(virq, vcpu)] = port
        return port

    def bind_ipi(self, vcpu: int) -> int:
        self._check_vcpu(vcpu)
        port = self._alloc()
        self.ports[port] = Port(EvtchnStat.ipi, vcpu)
        return port

    def close(self, port: int) -> None:
        p = self._port(port)
        if p.state == EvtchnStat.closed:          # port 0 included: never allocated
            raise EventError(Errno.EINVAL, f"port {port} is not in use")
        if p.state == EvtchnStat.virq:
            self.virq_ports.pop((p.virq, p.vcpu), None)
        elif p.state == EvtchnStat.interdomain:
            rd = self.dom.hypervisor.domain(p.remote_dom)
            if rd is not None:
                rp = rd.evtchn.ports.get(p.remote_port, _CLOSED)
                if rp.state == EvtchnStat.interdomain and rp.remote_port == port:
                    rp.state = EvtchnStat.unbound
                    rp.remote_dom, rp.remote_port = self.dom.domid, 0
        self._clear_bit(SharedInfo.evtchn_pending, port)
        self.ports.pop(port, None)

    def send(self, port: int) -> None:
        p = self._port(port)
        if p.state == EvtchnStat.interdomain:
            rd = self.dom.hypervisor.domain(p.remote_dom)
            if rd is not None:
                rd.evtchn.set_pending(p.remote_port)
        elif p.state == EvtchnStat.ipi:
            self.set_pending(port)
            target = self.dom.vcpu(p.vcpu)
            if target is not None:
                target.ipi_code_sync()
        elif p.state == EvtchnStat.unbound:
            pass
        else:
            raise EventError(Errno.EINVAL, f"port {port} is closed")

    def unmask(self, port: int) -> None:
        p = self._port(port)
        # Port 0 is valid here (Xen's evtchn_unmask treats it as any port_is_valid port).
        if self._clear_bit(SharedInfo.evtchn_mask, port) and self.is_pending(port):
            self._mark_vcpu_pending(p.vcpu, port >> 6)

    def bind_vcpu(self, port: int, vcpu: int) -> None:
        self._check_vcpu(vcpu)                    # Xen's order: ENOENT before EINVAL
        p = self._port(port)
        if p.state in (EvtchnStat.closed,):
            raise EventError(Errno.EINVAL, f"port {port} is closed")
        if p.state == EvtchnStat.ipi or (p.state == EvtchnStat.virq and p.virq in PER_VCPU_VIRQS):
            raise EventError(Errno.EINVAL, "per-vCPU port cannot move")
        p.vcpu = vcpu

    def status(self, port: int) -> Port:
        return self._port(port)

    def reset(self) -> None:
        for i in sorted(self.ports):
            if i in self.ports:
                self.close(i)

    # -- VIRQs -------------------------------------------------------------------------------------------
    def send_virq(self, virq: int, vcpu: int = 0) -> None:
        port = self.virq_ports.get((virq, vcpu))
        if port is not None:
            self.set_pending(port)


# ------------------------------------------------------------------- the hypercall (#32)
_ST_U16_U16_U32 = struct.Struct("<HHI")      # alloc_unbound: dom, remote_dom, port
_ST_U16_2_U32_U32 = struct.Struct("<H2xII")  # bind_interdomain: remote_dom, remote_port, local_port
_ST_U32_U32_U32 = struct.Struct("<III")      # bind_virq: virq, vcpu, port
_ST_U32_U32 = struct.Struct("<II")
_ST_U32 = struct.Struct("<I")


def do_event_channel_op(v, cmd: int, arg: int, *_) -> int:
    from .abi import DOMID_SELF, EvtchnOp, EVTCHN_STATUS
    ch: EventChannels = v.domain.evtchn
    me = v.domain.domid
    if cmd == EvtchnOp.alloc_unbound:
        dom, remote, _ = v.read_struct(arg, _ST_U16_U16_U32)
        if dom not in (DOMID_SELF, me):
            raise EventError(Errno.EPERM, "alloc_unbound for another domain")
        port = ch.alloc_unbound(remote)
        v.copy_to_guest(arg + 4, _ST_U32.pack(port))
        return 0
    if cmd == EvtchnOp.bind_interdomain:
        rdom, rport, _ = v.read_struct(arg, _ST_U16_2_U32_U32)
        port = ch.bind_interdomain(rdom, rport)
        v.copy_to_guest(arg + 8, _ST_U32.pack(port))
        return 0
    if cmd == EvtchnOp.bind_virq:
        virq, vcpu, _ = v.read_struct(arg, _ST_U32_U32_U32)
        port = ch.bind_virq(virq, vcpu)
        v.copy_to_guest(arg + 8, _ST_U32.pack(port))
        return 0
    if cmd == EvtchnOp.bind_ipi:
        vcpu, _ = v.read_struct(arg, _ST_U32_U32)
        port = ch.bind_ipi(vcpu)
        v.copy_to_guest(arg + 4, _ST_U32.pack(port))
        return 0
    if cmd == EvtchnOp.close:
        (port,) = v.read_struct(arg, _ST_U32)
        ch.close(port)
        return 0
    if cmd == EvtchnOp.send:
        (port,) = v.read_struct(arg, _ST_U32)
        ch.send(port)
        return 0
    if cmd == EvtchnOp.unmask:
        (port,) = v.read_struct(arg, _ST_U32)
        ch.unmask(port)
        return 0
    if cmd == EvtchnOp.bind_vcpu:
        port, vcpu = v.read_struct(arg, _ST_U32_U32)
        ch.bind_vcpu(port, vcpu)
        return 0
    if cmd == EvtchnOp.status:
        dom, _p, *_rest = v.read_struct(arg, EVTCHN_STATUS)
        port = _p
        if dom not in (DOMID_SELF, me):
            raise EventError(Errno.EPERM)
        p = ch.status(port)
        u1, u2 = 0, 0
        if p.state == EvtchnStat.unbound:
            u1 = p.remote_dom
        elif p.state == EvtchnStat.interdomain:
            u1, u2 = p.remote_dom, p.remote_port
        elif p.state == EvtchnStat.virq:
            u1 = p.virq
        out = struct.pack("<II", int(p.state), p.vcpu)
        if p.state == EvtchnStat.virq:
            out += struct.pack("<II", u1, 0)
        else:
            out += struct.pack("<HHI", u1, 0, u2)
        v.copy_to_guest(arg + 8, out)
        return 0
    if cmd == EvtchnOp.reset:
        (dom,) = struct.unpack("<H", v.copy_from_guest(arg, 2))
        if dom not in (DOMID_SELF, me):
            raise EventError(Errno.EPERM)
        ch.reset()
        return 0
    if cmd == EvtchnOp.bind_pirq:
        raise EventError(Errno.EPERM)
    raise EventError(Errno.ENOSYS)


# ------------------------------------------------------------------ host-side endpoints
class HostPort:
    """A host backend's end of an interdomain event channel (the host is domid 0).

    `await port.wait()` returns when the guest has notified since the last wait (edge
    events coalesce, as pending bits do); `port.notify()` raises the event in the guest.
    """

    def __init__(self, host: "HostEvents", port: int) -> None:
        self.host = host
        self.port = port
        self._event = asyncio.Event()
        self.notifications = 0
        self._linked: asyncio.Event | None = None

    def link(self, event: asyncio.Event) -> None:
        """Also set `event` on every guest notification: a backend that already waits on
        its own wake-up event (tap readable, I/O done) saves a task hop per event."""
        self._linked = event

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()

    def pending(self) -> bool:
        return self._event.is_set()

    def notify(self) -> None:
        self.host.send(self.port)

    def close(self) -> None:
        self.host.close(self.port)


class HostEvents(EventChannels):
    """The host's (domid 0) port table: same port semantics as a guest's, but a pending
    port wakes an asyncio waiter instead of setting bits in a shared_info page."""

    def __init__(self, hv) -> None:
        self.hypervisor = hv
        self.domid = 0
        self.dom = self                      # EventChannels reaches the hypervisor via .dom
        self.nr_ports = EVTCHN_2L_NR_CHANNELS
        self.ports = {}
        self.virq_ports = {}
        self.endpoints: dict[int, HostPort] = {}

    def vcpu(self, i: int):
        return None

    def set_pending(self, port: int) -> None:
        ep = self.endpoints.get(port)
        if ep is not None:
            ep.notifications += 1
            ep._event.set()
            if ep._linked is not None:
                ep._linked.set()

    def is_pending(self, port: int) -> bool:
        ep = self.endpoints.get(port)
        return bool(ep and ep.pending())

    def is_masked(self, port: int) -> bool:
        return False

    def _clear_bit(self, off: int, port: int) -> None:
        ep = self.endpoints.get(port)
        if ep is not None:
            ep._event.clear()

    def endpoint_alloc_unbound(self, remote_dom: int) -> HostPort:
        port = self.alloc_unbound(remote_dom)
        ep = self.endpoints[port] = HostPort(self, port)
        return ep

    def endpoint_bind(self, remote_dom: int, remote_port: int) -> HostPort:
        """Bind to a port the guest (or its builder) allocated unbound for domid 0."""
        port = self._alloc()
        ep = self.endpoints[port] = HostPort(self, port)
        try:
            self.bind_interdomain(remote_dom, remote_port)  # allocates `port` again (lowest free)
        except EventError:
            del self.endpoints[port]
            raise
        return ep

    def close(self, port: int) -> None:
        try:
            super().close(port)
        except EventError:
            pass
        self.endpoints.pop(port, None)
