"""Console backend: the guest's xencons ring page and event channel <-> the host.

Guest output (out[] ring) goes to the same place as console_io output: the domain's console
stream (`aiovmm run` stdout, tests' console_lines) and the per-domain log file. Host input
(`write_input`) goes to the in[] ring. The ring page is reached through the reserved grant
GNTTAB_RESERVED_CONSOLE, as Xen's console daemon does, and indices are distrusted: a guest
that publishes more than the ring holds has the excess ignored and counted.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING

from aiovmm import grants

if TYPE_CHECKING:
    from aiovmm.domain import Domain

log = logging.getLogger("aiovmm.backends.console")

IN_OFF, IN_SIZE = 0, 1024
OUT_OFF, OUT_SIZE = 1024, 2048
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 3072, 3076, 3080, 3084
_U32 = struct.Struct("<I")


class ConsoleBackend:
    def __init__(self, dom: "Domain") -> None:
        self.dom = dom
        self.port = None
        self.mapping = None
        self.bad_indices = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self._held_back = False        # output left in the ring for lack of budget

    def connect(self) -> None:
        hv = self.dom.hypervisor
        self.mapping = grants.host_map(self.dom, grants.GNTTAB_RESERVED_CONSOLE)
        self.port = hv.host.endpoint_bind(self.dom.domid, self.dom.console_port)

    async def run(self) -> None:
        """Serve the ring until cancelled (the domain's TaskGroup owns this task)."""
        self.connect()
        rate = self.dom.console_rate
        try:
            while True:
                self.drain()
                self.flush_input()
                if self._held_back:
                    # Over the domain's output budget: its output stays in the ring (the
                    # guest waits for room) until the budget allows a ring's worth more, as
                    # xenconsoled stops reading a domain for the rest of its rate period.
                    await asyncio.sleep(rate.wait_s(OUT_SIZE))
                else:
                    await self.port.wait()
        finally:
            # Cancelled: by the domain's end (read already, this is a no-op) or by a
            # hypervisor error that ended its TaskGroup (the guest's last output is read
            # here, before the mapping goes).
            self.drain_final()
            self.close()

    def queue_input(self, data: bytes) -> None:
        """Host input for the guest: kept in the domain's input queue and moved into the
        ring as space allows (now, at connection, and whenever the guest notifies)."""
        self.dom.console_input += data
        self.flush_input()

    def flush_input(self) -> None:
        pending = self.dom.console_input
        if pending and self.mapping is not None and not self.mapping.closed:
            n = self.write_input(bytes(pending))
            del pending[:n]

    def _u32(self, off: int) -> int:
        return _U32.unpack_from(self.mapping.view, off)[0]

    def drain(self, final: bool = False) -> int:
        """Consume guest output now in the ring, as much as the domain's output budget
        allows (all of it when `final`); returns bytes consumed."""
        self._held_back = False
        v = self.mapping.view
        cons, prod = self._u32(OUT_CONS), self._u32(OUT_PROD)
        avail = (prod - cons) & 0xFFFFFFFF
        if avail == 0:
            return 0
        if avail > OUT_SIZE:
            self.bad_indices += 1
            # Logged once per domain (then counted): a guest that keeps doing it must not be
            # able to fill the host's log.
            log.log(logging.WARNING if self.bad_indices == 1 else logging.DEBUG,
                    "d%d: console out_prod %d is %d past out_cons: resynchronising (%d times)",
                    self.dom.domid, prod, avail, self.bad_indices)
            _U32.pack_into(v, OUT_CONS, prod)
            return 0
        allowed = avail if final else self.dom.console_rate.available()
        self._held_back = avail > allowed
        if self._held_back:
            prod = (cons + allowed) & 0xFFFFFFFF           # the rest stays in the ring
        out = bytearray()
        while cons != prod:
            start = cons & (OUT_SIZE - 1)
            n = min((prod - cons) & 0xFFFFFFFF, OUT_SIZE - start)
            out += v[OUT_OFF + start:OUT_OFF + start + n]
            cons = (cons + n) & 0xFFFFFFFF
        if not out:
            return 0
        _U32.pack_into(v, OUT_CONS, cons)
        self.bytes_out += len(out)
        self.dom.console_write(bytes(out), final=final)
        self.port.notify()
        return len(out)

    def drain_final(self) -> None:
        """Last output a guest left in the ring before it stopped."""
        if self.mapping is not None and not self.mapping.closed and self.port is not None:
            self.drain(final=True)

    def write_input(self, data: bytes) -> int:
        """Queue host input for the guest; returns bytes accepted (the ring may be full)."""
        v = self.mapping.view
        cons, prod = self._u32(IN_CONS), self._u32(IN_PROD)
        used = (prod - cons) & 0xFFFFFFFF
        if used > IN_SIZE:
            self.bad_indices += 1
            return 0
        n = min(len(data), IN_SIZE - used)
        for i in range(n):
            v[IN_OFF + ((prod + i) & (IN_SIZE - 1))] = data[i]
        _U32.pack_into(v, IN_PROD, (prod + n) & 0xFFFFFFFF)
        self.bytes_in += n
        if n:
            self.port.notify()
        return n

    def close(self) -> None:
        if self.port is not None:
            self.port.close()
            self.port = None
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
