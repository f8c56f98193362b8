"""Red team (backends, 2026-12-02, round s19): a guest event before netback serves.

`_connect` binds the event channel, then `_run` awaits the tap's creation and bridge attach
before `_serve` makes the `_stop` future. A notification in that window (a frontend that
sends as soon as its rings are granted; any guest can) went through `_on_guest_event` to
`_schedule`, and the `_poll` it scheduled read `self._stop.done()` on None: an
AttributeError out of a loop callback ("Exception in callback Netback._poll"), once per
connect, at the guest's will. As Linux netback, whose interrupt handler only wakes a kthread
that is there from the connect on, an early event is only a pass later: the pass that
`_serve` runs first takes the request.

The real Netback on a parked domain's rings (the harness of test_mutation_kills_net.py).
"""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor
from aiovmm.audit import audit
from backends.net.device import NETIF_RSP_OKAY
from test_mutation_kills_net import PKT, Vif


def test_an_event_before_serving_is_no_exception_and_no_lost_request():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        async with Hypervisor(memory_mib=64) as hv:
            v = Vif(hv)
            nb = v.nb
            try:
                assert nb._stop is None                 # connected, not serving yet
                v.push((v.data_ref, 0, 0, 1, len(PKT)))
                nb._on_guest_event()                   # the guest's EVTCHNOP_send
                for _ in range(3):
                    await asyncio.sleep(0)
                assert not errors, errors
                assert nb.tx.req_cons == 0              # not taken before serving ...
                nb._stop = loop.create_future()         # ... but by _serve's first pass
                nb._poll()
                assert nb.tx.req_cons == 1 and v.responses(1) == [(1, NETIF_RSP_OKAY)]
                assert v.sent() == [PKT]
            finally:
                nb._disconnect()
                v.close()
            assert audit(hv) == []
        assert not errors, errors

    asyncio.run(main())
