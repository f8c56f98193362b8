"""Save, restore and (later) live migration in Xen's migration stream v2.

Modules:
- suspend.py: Xen's cooperative suspend of a PV guest (control/shutdown = suspend, the
  guest's SCHEDOP_shutdown(SHUTDOWN_suspend) with its start_info frame in RDX), and the
  resume of a cancelled suspend.
- stream.py: the record layer: xl's save-file header, libxl records, libxc records
  (docs/specs/libxc-migration-stream.pandoc, libxl-migration-stream.pandoc), written and
  read with every length and count checked (the reader treats the stream as untrusted).
- save.py: a suspended domain -> stream (page-table pages canonicalised MFN -> PFN).
- restore.py: stream -> a new domain, all-or-nothing (validated before anything is built,
  torn down on any later failure).
- context.py: vcpu_guest_context / ext_vcpucontext layouts and the XSAVE record
  (X86_PV_VCPU_BASIC/EXTENDED/XSAVE).
- files.py: save files through aiofiles (`Domain.save`, `Hypervisor.restore`).
- live.py: daemon-to-daemon live migration (HMAC handshake, pre-copy, READY/GO/DONE).
- dirty.py: the sender's shadow copy of what the receiver has, and the pages changed since.
- priority.py: real-time priority for the stop-and-copy and a file's restore (the downtime).
- fuzz.py: the mutated-stream fuzzer of the receiver (tests and bench/migrate.py).
"""


async def load(module: str) -> None:
    """Import aiovmm.migration.<module> in a worker thread, not on the event loop: its
    first import pulls in scapy (announce.py) and the backends, 0.5-2.5 s of Python in
    which every guest on the loop would stand still (the first restore of a daemon
    stopped a running neighbour for 2.5 s under load). Later calls cost nothing."""
    import asyncio
    import importlib
    import sys
    name = f"{__name__}.{module}"
    if name not in sys.modules:
        await asyncio.to_thread(importlib.import_module, name)
