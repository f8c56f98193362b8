"""Numbers for monitoring: per-domain CPU time (a metering scheduler), event-loop lag, and
the Prometheus exposition at /metrics (prometheus-client, a registry of our own)."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..abi import Hypercall
from ..scheduler import Scheduler

if TYPE_CHECKING:
    from ..vcpu import VCPU
    from .daemon import Controller

log = logging.getLogger("aiovmm.control.metrics")

LAG_INTERVAL_S = 0.1
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class MeteredScheduler(Scheduler):
    """The credit scheduler (aiovmm/scheduler.py), which itself accounts each vCPU's CPU
    time, run-queue wait and host steal (xl list's Time(s), vcpu-list, top, /metrics)."""


class LoopLag:
    """How late the event loop wakes a task that sleeps LAG_INTERVAL_S (every domain's slices
    and every request share the loop, so this is what a timer or a request waits)."""

    def __init__(self) -> None:
        self.last = 0.0
        self.max = 0.0
        self.buckets = [0] * (len(LAG_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, lag: float) -> None:
        self.last = lag
        self.max = max(self.max, lag)
        self.sum += lag
        self.count += 1
        for i, b in enumerate(LAG_BUCKETS):
            if lag <= b:
                self.buckets[i] += 1
                return
        self.buckets[-1] += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(LAG_INTERVAL_S)
            self.observe(max(0.0, loop.time() - t - LAG_INTERVAL_S))


def _family(nr: int) -> str:
    try:
        return Hypercall(nr).name
    except ValueError:
        return f"hypercall_{nr}"


class _Collector:
    """Read the hypervisor's state at scrape time (on the loop: no locking needed)."""

    def __init__(self, ctl: "Controller") -> None:
        self.ctl = ctl

    def collect(self) -> Iterator:
        ctl = self.ctl
        hv = ctl.hv
        lbl = ["domid", "name"]
        cpu = CounterMetricFamily("aiovmm_domain_cpu_seconds", "CPU time the domain's vCPUs ran", labels=lbl)
        mem = GaugeMetricFamily("aiovmm_domain_memory_bytes", "Memory the domain owns", labels=lbl)
        maxmem = GaugeMetricFamily("aiovmm_domain_max_memory_bytes", "The domain's memory limit", labels=lbl)
        target = GaugeMetricFamily("aiovmm_domain_memory_target_bytes", "Balloon target (xenstore memory/target)", labels=lbl)
        paused = GaugeMetricFamily("aiovmm_domain_paused", "1 while the domain is paused", labels=lbl)
        hc = CounterMetricFamily("aiovmm_hypercalls", "Hypercalls by family", labels=lbl + ["family"])
        vl = lbl + ["devid"]
        vif = {k: CounterMetricFamily(f"aiovmm_vif_{k}", f"vif {k.replace('_', ' ')}", labels=vl)
               for k in ("tx_bytes", "tx_packets", "rx_bytes", "rx_packets", "tx_errors", "tx_dropped", "rx_dropped")}
        bl = lbl + ["vdev"]
        vbd = {k: CounterMetricFamily(f"aiovmm_vbd_{k}", f"vbd {k.replace('_', ' ')}", labels=bl)
               for k in ("rd_reqs", "wr_reqs", "rd_sectors", "wr_sectors", "flushes", "errors")}
        vcl = lbl + ["vcpu"]
        vcpu_m = {k: CounterMetricFamily(f"aiovmm_vcpu_{k}_seconds", doc, labels=vcl) for k, doc in (
            ("cpu", "CPU time the vCPU's slices ran"),
            ("runqueue_wait", "Time the vCPU was runnable but waited for the CPU (guest-visible steal)"),
            ("host_steal", "Slice wall time the host gave to other threads"))}
        for dom in list(hv.domains.values()):
            ls = [str(dom.domid), dom.name]
            for v in dom.vcpus:
                a = ctl.sched.accounting(v)
                for k, key in (("cpu", "cpu_ns"), ("runqueue_wait", "wait_ns"), ("host_steal", "host_steal_ns")):
                    vcpu_m[k].add_metric(ls + [str(v.id)], a[key] / 1e9)
            cpu.add_metric(ls, ctl.cpu_seconds(dom))
            mem.add_metric(ls, dom.tot_pages * 4096)
            maxmem.add_metric(ls, dom.max_pages * 4096)
            target.add_metric(ls, ctl.target_kib(dom) * 1024)
            paused.add_metric(ls, 1 if dom.paused else 0)
            for nr, n in sorted(dom.hypercall_counts.items()):
                hc.add_metric(ls + [_family(nr)], n)
            for dev in ctl.vifs(dom):
                for k, m in vif.items():
                    m.add_metric(ls + [str(dev.devid)], getattr(dev.stats, k))
            for dev in ctl.vbds(dom):
                for k, m in vbd.items():
                    m.add_metric(ls + [dev.vdev], getattr(dev.stats, k))
        yield from (cpu, mem, maxmem, target, paused, hc, *vif.values(), *vbd.values(), *vcpu_m.values())
        yield GaugeMetricFamily("aiovmm_domains", "Domains running", value=len(hv.domains))
        yield GaugeMetricFamily("aiovmm_free_memory_bytes", "Free machine memory", value=hv.mem.free_frames * 4096)
        yield GaugeMetricFamily("aiovmm_total_memory_bytes", "Machine memory", value=hv.memory_mib << 20)
        lag = ctl.lag
        yield GaugeMetricFamily("aiovmm_event_loop_lag_last_seconds", "Last measured event-loop lag", value=lag.last)
        cum, buckets = 0, []
        for b, n in zip(LAG_BUCKETS, lag.buckets):
            cum += n
            buckets.append((str(b), cum))
        buckets.append(("+Inf", lag.count))
        h = HistogramMetricFamily("aiovmm_event_loop_lag", "Event-loop lag", unit="seconds")
        h.add_metric([], buckets, lag.sum)
        yield h


def registry(ctl: "Controller") -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(ctl))
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
