"""Debian's xenstore-utils (libxenstore 4.17) against our daemon, as real subprocesses.

They find the daemon through XENSTORED_PATH=<socket>; XENSTORE_PATH is not honoured.
xenstore-watch takes `-n NR` to exit after NR events (the initial one counts).
"""
from __future__ import annotations

import asyncio
import os

import pytest


async def run(env, *args, timeout=10.0, check=True):
    p = await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    if check:
        assert p.returncode == 0, (args, out, err)
    return p.returncode, out.decode(), err.decode()


async def test_write_read_ls_list_exists_rm(xs, xs_env):
    await run(xs_env, "xenstore-write", "/vm/a", "hello world", "/vm/b/c", "x")
    assert xs.store.read("/vm/a") == b"hello world"
    _, out, _ = await run(xs_env, "xenstore-read", "/vm/a", "/vm/b/c")
    assert out == "hello world\nx\n"
    _, out, _ = await run(xs_env, "xenstore-ls", "-f", "/vm")
    assert out == '/vm/a = "hello world"\n/vm/b = ""\n/vm/b/c = "x"\n'
    _, out, _ = await run(xs_env, "xenstore-list", "/vm")
    assert out.split() == ["a", "b"]
    assert (await run(xs_env, "xenstore-exists", "/vm/b/c"))[0] == 0
    await run(xs_env, "xenstore-rm", "/vm/b")
    assert (await run(xs_env, "xenstore-exists", "/vm/b/c", check=False))[0] == 1
    rc, _, err = await run(xs_env, "xenstore-read", "/vm/b", check=False)
    assert (rc, err) == (1, "xenstore-read: couldn't read path /vm/b\n")


async def test_chmod_and_ls_p(xs, xs_env):
    await run(xs_env, "xenstore-write", "/perm/x", "1")
    await run(xs_env, "xenstore-chmod", "/perm/x", "n5", "r7")
    assert xs.store.get_perms("/perm/x") == ["n5", "r7"]
    _, out, _ = await run(xs_env, "xenstore-ls", "-p", "/perm")
    assert out.startswith('x = "1"') and out.rstrip().endswith("(n5,r7)")


async def test_ls_lists_a_big_directory(xs, xs_env):
    """More children than one 4096-byte reply: libxenstore pages with DIRECTORY_PART."""
    names = [f"n{i:03d}-{'y' * 50}" for i in range(100)]
    for n in names:
        xs.store.write(f"/many/{n}", "")
    _, out, _ = await run(xs_env, "xenstore-list", "/many")
    assert out.split() == names


async def test_watch_reports_initial_and_subtree_events(xs, xs_env):
    p = await asyncio.create_subprocess_exec(
        "xenstore-watch", "-n", "3", "/w", env=xs_env, stdout=asyncio.subprocess.PIPE)
    # wait until its watch is registered, then change the subtree twice
    for _ in range(200):
        if any(w.path == "/w" for c in xs.store.connections for w in c.watches):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("xenstore-watch never registered its watch")
    xs.store.write("/w/a", "1")
    xs.store.write("/w/b/c", "2")
    out, _ = await asyncio.wait_for(p.communicate(), 10)
    assert p.returncode == 0
    assert out.decode().split() == ["/w", "/w/a", "/w/b/c"]


async def test_transactions_from_libxenstore(xs, xs_env):
    """xenstore-write with several keys uses one transaction; it commits."""
    await run(xs_env, "xenstore-write", "/t/1", "a", "/t/2", "b", "/t/3", "c")
    assert [xs.store.read(f"/t/{i}") for i in (1, 2, 3)] == [b"a", b"b", b"c"]


async def test_unprivileged_socket_with_utils(xs, xs_env):
    env = dict(xs_env, XENSTORED_PATH=str(xs.dom5_sock))
    xs.store.write("/secret", "s")
    # xenstore-read only says it failed (warnx, exit 1) ...
    rc, out, err = await run(env, "xenstore-read", "/secret", check=False)
    assert (rc, out, err) == (1, "", "xenstore-read: couldn't read path /secret\n")
    # ... xenstore-ls and xenstore-chmod print strerror(errno): EACCES, not ENOENT. A missing
    # node under a readable parent is ENOENT (C xenstored's errno_from_parents), so the two
    # are told apart.
    rc, _, err = await run(env, "xenstore-ls", "/secret", check=False)
    assert (rc, err) == (1, "xenstore-ls: xs_directory (/secret): Permission denied\n")
    rc, _, err = await run(env, "xenstore-chmod", "/secret", "n5", check=False)
    assert (rc, err) == (1, "xenstore-chmod: Error occurred setting permissions on '/secret': "
                            "Permission denied\n")
    assert xs.store.get_perms("/secret") == ["n0"]
    rc, _, err = await run(env, "xenstore-ls", "/local/domain/5/nope", check=False)
    assert (rc, err) == (1, "xenstore-ls: xs_directory (/local/domain/5/nope): "
                            "No such file or directory\n")
    rc, _, err = await run(env, "xenstore-write", "/secret", "x", check=False)
    assert (rc, err) == (1, "xenstore-write: could not write path /secret\n")
    rc, _, err = await run(env, "xenstore-rm", "/secret", check=False)
    assert (rc, err) == (1, "xenstore-rm: could not remove path /secret\n")
    assert xs.store.read("/secret") == b"s"
    await run(env, "xenstore-write", "data/k", "v")                # relative = home
    assert xs.store.read("/local/domain/5/data/k") == b"v"


async def test_xenstore_path_env_is_not_honoured(xs, xs_env, sock_dir):
    env = {k: v for k, v in xs_env.items() if k != "XENSTORED_PATH"}
    env["XENSTORE_PATH"] = str(xs.sock)
    env["XENSTORED_RUNDIR"] = str(sock_dir / "nowhere")
    rc, _, err = await run(env, "xenstore-read", "-s", "/", check=False)
    assert (rc, err) == (1, "xenstore-read: xs_open: No such file or directory\n")
    # XENSTORED_RUNDIR/<socket> is the other way in (with -s: socket only)
    os.symlink(xs.sock, sock_dir / "socket")
    env["XENSTORED_RUNDIR"] = str(sock_dir)
    xs.store.write("/via-rundir", "ok")
    _, out, _ = await run(env, "xenstore-read", "-s", "/via-rundir")
    assert out == "ok\n"
