"""The toolstack's part of domain creation (libxl's job on Xen): xenstore entries for a new
domain and its devices, and the connection of its xenstore ring to the daemon.

Keys follow libxl (xen-pv-abi.md §2.5, §11.3, §12.2, §13): the home /local/domain/<id> is
owned by dom0 and readable by the guest; the guest may write under device/, data/, control/
and its device frontend directories.
"""
from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from . import grants
from .xenstore.core import XsError

if TYPE_CHECKING:
    from .domain import Domain
    from .hypervisor import Hypervisor

log = logging.getLogger("aiovmm.toolstack")


def _perms(owner: int, *readers: int, default: str = "n") -> list[str]:
    return [f"{default}{owner}"] + [f"r{r}" for r in readers]


def introduce(hv: "Hypervisor", dom: "Domain") -> None:
    """Create the domain's home and the standard keys, then introduce it to xenstored."""
    st = hv.xenstore.store
    d = dom.domid
    home = f"/local/domain/{d}"
    st.introduce(d, dom.store_mfn, dom.store_port, create_home=False)
    st.write(home, "")
    st.set_perms(home, _perms(0, d))
    keys = {
        "domid": str(d),
        "name": dom.name,
        "vm": f"/vm/{dom.uuid}",
        "memory/static-max": str(dom.max_pages * 4),
        "memory/target": str(dom.nr_pages * 4),
        "memory/videoram": "-1",
        "store/port": str(dom.store_port),
        "store/ring-ref": str(dom.store_mfn),
        "console/port": str(dom.console_port),
        "console/ring-ref": str(dom.console_mfn),
        "console/limit": "1048576",
        "console/type": "xenconsoled",
        "console/output": "pty",
        "console/backend-id": "0",
    }
    for i in range(max(1, len(dom.vcpus))):       # libxl: one per vCPU (Linux's cpu_hotplug)
        keys[f"cpu/{i}/availability"] = "online"
    for k, v in keys.items():
        st.write(f"{home}/{k}", v)
        st.set_perms(f"{home}/{k}", _perms(0, d))
    for sub in ("device", "data", "control", "attr", "error"):
        st.write(f"{home}/{sub}", "")
        st.set_perms(f"{home}/{sub}", _perms(d))
    st.write(f"/vm/{dom.uuid}/name", dom.name)


def release(hv: "Hypervisor", dom: "Domain") -> None:
    st = hv.xenstore.store
    if st.is_introduced(dom.domid):
        st.release(dom.domid)
    for path in (f"/vm/{dom.uuid}", f"/local/domain/0/backend/vif/{dom.domid}",
                 f"/local/domain/0/backend/vbd/{dom.domid}"):
        try:
            st.rm(path)
        except XsError as e:
            if e.errno != errno.ENOENT:          # absent (no such device) is the normal case
                log.warning("d%d: cannot remove %s from xenstore: %s", dom.domid, path, e)


async def serve_store_ring(hv: "Hypervisor", dom: "Domain") -> None:
    """Connect the guest's xenstore ring (reserved grant 1, start_info store_evtchn) to the
    daemon, and kick the connection on every event from the guest. Runs until cancelled."""
    mapping = grants.host_map(dom, grants.GNTTAB_RESERVED_XENSTORE)
    port = hv.host.endpoint_bind(dom.domid, dom.store_port)
    transport = None
    try:
        transport = hv.xenstore.serve_ring(dom.domid, mapping.view, port.notify)
        while True:
            await port.wait()
            transport.kick()
    finally:
        # The connection ends with the port: a watch firing later (the home removed on
        # release) must not notify a closed port.
        if transport is not None:
            transport.close()
        port.close()
        mapping.close()
