"""Red team (s19): a vif's task cancelled twice while it ends (the domain's TaskGroup
cancels it, then a second cancel -- the hypervisor's shutdown, an unplug -- arrives while
the task awaits its spare tap writer, TapWriter.aclose, added with the awaited stop). The
tap's fd was already taken from the vif (_release_tap) and was closed only after that
await: the second cancel skipped the close, and the fd -- with it the tap's netdev, which
the kernel keeps while an fd is open -- stayed open for the life of the process. Linux
netback's xenvif_free always closes; here the close is in a finally that a cancel cannot
skip, exactly once (the worker thread's close or, if that job never ran, the loop's)."""
from __future__ import annotations

import asyncio
import os
import threading

from aiovmm import Hypervisor
from test_mutation_kills_net import Vif


def test_a_second_cancel_while_the_spare_writer_ends_still_closes_the_tap():
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            v = Vif(hv)
            fd = v.host.fileno()
            ino = os.fstat(fd).st_ino
            threads0 = {t for t in threading.enumerate() if t.name.startswith("tapw-")}
            v.nb.start_writer()                      # a migrated-in vif's writer made ahead
            spare = v.nb._spare[1]
            task = asyncio.create_task(v.nb._run())
            for _ in range(5):
                await asyncio.sleep(0)               # in InitWait, on the frontend's watch
            task.cancel()
            await asyncio.sleep(0)                   # now in the finally, awaiting aclose
            assert not spare._ended.done()
            task.cancel()                            # the second cancel
            try:
                await task
            except asyncio.CancelledError:
                pass
            for _ in range(200):                     # the close may be the worker thread's
                try:
                    still = os.fstat(fd).st_ino == ino
                except OSError:
                    still = False
                if not still:
                    break
                await asyncio.sleep(0.01)
            v.host.detach()                          # its fd is the vif's to close
            v.out.close()
            if still:
                os.close(fd)                         # (the leak, not left to the next test)
            assert not still, "the tap's fd is still open"
            assert v.nb.fd is None
            await asyncio.wait_for(asyncio.shield(spare._ended), 5)
            assert {t for t in threading.enumerate() if t.name.startswith("tapw-")} <= threads0
    asyncio.run(main())
