"""The `aiovmm` command line.

  aiovmm run KERNEL [--ramdisk FILE] [--memory MIB] [--cmdline STR]

boots a Xen PV kernel, streams its console to stdout, and exits with a status derived from
the guest's shutdown reason (EXIT_CODES); a crash also prints a one-line reason on stderr.
Errors are one line on stderr, never a traceback (use -v for details). At a terminal the
console is the guest's serial line (console.TerminalFilter, console.HostTerminal; Ctrl-]
leaves); to files and pipes it is text (--console-output).
"""
from __future__ import annotations

import os
import signal
import sys

from . import early_sigint, note_early_sigint, _note_sigint

if __name__ == "__main__":              # `python -m aiovmm.cli`: as the console script
    note_early_sigint()                 # (aiovmm/__init__.py) from here on

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402

from .abi import ShutdownReason  # noqa: E402
from .console import watch_host_input  # noqa: E402
from .errors import BuildError  # noqa: E402

EXIT_CODES = {
    ShutdownReason.poweroff: 0,
    ShutdownReason.crash: 1,
    ShutdownReason.reboot: 2,
    ShutdownReason.suspend: 3,
    ShutdownReason.watchdog: 4,
    ShutdownReason.soft_reset: 5,
}
EXIT_USAGE = 64
OUTPUT_CLOSED = "output closed"
CONSOLE_OUTPUT_HELP = (
    "guest output: 'terminal' passes the guest's terminal controls (cursor, colours, line "
    "editing) but drops those that act beyond the screen (titles, clipboard, queries: "
    "OSC/DCS/APC strings), with the terminal in raw mode (Ctrl-C goes to the guest) and "
    "Ctrl-] to leave; 'raw' passes every byte (as xl console does); 'text' replaces every "
    "control byte but newline and tab; 'auto' (default): terminal when stdin and stdout are "
    "a terminal, else text")


def console_mode(choice: str, stdin_fd: int | None, stdout_fd: int | None) -> str:
    """--console-output resolved: "auto" is "terminal" when the user is at a terminal
    (stdin and stdout both ttys), else "text" (a file, a pipe, a log)."""
    if choice != "auto":
        return choice
    def tty(fd: int | None) -> bool:
        return fd is not None and os.isatty(fd)
    return "terminal" if tty(stdin_fd) and tty(stdout_fd) else "text"


def _fileno(f) -> int | None:
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError):
        return None


async def _run(args: argparse.Namespace) -> int:
    from .console import HostTerminal, TerminalFilter, write_all
    from .hypervisor import Hypervisor

    sys.stdout.flush()
    out_fd = sys.stdout.fileno()
    stdin_fd = _fileno(sys.stdin)
    mode = console_mode(args.console_output, stdin_fd, out_fd)
    filt = TerminalFilter().feed if mode == "terminal" else None
    last = [b"\n"]
    interrupted: list[str] = []
    stop_cb: list = []

    def console(data: bytes) -> None:
        if filt is not None:
            data = filt(data)
        if data and OUTPUT_CLOSED not in interrupted:
            try:
                write_all(out_fd, data)
            except OSError:          # a closed pipe (`| head`), a terminal hung up: the end
                interrupted.insert(0, OUTPUT_CLOSED)
                if stop_cb:
                    asyncio.get_running_loop().call_soon(stop_cb[0], OUTPUT_CLOSED)
                return
            last[0] = data[-1:]

    # Terminal and raw modes: the user's terminal in raw mode, keys to the guest as typed,
    # Ctrl-] leaves (xl console, QEMU's stdio); restored on every way out (the signals
    # below end the guest and come back here).
    terminal = None
    if mode != "text" and stdin_fd is not None and os.isatty(stdin_fd):
        terminal = HostTerminal(stdin_fd)
    async with Hypervisor(memory_mib=args.machine_memory, log_dir=args.log_dir,
                          xenstore_path=args.xenstore_socket, engine=args.engine) as hv:
        dom = await hv.create(args.kernel, memory_mib=args.memory, cmdline=args.cmdline,
                              name=args.name, ramdisk=args.ramdisk, on_console=console, vifs=args.vif, disks=args.disk,
                              max_memory_mib=getattr(args, "maxmem", None), vcpus=args.vcpus,
                              console_raw=mode != "text")
        if getattr(args, "weight", None) is not None or getattr(args, "cap", None) is not None:
            dom.set_sched(weight=args.weight, cap=args.cap)
        loop = asyncio.get_running_loop()

        def stop(why: str) -> None:
            if not interrupted:
                interrupted.append(why)
            dom.shutdown(ShutdownReason.poweroff)
        stop_cb.append(stop)
        if interrupted:                        # output closed during the build
            loop.call_soon(stop, interrupted[0])

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop, sig.name)
        try:
            if terminal is not None:
                terminal.__enter__()
            watched = _watch_stdin(loop, dom, detach=(lambda: stop("Ctrl-]")) if terminal else None)
            try:
                reason = await dom.wait()
            finally:
                if watched is not None:
                    loop.remove_reader(watched)
                    os.set_blocking(watched, True)
        finally:
            if terminal is not None:
                terminal.restore()
                if last[0] != b"\n":
                    _say("")                      # the guest's cursor may be mid-line
        if interrupted and interrupted[0] == OUTPUT_CLOSED:
            # As a writer killed by SIGPIPE, silently: stdout goes nowhere from here, so
            # Python's own last flush meets no closed pipe either.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 128 + signal.SIGPIPE
        if interrupted:
            _say(f"aiovmm: d{dom.domid} ({dom.name}) destroyed on {interrupted[0]}")
            return 130
        if reason == ShutdownReason.crash:
            _say(f"aiovmm: d{dom.domid} ({dom.name}) {dom.describe_end()}")
        elif reason != ShutdownReason.poweroff:
            _say(f"aiovmm: d{dom.domid} ({dom.name}) shut down: {reason.name}")
        return EXIT_CODES[reason]


def _say(line: str) -> None:
    """The run's last word on stderr; after a hang-up the terminal is gone (EIO) and the
    exit status is all that is left to say it."""
    try:
        print(line, file=sys.stderr)
        sys.stderr.flush()
    except OSError:
        pass


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 64, like every other aiovmm error."""

    def error(self, message: str) -> None:
        print(f"aiovmm: {message} (see aiovmm --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _mib(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB") from None
    return v


def _watch_stdin(loop: asyncio.AbstractEventLoop, dom, detach=None) -> int | None:
    """Feed host stdin to the guest's console ring. Input goes to the domain's input queue,
    which the console backend moves into the ring as space allows (also input that arrives
    before the backend has connected, and more than the 1 KiB ring holds). `detach`: called
    on Ctrl-] (what was typed before it still goes to the guest)."""
    from .console import DETACH_KEY
    try:
        fd = sys.stdin.fileno()
        os.set_blocking(fd, False)
    except (AttributeError, OSError, ValueError):
        return None

    def feed(data: bytes) -> bool:
        cut = data.find(DETACH_KEY) if detach is not None else -1
        if cut >= 0:
            data = data[:cut]
        if data:
            dom.console_input += data
            if dom.console_backend is not None:
                dom.console_backend.flush_input()
        if cut >= 0:
            detach()
        return cut < 0

    try:
        watch_host_input(loop, fd, feed)
    except (OSError, ValueError, NotImplementedError):
        return None
    return fd


def _forget_loop_signals() -> None:
    """In a child forked by this process (a library's helper), drop the event loop's signal
    set-up: the child inherits Python's handler for SIGINT/SIGTERM and the loop's signal
    wake-up fd, so a SIGTERM sent to the child would be written into the parent's loop and
    stop the guest (issue 9 #9: pyroute2 stopped its netns helper children with SIGTERM).
    The netns code no longer forks; this keeps any other forked child from doing the same."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    except ValueError:                  # not the interpreter's main thread: nothing inherited
        pass


def main(argv: list[str] | None = None) -> int:
    """The console script. Ctrl-C at any point, also while Python is still importing or a
    guest is being built (before `run` takes SIGINT over), ends with one line and 130."""
    try:
        if signal.getsignal(signal.SIGINT) is _note_sigint:     # a Ctrl-C while importing
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if early_sigint:                      # (looked at after the handler is back: none lost)
            raise KeyboardInterrupt
        return _main(argv)
    except KeyboardInterrupt:
        print("aiovmm: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="aiovmm", description="Xen PV hypervisor on asyncio")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND",
                           title="commands (aiovmm COMMAND --help)")
    r = sub.add_parser("run", help="boot a Xen PV kernel and stream its console",
                       description="Boot a Xen PV kernel in this process and attach to its console "
                                   "(at a terminal: Ctrl-] leaves, destroying the guest).",
                       epilog="exit status: the guest's shutdown reason (poweroff 0, crash 1, reboot 2, "
                              "suspend 3, watchdog 4, soft_reset 5); 64 bad input; 130 ended by Ctrl-], "
                              "SIGINT, SIGTERM or SIGHUP; 141 output pipe closed")
    r.add_argument("kernel", nargs="?", help="guest kernel: ELF or bzImage (Xen PV, x86_64)")
    r.add_argument("-c", "--config", metavar="FILE",
                   help="domain configuration in xl.cfg syntax (kernel, ramdisk, memory, name, extra, root, "
                        "cmdline, vif, disk); "
                        "options given on the command line add to or override it")
    r.add_argument("--memory", type=_mib, default=None, metavar="MIB", help="guest memory (default 32)")
    r.add_argument("--vcpus", type=int, default=None, metavar="N", help="virtual CPUs (default 1)")
    r.add_argument("--cmdline", default=None, help="guest command line")
    r.add_argument("--ramdisk", default=None, metavar="FILE",
                   help="initial ramdisk (e.g. an initramfs), announced to the guest in start_info")
    r.add_argument("--name", default=None, help="domain name")
    r.add_argument("--vif", action="append", default=[], metavar="SPEC",
                   help="network interface, xl syntax: mac=00:16:3e:01:02:03,bridge=br0 (repeatable)")
    r.add_argument("--disk", action="append", default=[], metavar="SPEC",
                   help="block device, xl syntax: target=/path/to/img,vdev=xvda,access=rw (repeatable)")
    r.add_argument("--log-dir", default=None, metavar="DIR", help="also write the console to <dir>/<name>-d<id>.log")
    r.add_argument("--xenstore-socket", default=None, metavar="PATH",
                   help="serve xenstore to host tools here (XENSTORED_PATH=PATH xenstore-ls)")
    r.add_argument("--engine", choices=("unicorn", "kvm", "auto"), default=None,
                   help="vCPU engine: emulated (unicorn), KVM, or auto (default; see docs/design.md)")
    r.add_argument("--console-output", choices=("auto", "terminal", "raw", "text"), default="auto",
                   help=CONSOLE_OUTPUT_HELP)
    r.add_argument("--machine-memory", type=_mib, default=2048, metavar="MIB",
                   help="host memory reserved for all guests (lazily backed; default 2048)")
    from .control.cli_verbs import register as register_verbs
    register_verbs(sub)                       # xl-style verbs against `aiovmm serve`
    args = p.parse_args(argv)
    # Quiet by default: the CLI itself prints the one-line outcome; -v shows warnings and
    # errors from the hypervisor's log, -vv info, -vvv debug.
    level = {0: logging.CRITICAL + 1, 1: logging.WARNING, 2: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if hasattr(args, "verb_func"):
        from .control.cli_verbs import dispatch
        return dispatch(args)
    if args.cmd == "run":
        from .config import ConfigError, DomainConfig, load
        try:
            cfg = load(args.config) if args.config else DomainConfig(kernel=args.kernel or "")
        except ConfigError as e:
            print(f"aiovmm: {e}", file=sys.stderr)
            return EXIT_USAGE
        args.kernel = args.kernel or cfg.kernel
        if not args.kernel:
            print("aiovmm: no kernel given (a KERNEL argument or --config FILE)", file=sys.stderr)
            return EXIT_USAGE
        args.memory = args.memory if args.memory is not None else cfg.memory
        args.vcpus = args.vcpus if args.vcpus is not None else cfg.vcpus
        from .vcpu_op import MAX_VCPUS
        if not 1 <= args.vcpus <= MAX_VCPUS:
            print(f"aiovmm: --vcpus must be between 1 and {MAX_VCPUS}", file=sys.stderr)
            return EXIT_USAGE
        args.cmdline = args.cmdline if args.cmdline is not None else cfg.cmdline
        args.name = args.name or cfg.name
        from .domain import NAME_MAX, valid_name
        if args.name is not None and not valid_name(args.name):
            # As the daemon refuses it (the name is part of the console log's file name).
            print(f"aiovmm: invalid domain name {args.name!r} (printable, 1-{NAME_MAX} characters, "
                  f"not all digits, no '/')", file=sys.stderr)
            return EXIT_USAGE
        args.ramdisk = args.ramdisk or cfg.ramdisk
        args.vif = cfg.vif + args.vif
        args.disk = cfg.disk + args.disk
        args.engine = args.engine or cfg.engine
        args.weight, args.cap = cfg.weight, cfg.cap
        args.maxmem = cfg.maxmem
        from .kvm_engine import KVMUnavailable, choose_engine
        try:
            choose_engine(args.engine)
        except KVMUnavailable as e:
            print(f"aiovmm: --engine kvm: {e}", file=sys.stderr)
            return EXIT_USAGE
        if args.memory < 1 or args.memory > args.machine_memory:
            print(f"aiovmm: --memory must be between 1 and {args.machine_memory} MiB", file=sys.stderr)
            return EXIT_USAGE
        os.register_at_fork(after_in_child=_forget_loop_signals)
        try:
            import uvloop
            return uvloop.run(_run(args))
        except BuildError as e:
            print(f"aiovmm: {e}", file=sys.stderr)
            return EXIT_USAGE
        except Exception as e:
            if args.verbose:
                raise
            print(f"aiovmm: error: {e}", file=sys.stderr)
            return 70
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
