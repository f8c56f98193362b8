"""Red team (backends, 2026-12-02): a netfront's GSO size multiplied the host kernel's work.

Netback hands a tx packet's GSO size to the tap's virtio_net_hdr, and the host kernel
segments the frame in software for every port on its way without TSO (a tap whose frontend
takes no GSO, a NIC, the route out). Linux netback refuses only a size of 0; a 64 KiB frame
at gso_size 1 is ~64,000 segments: bench/net_gso_size.py measured 180-290 ms of host CPU
per frame written (5,000-12,000x a 1448-byte MSS, medians of two runs at load 17-19; 0.6 ms
at 48), so a guest could keep a host core busy with a few frames a second. Linux's TCP never sends an MSS below 48 (tcp_mtu_to_mss's
clamp, tcp_min_snd_mss), the floor taken here (GSO_MIN_SIZE): a smaller size is an error
for that packet, never handed to the kernel.

The real Netback on a parked domain's rings (the harness of test_mutation_kills_net.py).
"""
from __future__ import annotations

import struct

import pytest

from aiovmm.ring import SRING_HDR
from backends.net.device import (GSO_MIN_SIZE, NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, NETTXF_csum_blank,
                                 NETTXF_extra_info, RING_SIZE, TX_SLOT, VNET_HDR_LEN, XEN_NETIF_EXTRA_TYPE_GSO,
                                 XEN_NETIF_GSO_TYPE_TCPV4, _EXTRA_GSO, _VNET)
from test_mutation_kills_net import _tcp4_frame, with_vif


@pytest.mark.parametrize("size, ok", [(1, False), (8, False), (GSO_MIN_SIZE - 1, False),
                                      (GSO_MIN_SIZE, True), (1448, True), (0xFFFE, True)])
def test_tx_gso_size_below_tcp_minimum_is_an_error(size, ok):
    def body(v):
        frame = _tcp4_frame(3000)
        v.hv.mem.write(v.d.spare[2] << 12, frame)
        m = v.hv.mem.frame(v.tx_mfn)
        v.push((50, 0, NETTXF_extra_info | NETTXF_csum_blank, 1, len(frame)))
        off = SRING_HDR + (v.prod % RING_SIZE) * TX_SLOT
        m[off:off + 8] = _EXTRA_GSO.pack(XEN_NETIF_EXTRA_TYPE_GSO, 0, size, XEN_NETIF_GSO_TYPE_TCPV4).ljust(8, b"\0")
        v.prod += 1
        struct.pack_into("<I", m, 0, v.prod)
        v.nb._process_tx()
        assert [s for _i, s in v.responses(2)] == [NETIF_RSP_OKAY if ok else NETIF_RSP_ERROR, NETIF_RSP_NULL]
        if not ok:
            assert v.sent() == [] and v.nb.stats.tx_errors == 1
            return
        raw = v.out.recv(70000)
        assert raw[VNET_HDR_LEN:VNET_HDR_LEN + 54] == frame[:54]
        assert _VNET.unpack_from(raw)[3] == size          # the size the guest gave, unchanged
    with_vif(body)
