"""How `aiovmm run` ends when the user ends it: one line (or none, as a writer whose pipe
closed), a meaningful status, never a traceback or a "crashed" guest."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import ROOT, _cli_command, kernel


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return env


def test_closed_output_pipe_ends_quietly():
    """`aiovmm run ... | head -1`: the reader goes, the guest is destroyed and aiovmm exits
    as a writer killed by SIGPIPE would (141), silently (before: the guest 'crashed' with a
    BrokenPipeError in a hypervisor error, exit 1)."""
    p = subprocess.Popen(_cli_command() + ["run", kernel(), "--memory", "8", "--cmdline", "ticks=100"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=ROOT, env=_env())
    try:
        assert p.stdout.readline() == b"aiovmm guest kernel 0.1 booting\n"
        p.stdout.close()
        err = p.stderr.read()
        assert p.wait(60) == 128 + signal.SIGPIPE, err
        assert err == b"", err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


CTRL_C_IN_CREATE = """
import signal, sys
import aiovmm.hypervisor as h
from aiovmm.cli import main
create = h.Hypervisor.create
async def create_interrupted(self, *a, **k):
    signal.raise_signal(signal.SIGINT)          # the user's Ctrl-C, while the guest is built
    return await create(self, *a, **k)
h.Hypervisor.create = create_interrupted
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_the_guest_is_built():
    """Ctrl-C before `run` has taken SIGINT over (the guest is still being built): one line,
    exit 130, nothing left (before: exit 130 and not a word)."""
    r = subprocess.run([sys.executable, "-c", CTRL_C_IN_CREATE, "run", kernel(), "--memory", "8"],
                       capture_output=True, timeout=60, cwd=ROOT, env=_env())
    assert (r.returncode, r.stderr) == (130, b"aiovmm: interrupted\n"), r.stderr
    assert r.stdout == b""


def test_demo_prints_guest_text_verbatim():
    """`make demo` prints each guest's console lines with rich: guest text is text, never
    markup (before: a guest line with '[/]' ended the demo with rich's MarkupError)."""
    import importlib.util
    import io

    from rich.console import Console
    spec = importlib.util.spec_from_file_location("aiovmm_demo", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.con = Console(file=io.StringIO(), width=200, color_system=None)
    demo.printer("web1")(b"a [/] b [bold]c\n")
    assert demo.con.file.getvalue() == "   web1 | a [/] b [bold]c\n"


def test_invalid_name_refused_like_the_daemon():
    """`run --name a/b` (the console log's file name would be a/b-d1.log): refused with one
    line and 64, as `aiovmm create` is (before: accepted, and --log-dir silently wrote no
    log)."""
    from conftest import guest, run_cli
    for name in ("a/b", "123", "x" * 65):
        r = run_cli("run", guest("hello"), "--memory", "8", "--name", name)
        assert r.returncode == 64, (name, r.returncode, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("aiovmm: invalid domain name "), r.stderr
        assert r.stdout == ""
