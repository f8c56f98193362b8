"""The control plane drives the credit scheduler and the I/O limits of a running domain."""
from __future__ import annotations

import time

from .ctlhelp import guest


def cpu_share(daemon, name: str, seconds: float = 2.0) -> float:
    """% of wall time the domain's vCPU ran (from the vcpus API, the scheduler's accounting)."""
    t0 = daemon.api("GET", f"/api/v1/domains/{name}/vcpus")["vcpus"][0]["time_s"]
    w0 = time.monotonic()
    time.sleep(seconds)
    v = daemon.api("GET", f"/api/v1/domains/{name}/vcpus")["vcpus"][0]
    return 100 * (v["time_s"] - t0) / (time.monotonic() - w0)


def test_cfg_cap_then_sched_credit_changes_it_at_run_time(daemon):
    cfg = daemon.write_cfg("hogc", kernel=guest("hog"), memory=8, cap=25, weight=300)
    daemon.ok("create", cfg)
    try:
        daemon.wait_console("hogc", r"hog: ready")
        s = daemon.api("GET", "/api/v1/domains/hogc/sched-credit")
        assert (s["weight"], s["cap"]) == (300, 25)
        capped = cpu_share(daemon, "hogc")
        # The cap is a share of wall time, so it holds however loaded the host is.
        assert 20 <= capped <= 30, capped
        v = daemon.api("GET", "/api/v1/domains/hogc/vcpus")["vcpus"][0]
        assert v["wait_s"] > 0 and v["slices"] > 0 and v["priority"] in ("BOOST", "UNDER", "OVER")
        daemon.ok("sched-credit", "-d", "hogc", "-c", "0")
        free = cpu_share(daemon, "hogc")
        assert free > capped + 15, (capped, free)
        assert "aiovmm_vcpu_runqueue_wait_seconds" in daemon.request("GET", "/metrics")[1]
        # No such device; a vbd key on no device; a bad vif rate is refused before lookup.
        code, body = daemon.request("PUT", "/api/v1/domains/hogc/io-limit/xvda", {"iops": 500})
        assert code == 404, body
        code, body = daemon.request("PUT", "/api/v1/domains/hogc/io-limit/xvda", {"iops": 0})
        assert code == 400, body
    finally:
        daemon.ok("destroy", "hogc")
