"""Domain configuration files in Xen's xl.cfg syntax (the subset aiovmm understands).

    name = "web1"
    kernel = "guests/build/tests/net.elf"
    ramdisk = "initrd.img"                      # optional: loaded after the kernel
    memory = 16
    extra = "ip=198.18.0.2/24 name=web1"        # the kernel command line, after root=
    root = "/dev/xvda"                          # optional: prepended as root=/dev/xvda
    # cmdline = "..."                           # the whole command line (root/extra ignored)
    vif = ['mac=00:16:3e:01:02:03,bridge=br0']
    disk = ['file:/var/lib/aiovmm/a.img,xvda,w', 'phy:/dev/loop3,xvdb,r']
    engine = "kvm"                               # vCPU engine: unicorn, kvm or auto
    vcpus = 2                                    # vCPUs (1..32; the guest brings up 1..N-1)

Values are xl's: quoted strings, integers, and [lists]; `#` starts a comment. Unknown keys
are refused with the line number, so a typo never silently drops a device.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import stat

KNOWN = {"name", "kernel", "ramdisk", "root", "memory", "maxmem", "extra", "cmdline", "vif", "disk", "vcpus",
         "on_poweroff", "on_reboot", "on_crash", "type", "engine", "weight", "cap"}


class ConfigError(ValueError):
    """A configuration file that cannot be used (one-line reason with file and line)."""


@dataclasses.dataclass
class DomainConfig:
    kernel: str
    name: str | None = None
    memory: int = 32
    cmdline: str = ""
    vif: list[str] = dataclasses.field(default_factory=list)
    disk: list[str] = dataclasses.field(default_factory=list)
    ramdisk: str | None = None
    engine: str = "auto"              # vCPU engine: "unicorn", "kvm" or "auto"
    weight: int | None = None         # credit scheduler (xl.cfg weight=, cap=)
    cap: int | None = None
    maxmem: int | None = None         # xl.cfg maxmem= (MiB): the balloon may grow up to it
    vcpus: int = 1                    # xl.cfg vcpus= (1..vcpu_op.MAX_VCPUS)
    on_reboot: str = "restart"        # xl.cfg on_reboot= (restart or destroy)


def parse(text: str, path: str = "<config>") -> DomainConfig:
    values: dict[str, object] = {}
    pending = ""
    start = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = _strip_comment(line).strip()
        if not pending:
            start = lineno
        pending = f"{pending} {stripped}".strip() if pending else stripped
        if not pending:
            continue
        if _open_brackets(pending) > 0:
            continue                                     # a list continues on the next line
        key, sep, raw = pending.partition("=")
        key = key.strip()
        pending = ""
        if not sep or not key.isidentifier():
            raise ConfigError(f"{path}:{start}: expected `key = value`")
        if key not in KNOWN:
            raise ConfigError(f"{path}:{start}: unknown setting {key!r}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(f"{path}:{start}: {key}: cannot read value {raw.strip()!r}") from None
        if isinstance(value, tuple):
            value = list(value)
        values[key] = value
    if pending:
        raise ConfigError(f"{path}:{start}: unterminated list")
    if values.get("type", "pv") != "pv":
        raise ConfigError(f"{path}: type = {values['type']!r}: only PV guests are supported")
    kernel = values.get("kernel")
    if not isinstance(kernel, str) or not kernel:
        raise ConfigError(f"{path}: `kernel` must name the guest kernel")
    if not os.path.isabs(kernel) and path != "<config>":
        kernel = os.path.join(os.path.dirname(os.path.abspath(path)), kernel)
    memory = values.get("memory", 32)
    if not isinstance(memory, int) or isinstance(memory, bool) or memory < 1:
        raise ConfigError(f"{path}: memory must be a positive number of MiB")
    maxmem = values.get("maxmem")
    if maxmem is not None and (not isinstance(maxmem, int) or isinstance(maxmem, bool) or maxmem < memory):
        raise ConfigError(f"{path}: maxmem must be a number of MiB not below memory ({memory})")
    for k in ("vif", "disk"):
        v = values.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{path}: {k} must be a list of strings")
    for k in ("extra", "cmdline", "root", "ramdisk"):
        if k in values and not isinstance(values[k], str):
            raise ConfigError(f"{path}: {k} must be a string")
    cmdline = _cmdline(values)
    ramdisk = values.get("ramdisk") or None
    if ramdisk and not os.path.isabs(ramdisk) and path != "<config>":
        ramdisk = os.path.join(os.path.dirname(os.path.abspath(path)), ramdisk)
    name = values.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{path}: name must be a string")
    engine = values.get("engine", "auto")
    if engine not in ("unicorn", "kvm", "auto"):
        raise ConfigError(f"{path}: engine must be \"unicorn\", \"kvm\" or \"auto\"")
    from .vcpu_op import MAX_VCPUS
    vcpus = values.get("vcpus", 1)
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"{path}: vcpus must be 1..{MAX_VCPUS}")
    # xl's actions: the ones aiovmm carries out, refused otherwise (they used to be accepted
    # and ignored: on_reboot = "destroy" restarted the domain all the same).
    for k, allowed in (("on_poweroff", ("destroy",)), ("on_crash", ("destroy",)),
                       ("on_reboot", ("restart", "destroy"))):
        if values.get(k, allowed[0]) not in allowed:
            raise ConfigError(f"{path}: {k} must be " + " or ".join(f'"{a}"' for a in allowed))
    weight, cap = values.get("weight"), values.get("cap")
    from .scheduler import validate_params
    try:
        if not all(x is None or isinstance(x, int) for x in (weight, cap)):
            raise ValueError("weight and cap must be integers")
        validate_params(weight, cap, vcpus)  # type: ignore[arg-type]
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return DomainConfig(kernel, name, memory, cmdline, list(values.get("vif", [])),
                        list(values.get("disk", [])), ramdisk, engine, weight, cap,  # type: ignore[arg-type]
                        maxmem=maxmem, vcpus=vcpus,  # type: ignore[arg-type]
                        on_reboot=str(values.get("on_reboot", "restart")))


def _cmdline(values: dict[str, object]) -> str:
    """xl's rule (xl_parse.c): `cmdline` is the whole command line and wins over `root` and
    `extra`; otherwise "root=<root> <extra>"."""
    if "cmdline" in values:
        return str(values["cmdline"])
    root, extra = values.get("root"), values.get("extra")
    if root and extra:
        return f"root={root} {extra}"
    if root:
        return f"root={root}"
    return str(extra or "")


MAX_CONFIG_BYTES = 1 << 20     # xl.cfg files are a few hundred bytes; never read without bound


def load(path: str) -> DomainConfig:
    """Read and parse a configuration file (read_text's checks)."""
    return parse(read_text(path), path)


def read_text(path: str) -> str:
    """A configuration file's text, as `aiovmm run -c` and `aiovmm create` both read it: a
    regular file of at most MAX_CONFIG_BYTES of UTF-8 text (a device or FIFO is refused
    before it is read; a bad byte is reported with its line, never as a traceback)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"{path}: not a regular file")
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    return text


def _unquoted(line: str):
    """(index, character) of `line` outside quoted strings."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        else:
            yield i, ch


def _strip_comment(line: str) -> str:
    for i, ch in _unquoted(line):
        if ch == "#":
            return line[:i]
    return line


def _open_brackets(text: str) -> int:
    """Lists opened and not yet closed in `text` (brackets inside strings do not count: a
    command line may well hold one)."""
    return sum(1 if ch == "[" else -1 for _, ch in _unquoted(text) if ch in "[]")
