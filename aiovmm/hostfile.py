"""Files the daemon (root) creates in directories it is given (save files, console logs).

Such a directory may be writable by others (a shared --save-dir or --log-dir): whatever is
found at the path must not redirect the write. `open_own` opens never through a symlink
and refuses a file of another user or one with other hard links, checked on the open
descriptor before anything is truncated or written (xl and xenconsoled write into
root-only directories and open plainly). `unlink_stale_socket`: before binding a unix
socket (the API's, xenstore's), replace only a stale one, never a live listener's."""
from __future__ import annotations

import errno
import os
import socket
import stat


def open_own(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open for a file of our own (an `opener` for open()/aiofiles.open()); O_TRUNC is
    applied only after the checks. A FIFO or device found there is opened as it is."""
    fd = os.open(path, (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_nlink > 1:
            raise PermissionError(errno.EPERM, "a file of another user or a hard link is in the way", path)
        if flags & os.O_TRUNC and stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlink_stale_socket(path: str) -> None:
    """Before binding a unix socket at `path`: remove a stale socket file (its listener is
    gone: connecting is refused); refuse (OSError EADDRINUSE) when a live listener is there
    and (ENOTSOCK) when something else is. Nothing there: nothing to do. The probe never
    blocks (a listener with a full backlog answers EAGAIN: live)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.ENOTSOCK, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except BlockingIOError:
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is listening on it", path)
