"""The control plane drives the credit scheduler and the I/O limits of a running domain."""
from __future__ import annotations

import time

from .ctlhelp import guest


def cpu_share(daemon, name: str, seconds: float = 2.0) -> tuple[float, float]:
    """% of wall time the domain's vCPU ran in slices, and % it used in CPU time (slice time
    minus host steal: what the scheduler charges and caps), from the vcpus API."""
    v0 = daemon.api("GET", f"/api/v1/domains/{name}/vcpus")["vcpus"][0]
    w0 = time.monotonic()
    time.sleep(seconds)
    v = daemon.api("GET", f"/api/v1/domains/{name}/vcpus")["vcpus"][0]
    wall = time.monotonic() - w0
    ran = v["time_s"] - v0["time_s"]
    return 100 * ran / wall, 100 * (ran - (v["host_steal_s"] - v0["host_steal_s"])) / wall


def test_cfg_cap_then_sched_credit_changes_it_at_run_time(daemon):
    cfg = daemon.write_cfg("hogc", kernel=guest("hog"), memory=8, cap=25, weight=300)
    daemon.ok("create", cfg)
    try:
        daemon.wait_console("hogc", r"hog: ready")
        s = daemon.api("GET", "/api/v1/domains/hogc/sched-credit")
        assert (s["weight"], s["cap"]) == (300, 25)
        ran, capped = cpu_share(daemon, "hogc")
        # The cap is CPU time per wall time, so it holds however loaded the host is; not
        # stricter: its slices (with what the host took meanwhile) fill 20 % of the wall.
        assert capped <= 30 and ran >= 20, (ran, capped)
        v = daemon.api("GET", "/api/v1/domains/hogc/vcpus")["vcpus"][0]
        # wait_s: time queued behind other vCPUs; a lone capped vCPU is parked, not queued,
        # and with Xen's 30 ms time slice (scheduler.TSLICE_NS) it may never wait at all.
        assert v["wait_s"] >= 0 and v["slices"] > 0 and v["priority"] in ("BOOST", "UNDER", "OVER")
        daemon.ok("sched-credit", "-d", "hogc", "-c", "0")
        free, _ = cpu_share(daemon, "hogc")
        assert free > capped + 15, (capped, free)
        assert "aiovmm_vcpu_runqueue_wait_seconds" in daemon.request("GET", "/metrics")[1]
        # No such device; a vbd key on no device; a bad vif rate is refused before lookup.
        code, body = daemon.request("PUT", "/api/v1/domains/hogc/io-limit/xvda", {"iops": 500})
        assert code == 404, body
        code, body = daemon.request("PUT", "/api/v1/domains/hogc/io-limit/xvda", {"iops": 0})
        assert code == 400, body
    finally:
        daemon.ok("destroy", "hogc")
