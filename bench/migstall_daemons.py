"""bench/migstall.py's stream across `aiovmm migrate` between two `aiovmm serve` daemons
(separate processes) on one bridge. Usage: .venv/bin/python bench/migstall_daemons.py [unicorn|kvm]"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from aiovmm.testing import VirtualLan               # noqa: E402
from control.ctlhelp import Daemon                  # noqa: E402
from control.test_linux_ctl import INITRD, KERNEL, LinuxShell   # noqa: E402
from migstall import GUEST_IP, HOST_IP, MAC, PORT, SENDER   # noqa: E402


def main() -> None:
    engine = sys.argv[1] if len(sys.argv) > 1 else "unicorn"
    print(f"load {os.getloadavg()}", flush=True)
    d = tempfile.mkdtemp(prefix="avstall", dir="/tmp")
    secret = os.path.join(d, "secret")
    with open(secret, "w") as f:
        f.write("shared-secret-0123456789\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lan = VirtualLan(f"{HOST_IP}/24")
    asyncio.run(lan.__aenter__())
    subprocess.run(["ip", "netns", "exec", lan.lan_ns, "ip", "link", "set", "lo", "up"], check=True)
    # "both in one netns": the daemons run in the LAN's namespace, where the bridge is
    import control.ctlhelp as ch
    base = ch._cli_command
    ch._cli_command = lambda: ["ip", "netns", "exec", lan.lan_ns] + base()
    a = Daemon(machine_memory=512, extra=["--migration-secret-file", secret])
    b = Daemon(machine_memory=512, extra=["--migration-secret-file", secret,
                                           "--migration-listen", f"127.0.0.1:{port}"])
    try:
        cfg = a.write_cfg("st", kernel=str(KERNEL), ramdisk=str(INITRD), memory=96,
                          extra=f"console=hvc0 aiovmm.ip={GUEST_IP}/24", engine=engine,
                          vif=[f"mac={MAC},bridge=br0"])
        r = a.cli("create", cfg)
        assert r.returncode == 0, r.stderr
        t = time.monotonic()
        a.wait_console("st", r"^aiovmm-init: ready", timeout=600)
        print(f"boot {time.monotonic() - t:.0f} s", flush=True)
        LinuxShell(a, "st").run(f"(nc -l -p {PORT} >/dev/null 2>&1 &)", 60)
        time.sleep(1)
        snd = subprocess.Popen(["ip", "netns", "exec", lan.host_ns, sys.executable, "-c", SENDER,
                                GUEST_IP, str(PORT), "10"])
        t_send = time.monotonic()
        time.sleep(3)
        print(f"migrate at {time.monotonic() - t_send:.2f}", flush=True)
        r = a.cli("migrate", "st", f"127.0.0.1:{port}", timeout=120)
        print(r.stderr.strip(), flush=True)
        snd.wait(30)
        for x, n in ((a, "a"), (b, "b")):
            for line in x.log().splitlines():
                if re.search(r"held|sent on|rx ring|announced|connected|migrat", line):
                    print(f"{n}: {line}")
    finally:
        a.stop()
        b.stop()
        asyncio.run(lan.aclose())


if __name__ == "__main__":
    main()
