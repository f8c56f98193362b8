"""Issue 12: the xl-style verbs, run as the real CLI against a real `aiovmm serve`."""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .ctlhelp import Daemon, _cli_command, guest, kernel, ticks, ROOT

LIST_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([r-][b-][p-][s-][c-][d-])\s+(\d+\.\d)$")


def list_rows(d: Daemon) -> dict[str, tuple]:
    out = d.ok("list").splitlines()
    assert out[0] == "Name                                        ID   Mem VCPUs\tState\tTime(s)"
    rows = {}
    for line in out[1:]:
        m = LIST_ROW.match(line)
        assert m, line
        rows[m[1]] = (int(m[2]), int(m[3]), int(m[4]), m[5], float(m[6]))
    return rows


def snapshot(d: Daemon) -> tuple[int, int]:
    i = d.api("GET", "/api/v1/info")
    return i["free_frames"], i["xenstore_nodes"]


def test_socket_mode_0600(daemon):
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_create_list_destroy(daemon):
    cfg = daemon.write_cfg("web1", kernel=kernel(), memory=8, extra="ticks=100000 period_ms=50")
    before = snapshot(daemon)
    r = daemon.cli("create", cfg)
    assert r.returncode == 0, r.stderr
    daemon.wait_console("web1", r"timer: tick 2 ")
    rows = list_rows(daemon)
    domid, mem, vcpus, state, _ = rows["web1"]
    assert (mem, vcpus) == (8, 1)
    assert state[2:] == "----" and state[:2] in ("r-", "-b")
    assert daemon.ok("uptime").splitlines()[0] == "Name                                ID Uptime"
    vl = daemon.ok("vcpu-list", "web1").splitlines()
    assert vl[0].startswith("Name                                ID  VCPU   CPU State   Time(s)")
    assert re.match(r"^web1\s+%d\s+0\s+0\s+[rb]-?-?\s+\d+\.\d\s+all / all$" % domid, vl[1]), vl
    daemon.ok("destroy", "web1")
    assert "web1" not in list_rows(daemon)
    assert snapshot(daemon) == before


@pytest.mark.parametrize("case", ["unparsable", "no_kernel", "bad_kernel", "too_much_memory", "unknown_key"])
def test_bad_config_refused_nothing_left(daemon, case):
    before = snapshot(daemon)
    path = os.path.join(daemon.dir, f"bad-{case}.cfg")
    text = {
        "unparsable": 'name = "x"\nkernel = \n',
        "no_kernel": f'name = "x"\nkernel = "{daemon.dir}/nonexistent.elf"\n',
        "bad_kernel": f'name = "x"\nkernel = "{daemon.log_path}"\n',
        "too_much_memory": f'name = "x"\nkernel = "{kernel()}"\nmemory = 100000\n',
        "unknown_key": f'name = "x"\nkernel = "{kernel()}"\nmemroy = 8\n',
    }[case]
    with open(path, "w") as f:
        f.write(text)
    r = daemon.cli("create", path)
    assert r.returncode != 0
    err = [l for l in r.stderr.splitlines() if not l.startswith("Parsing config")]
    assert len(err) == 1 and err[0].startswith("aiovmm: "), r.stderr
    assert "Traceback" not in r.stderr
    assert "x" not in list_rows(daemon)
    assert snapshot(daemon) == before


def test_duplicate_name_and_unknown_domain(daemon):
    cfg = daemon.write_cfg("dup", kernel=kernel(), memory=8, extra="ticks=100000 period_ms=100")
    daemon.ok("create", cfg)
    before = snapshot(daemon)
    r = daemon.cli("create", cfg)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == "aiovmm: a domain named 'dup' already exists"
    assert snapshot(daemon) == before
    for verb in ("pause", "unpause", "destroy", "console", "reboot", "shutdown"):
        r = daemon.cli(verb, "nosuchdom")
        assert r.returncode == 1, verb
        assert r.stderr.strip().splitlines()[-1] == "aiovmm: no domain 'nosuchdom'", (verb, r.stderr)
    daemon.ok("destroy", "dup")


def test_no_daemon_one_line():
    env = dict(os.environ, AIOVMM_SOCKET="/tmp/avctl-none/none.sock")
    r = subprocess.run(_cli_command() + ["list"], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("aiovmm: no daemon at /tmp/avctl-none/none.sock")


def test_console_send_line_read_echo(daemon):
    cfg = daemon.write_cfg("echo1", kernel=kernel(), memory=8, extra="ticks=1 echo=1 echo_timeout=0")
    daemon.ok("create", cfg)
    daemon.wait_console("echo1", r"^echo: ready$")
    text = daemon.console_session("echo1", b"hello from the console verb\n",
                                  r"^echo: hello from the console verb$")
    assert "echo: ready\n" in text                    # the history
    assert "echo: hello from the console verb\n" in text   # the live echo
    assert "echo1" in list_rows(daemon)              # leaving the console leaves the guest running
    daemon.ok("destroy", "echo1")


def test_console_stdin_from_a_file_or_dev_null(daemon):
    """`aiovmm console DOM < commands.txt` (a script) and `< /dev/null` (a log watcher): epoll
    refuses a regular file and /dev/null (EPERM), which was a traceback; the file's bytes go
    to the guest up to its Ctrl-], and with /dev/null the output streams until a signal."""
    cfg = daemon.write_cfg("echof", kernel=kernel(), memory=8, extra="ticks=1 echo=1 echo_timeout=0")
    daemon.ok("create", cfg)
    daemon.wait_console("echof", r"^echo: ready$")
    script = Path(daemon.dir) / "commands.txt"
    script.write_bytes(b"hello from a file\n\x1d")
    env = dict(os.environ, AIOVMM_SOCKET=daemon.socket)
    with open(script, "rb") as stdin:
        r = subprocess.run(_cli_command() + ["console", "echof"], stdin=stdin, capture_output=True,
                           env=env, timeout=60)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    daemon.wait_console("echof", r"^echo: hello from a file$")
    p = subprocess.Popen(_cli_command() + ["console", "echof"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        time.sleep(3)
        assert p.poll() is None, p.communicate()[1]  # still streaming
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert b"Traceback" not in err, err
    assert b"echo: hello from a file" in out          # the history was shown
    daemon.ok("destroy", "echof")


def test_pause_unpause_stops_and_resumes_ticks(daemon):
    cfg = daemon.write_cfg("tick1", kernel=kernel(), memory=8, extra="ticks=100000 period_ms=20")
    daemon.ok("create", cfg)
    daemon.wait_console("tick1", r"timer: tick 5 ")
    daemon.ok("pause", "tick1")
    assert list_rows(daemon)["tick1"][3] == "--p---"
    time.sleep(0.2)
    paused_at = ticks(daemon.console_text("tick1"))
    time.sleep(1.0)
    assert ticks(daemon.console_text("tick1")) == paused_at
    daemon.ok("unpause", "tick1")
    assert list_rows(daemon)["tick1"][3] in ("r-----", "-b----")
    daemon.wait_console("tick1", rf"timer: tick {paused_at + 10} ", timeout=30)
    daemon.ok("destroy", "tick1")


def test_shutdown_wait(daemon):
    before = snapshot(daemon)
    cfg = daemon.write_cfg("sd1", kernel=kernel(), memory=8, extra="ticks=100000 period_ms=100")
    daemon.ok("create", cfg)
    daemon.wait_console("sd1", r"timer: tick 1 ")
    r = daemon.cli("shutdown", "-w", "sd1")
    assert r.returncode == 0, r.stderr
    assert "sd1" not in list_rows(daemon)           # -w returns only once it is gone
    assert snapshot(daemon)[0] == before[0]
    # The request went through xenstore (control/shutdown) as xl does it.
    assert "d" in daemon.ok("dmesg")


def test_reboot_builds_it_again(daemon):
    cfg = daemon.write_cfg("rb1", kernel=kernel(), memory=8, extra="ticks=100000 period_ms=50")
    daemon.ok("create", cfg)
    daemon.wait_console("rb1", r"timer: tick 2 ")
    old = list_rows(daemon)["rb1"][0]
    daemon.ok("reboot", "rb1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = list_rows(daemon)
        if "rb1" in rows and rows["rb1"][0] != old:
            break
        time.sleep(0.1)
    new = list_rows(daemon)["rb1"][0]
    assert new > old
    text = daemon.wait_console("rb1", r"timer: tick 2 ")
    assert text.startswith("aiovmm guest kernel 0.1 booting")   # a fresh boot
    daemon.ok("destroy", "rb1")


def test_mem_set_mem_max_sched_credit(daemon):
    cfg = daemon.write_cfg("mem1", kernel=kernel(), memory=16, extra="ticks=100000 period_ms=100")
    daemon.ok("create", cfg)
    daemon.ok("mem-set", "mem1", "12")
    xs = subprocess.run(["xenstore-read", f"/local/domain/{list_rows(daemon)['mem1'][0]}/memory/target"],
                        capture_output=True, text=True, env=dict(os.environ, XENSTORED_PATH=daemon.xs_socket))
    assert xs.stdout.strip() == str(12 * 1024), xs
    r = daemon.cli("mem-set", "mem1", "64")
    assert r.returncode == 1 and "above" in r.stderr and r.stderr.count("\n") == 1
    r = daemon.cli("mem-max", "mem1", "8")
    assert r.returncode == 1 and "below" in r.stderr
    daemon.ok("mem-max", "mem1", "20m")
    d = daemon.api("GET", "/api/v1/domains/mem1")
    assert (d["target_kib"], d["max_memory_kib"]) == (12 * 1024, 20 * 1024)
    daemon.ok("sched-credit", "-d", "mem1", "-w", "512", "-c", "50")
    out = daemon.ok("sched-credit", "-d", "mem1").splitlines()
    assert out[1] == "Name                                ID Weight  Cap"
    assert re.match(r"^mem1\s+\d+\s+512\s+50$", out[2]), out
    r = daemon.cli("sched-credit", "-d", "mem1", "-w", "0")
    assert r.returncode == 1 and r.stderr.strip() == "aiovmm: weight must be 1..65535"
    daemon.ok("destroy", "mem1")


def test_info_top_dmesg(daemon):
    info = dict(l.split(" : ", 1) if " : " in l else (l.split(":")[0], "") for l in daemon.ok("info").splitlines())
    info = {k.strip(): v.strip() for k, v in info.items()}
    assert info["total_memory"] == "256" and info["xen_caps"] == "xen-3.0-x86_64"
    cfg = daemon.write_cfg("top1", kernel=kernel(), memory=8, extra="ticks=100000 period_ms=10 spin=1")
    daemon.ok("create", cfg)
    daemon.wait_console("top1", r"timer: tick 3 ")
    out = daemon.ok("top", "-b", "-i", "2", "-d", "0.5").splitlines()
    assert out[0].split()[:4] == ["NAME", "STATE", "CPU(sec)", "CPU(%)"]
    rows = [l.split() for l in out if l.split() and l.split()[0] == "top1"]
    assert len(rows) == 2
    assert int(rows[1][4]) == 8192                     # MEM(k)
    assert "d%d (top1): created" % list_rows(daemon)["top1"][0] in daemon.ok("dmesg")
    daemon.ok("destroy", "top1")


def test_create_c_attaches_console(daemon):
    cfg = daemon.write_cfg("cc1", kernel=kernel(), memory=8, extra="ticks=1 echo=1 echo_timeout=0")
    with daemon.cli_process("create", cfg, "-c") as p:
        daemon.wait_console("cc1", r"^echo: ready$")
        p.stdin.write(b"line one\nquit\n")        # the guest powers off: the console ends
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    lines = out.decode().splitlines()
    assert lines[0] == "aiovmm guest kernel 0.1 booting"
    assert lines[-3:] == ["echo: line one", "echo: done lines=1 reason=quit", "poweroff"]
    assert "cc1" not in list_rows(daemon)


def test_metrics(daemon):
    cfg = daemon.write_cfg("met1", kernel=kernel(), memory=8, extra="ticks=100000 period_ms=10 spin=1")
    daemon.ok("create", cfg)
    daemon.wait_console("met1", r"timer: tick 20 ")
    domid = list_rows(daemon)["met1"][0]
    status, text = daemon.request("GET", "/metrics")
    assert status == 200
    from prometheus_client.parser import text_string_to_metric_families
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    lbl = {"domid": str(domid), "name": "met1"}

    def value(fam: str, **extra) -> float:
        want = {**lbl, **extra}
        found = [s.value for s in fams[fam].samples if all(s.labels.get(k) == v for k, v in want.items())]
        assert found, (fam, want)
        return found[0]
    assert value("aiovmm_domain_cpu_seconds") > 0
    assert value("aiovmm_domain_memory_bytes") == 8 << 20
    assert value("aiovmm_hypercalls", family="sched_op") >= 20          # a block per tick at least
    assert value("aiovmm_hypercalls", family="set_trap_table") == 1
    assert value("aiovmm_hypercalls", family="event_channel_op") >= 1     # console ring kicks
    assert "aiovmm_event_loop_lag_seconds" in fams
    lag = [s for s in fams["aiovmm_event_loop_lag_seconds"].samples if s.name.endswith("_count")]
    assert lag and lag[0].value >= 1
    daemon.ok("destroy", "met1")


def test_sigterm_destroys_everything_and_removes_socket():
    d = Daemon(machine_memory=64)
    cfg = d.write_cfg("term1", kernel=kernel(), memory=8, extra="ticks=100000 period_ms=100")
    d.ok("create", cfg)
    d.wait_console("term1", r"timer: tick 1 ")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert not os.path.exists(d.socket)
    log = d.log()
    assert "SIGTERM received" in log and "destroying 1 domain(s)" in log, log
    d.stop()


@pytest.mark.parametrize("body,status,message", [
    ({"config": None}, 400, "missing field 'config'"),
    ({"kernel": "\ud800"}, 400, "field 'kernel' is not valid UTF-8 text"),
    ({"kernel": "/x\0"}, 400, "field 'kernel' contains a NUL byte"),
    ({"kernel": kernel(), "cmdline": "x" * 5000}, 400, "command line longer than 1023 bytes"),
    ({"kernel": kernel(), "name": "a/b"}, 400, "invalid domain name 'a/b'"),
    ({"kernel": kernel(), "name": "42"}, 400, "invalid domain name '42'"),
    ([1], 400, "request body must be a JSON object"),
    ({"kernel": kernel(), "memory": 4, "vif": ["bogus=1"]}, 400, "vif 'bogus=1': unknown vif option 'bogus'"),
    ({"kernel": kernel(), "memory": 4096}, 400, "memory 4096 MiB is more than the host's 256 MiB"),
    ({"kernel": kernel(), "memory": True}, 400, "field 'memory' has the wrong type"),
    ({"kernel": kernel(), "ramdisk": "/nonexistent-initrd"}, 400,
     "/nonexistent-initrd: cannot read ramdisk: No such file or directory"),
    ({"kernel": kernel(), "ramdisk": "/dev/zero"}, 400, "/dev/zero: cannot read ramdisk: not a regular file"),
])
def test_api_create_refusals(daemon, body, status, message):
    before = snapshot(daemon)
    got, data = daemon.request("POST", "/api/v1/domains", body)
    assert (got, data) == (status, {"error": message})
    assert snapshot(daemon) == before
    assert daemon.api("GET", "/api/v1/domains") == []


def test_console_on_a_terminal(daemon):
    """Interactive use: stdin is a terminal (a pty here), put in raw mode so Enter sends \\r
    and Ctrl-] reaches the client, which leaves and restores the terminal. The guest's output
    reaches the terminal as at `aiovmm run`: its line ends start a new line (output
    post-processing stays on: no staircase), a control string it echoes (a window title)
    is dropped."""
    import pty
    import select
    import termios
    cfg = daemon.write_cfg("tty1", kernel=kernel(), memory=8, extra="ticks=1 echo=1 echo_timeout=0")
    daemon.ok("create", cfg)
    daemon.wait_console("tty1", r"^echo: ready$")
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    env = dict(os.environ, AIOVMM_SOCKET=daemon.socket)
    p = subprocess.Popen(_cli_command() + ["console", "tty1"], stdin=slave, stdout=slave, stderr=slave,
                         env=env, cwd=ROOT)
    out = b""

    def read_until(token: bytes, timeout: float = 30) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while token not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                out += os.read(master, 4096)
        assert token in out, out
    try:
        read_until(b"echo: ready")
        time.sleep(0.5)                               # raw mode is set before the first byte
        os.write(master, b"typed \x1b]0;title\x07on a tty\r")
        read_until(b"echo: typed on a tty\r\n")
        os.write(master, b"\x1d")
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        after = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    assert after == before                            # the terminal is restored
    daemon.ok("destroy", "tty1")


def _max_memory_bytes(daemon, domid: int) -> int:
    """The hypervisor's limit on the domain (max_pages), as /metrics exports it."""
    _, text = daemon.request("GET", "/metrics")
    m = re.search(rf'^aiovmm_domain_max_memory_bytes{{domid="{domid}",[^}}]*}} (\S+)$', text, re.M)
    assert m, text[:500]
    return int(float(m.group(1)))


def test_maxmem_is_the_balloon_ceiling(daemon):
    """xl's maxmem=: memory= is populated at boot (target), maxmem= is the domain's maximum
    reservation and memory/static-max; mem-set may go up to it, not past it."""
    before = snapshot(daemon)
    cfg = daemon.write_cfg("mx1", kernel=kernel(), memory=16, maxmem=24, extra="ticks=100000 period_ms=100")
    daemon.ok("create", cfg)
    d = daemon.api("GET", "/api/v1/domains/mx1")
    assert (d["memory_kib"], d["target_kib"], d["max_memory_kib"]) == (16 << 10, 16 << 10, 24 << 10)
    assert before[0] - snapshot(daemon)[0] < 24 << 8             # only memory= is populated
    xs = subprocess.run(["xenstore-read", f"/local/domain/{d['id']}/memory/static-max"],
                        capture_output=True, text=True, env=dict(os.environ, XENSTORED_PATH=daemon.xs_socket))
    assert xs.stdout.strip() == str(24 << 10)
    # xl mem-set enforces: the hypervisor's limit follows the target down (a guest cannot
    # balloon back past it) and up again to static-max, which stays what `list` shows.
    daemon.ok("mem-set", "mx1", "12")
    assert _max_memory_bytes(daemon, d["id"]) == 12 << 20
    d = daemon.api("GET", "/api/v1/domains/mx1")
    assert (d["target_kib"], d["max_memory_kib"], d["max_pages_kib"]) == (12 << 10, 24 << 10, 12 << 10)
    daemon.ok("mem-set", "mx1", "24")
    assert _max_memory_bytes(daemon, d["id"]) == 24 << 20
    r = daemon.cli("mem-set", "mx1", "25")
    assert r.returncode == 1 and "above" in r.stderr
    daemon.ok("destroy", "mx1")
    path = daemon.write_cfg("mx2", kernel=kernel(), memory=16, maxmem=8)
    r = daemon.cli("create", path)
    assert r.returncode == 1 and "maxmem must be a number of MiB not below memory" in r.stderr
    got, data = daemon.request("POST", "/api/v1/domains", {"kernel": kernel(), "memory": 16, "maxmem": 8})
    assert got == 400 and "maxmem 8 MiB must be at least memory" in data["error"]
    assert snapshot(daemon) == before
