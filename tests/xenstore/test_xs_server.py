"""The daemon over real unix sockets: requests, permissions, watches, transactions, domains."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm.xenstore import XsType

from .conftest import HDR, XsErr


async def test_read_write_directory_perms_rm(client):
    c = await client()
    await c.write("/a/b", "hello")
    assert await c.read("/a/b") == b"hello"
    assert await c.directory("/a") == ["b"]
    assert await c.call(XsType.GET_PERMS, "/a/b") == b"n0\0"
    await c.call(XsType.MKDIR, "/a/c/d")
    assert await c.directory("/a") == ["b", "c"]
    await c.call(XsType.RM, "/a")
    with pytest.raises(XsErr, match="ENOENT"):
        await c.read("/a/b")
    await c.call(XsType.RM, "/a")                           # parent exists: fine
    with pytest.raises(XsErr, match="ENOENT"):
        await c.call(XsType.RM, "/a/b")                     # parent missing
    with pytest.raises(XsErr, match="EINVAL"):
        await c.read("/bad//path")
    assert await c.write("/bin", b"\0\1\xff") is None       # binary values round-trip
    assert await c.read("/bin") == b"\0\1\xff"


@pytest.mark.parametrize("op,args", [
    (XsType.CONTROL, ("check",)),
    (XsType.INTRODUCE, ("6", "0", "0")),
    (XsType.RELEASE, ("5",)),
    (XsType.IS_DOMAIN_INTRODUCED, ("5",)),
    (XsType.RESUME, ("5",)),
    (XsType.SET_TARGET, ("5", "6")),
], ids=lambda x: getattr(x, "name", None))
async def test_privileged_requests_are_eacces_for_a_domain(xs, client, op, args):
    """C xenstored's XS_FLAG_PRIV requests (wire_funcs): an unprivileged caller gets EACCES
    whatever the arguments and nothing changes; dom0 may make the same request."""
    d5, dom0 = await client(xs.dom5_sock), await client()
    xs.store.introduce(6)
    before = sorted(xs.store.domains)
    with pytest.raises(XsErr, match="EACCES"):
        await d5.call(op, *args)
    assert sorted(xs.store.domains) == before
    await dom0.call(op, *args)


async def test_reply_of_exactly_the_payload_limit_is_sent(xs, client):
    """Replies up to XENSTORE_PAYLOAD_MAX (4096) bytes go out; one byte more is E2BIG
    (C xenstored send_reply). The values are written through the Python API: a WRITE
    request of that size would not fit in one message with its path."""
    dom0 = await client()
    xs.store.write("/big/exact", "v" * 4096)
    xs.store.write("/big/over", "v" * 4097)
    assert await dom0.read("/big/exact") == b"v" * 4096
    with pytest.raises(XsErr, match="E2BIG"):
        await dom0.read("/big/over")
    assert await dom0.read("/big/exact") == b"v" * 4096        # the connection goes on


async def test_unprivileged_domain_permissions(xs, client):
    dom0, d5 = await client(), await client(xs.dom5_sock)
    await d5.write("data/x", "1")                            # relative to /local/domain/5
    assert xs.store.read("/local/domain/5/data/x") == b"1"
    assert await d5.call(XsType.GET_PERMS, "data/x") == b"n5\0"
    await dom0.write("/secret", "s")
    with pytest.raises(XsErr, match="EACCES"):
        await d5.read("/secret")
    with pytest.raises(XsErr, match="EACCES"):
        await d5.write("/secret", "x")
    with pytest.raises(XsErr, match="EACCES"):
        await d5.write("/new-top", "x")                       # '/' is dom0's
    await dom0.call(XsType.SET_PERMS, "/secret", "n0", "r5")
    assert await d5.read("/secret") == b"s"
    with pytest.raises(XsErr, match="EACCES"):
        await d5.write("/secret", "x")
    with pytest.raises(XsErr, match="EPERM"):                  # owner change needs dom0
        await d5.call(XsType.SET_PERMS, "data/x", "n6")
    await d5.call(XsType.SET_PERMS, "data/x", "n5", "r6")
    with pytest.raises(XsErr, match="EACCES"):                 # privileged requests
        await d5.call(XsType.INTRODUCE, "6", "0", "0")
    with pytest.raises(XsErr, match="EACCES"):
        await d5.call(XsType.CONTROL, "check")
    assert await d5.call(XsType.GET_DOMAIN_PATH, "5") == b"/local/domain/5\0"
    # dom0 stays the owner of what it creates in dom5's home; dom5 owns the home
    await dom0.write("/local/domain/5/by-dom0", "")
    assert xs.store.get_perms("/local/domain/5/by-dom0") == ["n5"]


async def test_watch_subtree_initial_event_and_unwatch(client):
    w, c = await client(), await client()
    await w.watch("/a", "tok")
    assert await w.event() == ("/a", "tok")                 # initial event, even if absent
    await c.write("/a/b/c", "1")
    assert await w.event() == ("/a/b/c", "tok")
    await c.write("/ab", "x")                               # not a child of /a
    await c.write("/a", "v")
    assert await w.event() == ("/a", "tok")
    await w.watch("/a/b/c", "deep")
    assert await w.event() == ("/a/b/c", "deep")
    await c.call(XsType.RM, "/a/b")                         # removal of a parent
    got = {await w.event(), await w.event()}
    assert got == {("/a/b", "tok"), ("/a/b/c", "deep")}
    with pytest.raises(XsErr, match="EEXIST"):
        await w.watch("/a", "tok")
    await w.call(XsType.UNWATCH, "/a", "tok")
    await w.call(XsType.UNWATCH, "/a/b/c", "deep")
    with pytest.raises(XsErr, match="ENOENT"):
        await w.call(XsType.UNWATCH, "/a", "tok")
    await c.write("/a/z", "1")
    await w.no_event()


async def test_relative_watch_reports_relative_paths_and_respects_perms(xs, client):
    d5, dom0 = await client(xs.dom5_sock), await client()
    await d5.watch("control", "ctl")
    assert await d5.event() == ("control", "ctl")
    await dom0.write("/local/domain/5/control/shutdown", "poweroff")
    assert await d5.event() == ("control/shutdown", "ctl")
    # a node dom5 may not read: no event
    await dom0.write("/local/domain/5/control/hidden", "")
    assert await d5.event() == ("control/hidden", "ctl")
    await dom0.call(XsType.SET_PERMS, "/local/domain/5/control/hidden", "n0")
    await dom0.write("/local/domain/5/control/hidden", "x")
    await d5.no_event()


async def test_special_watches_introduce_release(xs, client):
    dom0, d5 = await client(), await client(xs.dom5_sock)
    await dom0.watch("@introduceDomain", "intro")
    await dom0.watch("@releaseDomain", "rel")
    assert await dom0.event() == ("@introduceDomain", "intro")
    assert await dom0.event() == ("@releaseDomain", "rel")
    await d5.watch("@introduceDomain", "d5")                # allowed, but perms n0: no events
    assert await d5.event() == ("@introduceDomain", "d5")
    await dom0.watch("/", "root")                            # '/' never sees '@' events
    assert await dom0.event() == ("/", "root")
    assert await dom0.call(XsType.IS_DOMAIN_INTRODUCED, "9") == b"F\0"
    await dom0.call(XsType.INTRODUCE, "9", "1234", "3")
    assert await dom0.event() == ("@introduceDomain", "intro")
    assert await dom0.call(XsType.IS_DOMAIN_INTRODUCED, "9") == b"T\0"
    await dom0.call(XsType.RELEASE, "9")
    assert await dom0.event() == ("@releaseDomain", "rel")
    assert await dom0.call(XsType.IS_DOMAIN_INTRODUCED, "9") == b"F\0"
    with pytest.raises(XsErr, match="ENOENT"):
        await dom0.call(XsType.RELEASE, "9")
    await dom0.no_event()
    await d5.no_event()
    # releasing dom5 from the toolstack closes dom5's connections, and only those
    xs.store.release(5)
    assert await dom0.event() == ("/local/domain/5", "root")
    assert await dom0.event() == ("@releaseDomain", "rel")
    assert await d5.closed()
    assert await dom0.read("/local/domain") == b""


async def test_transaction_conflict_and_retry(client):
    a, b = await client(), await client()
    await a.write("/counter", "0")
    await a.watch("/counter", "w")
    assert await a.event() == ("/counter", "w")

    async def increment(c, interfere=None):
        attempts = 0
        while True:
            attempts += 1
            tx = await c.tx_start()
            v = int(await c.read("/counter", tx))
            if interfere and attempts == 1:
                await interfere()
            await c.write("/counter", str(v + 1), tx)
            try:
                await c.tx_end(tx)
                return attempts
            except XsErr as e:
                assert e.name == "EAGAIN"

    assert await increment(b, interfere=lambda: a.write("/counter", "10")) == 2
    assert await a.read("/counter") == b"11"
    assert await a.event() == ("/counter", "w")             # a's own write
    assert await a.event() == ("/counter", "w")             # b's commit, not before
    # writes inside a transaction are invisible outside until commit, and gone on abort
    tx = await b.tx_start()
    await b.write("/t/x", "1", tx)
    assert await b.read("/t/x", tx) == b"1"
    with pytest.raises(XsErr, match="ENOENT"):
        await a.read("/t/x")
    await a.no_event()
    await b.tx_end(tx, commit=False)
    with pytest.raises(XsErr, match="ENOENT"):
        await b.read("/t/x")
    with pytest.raises(XsErr, match="ENOENT"):               # ended: unknown id now
        await b.read("/counter", tx)


async def test_concurrent_transactions_on_disjoint_nodes_both_commit(client):
    a, b = await client(), await client()
    await a.write("/x/a", "")
    await a.write("/x/b", "")
    ta, tb = await a.tx_start(), await b.tx_start()
    await a.write("/x/a", "1", ta)
    await b.write("/x/b", "2", tb)
    await a.tx_end(ta)
    await b.tx_end(tb)
    assert (await a.read("/x/a"), await a.read("/x/b")) == (b"1", b"2")


async def test_transaction_ids_are_per_connection(client):
    a, b = await client(), await client()
    tx = await a.tx_start()
    with pytest.raises(XsErr, match="ENOENT"):
        await b.read("/", tx)
    with pytest.raises(XsErr, match="EBUSY"):
        await a.call(XsType.TRANSACTION_START, "", tx=tx)
    with pytest.raises(XsErr, match="EINVAL"):
        await a.call(XsType.TRANSACTION_END, "X", tx=tx)
    await a.call(XsType.RESET_WATCHES, "")
    with pytest.raises(XsErr, match="ENOENT"):
        await a.tx_end(tx)


async def test_directory_part_pages_long_listings(client):
    c = await client()
    names = [f"child-{i:04d}-{'x' * 40}" for i in range(150)]   # ~8 KiB of names
    tx = await c.tx_start()
    for n in names:
        await c.call(XsType.MKDIR, f"/big/{n}", tx=tx)
    await c.tx_end(tx)
    with pytest.raises(XsErr, match="E2BIG"):
        await c.directory("/big")
    got, offset, gens = [], 0, set()
    while True:
        body = await c.call(XsType.DIRECTORY_PART, payload=f"/big\0{offset}\0".encode())
        gen, _, rest = body.partition(b"\0")
        gens.add(gen)
        parts = rest.split(b"\0")
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += [p.decode() for p in parts[:-2]]
            break
        chunk = [p.decode() for p in parts[:-1]]
        got += chunk
        offset += sum(len(n) + 1 for n in chunk)
    assert got == names and len(gens) == 1


async def test_malformed_messages_are_survived(xs, client):
    bad, good = await client(), await client()
    for type_ in (20, 99, XsType.WATCH_EVENT, XsType.ERROR, XsType.INVALID):
        t, body = await bad.call_raw(type_, b"/\0")
        assert (t, body) == (XsType.ERROR, b"ENOSYS\0")
    assert await bad.call_raw(XsType.READ, b"/no-nul") == (XsType.ERROR, b"EINVAL\0")
    assert await bad.call_raw(XsType.WRITE, b"no-nul") == (XsType.ERROR, b"EINVAL\0")
    assert await bad.call_raw(XsType.READ, b"/a\0/b\0") == (XsType.ERROR, b"EINVAL\0")
    assert await bad.call_raw(XsType.READ, b"/", tx=77) == (XsType.ERROR, b"ENOENT\0")
    assert await bad.call_raw(XsType.WATCH, b"/only-path\0") == (XsType.ERROR, b"EINVAL\0")
    assert await bad.call_raw(XsType.INTRODUCE, b"x\0y\0z\0") == (XsType.ERROR, b"EINVAL\0")
    assert await bad.call_raw(XsType.SET_PERMS, b"/\0q7\0") == (XsType.ERROR, b"EINVAL\0")
    assert await bad.call_raw(XsType.READ, b"/\xff\xfe\0") == (XsType.ERROR, b"EINVAL\0")
    # an oversized message closes that connection only
    bad.send_raw(HDR.pack(XsType.WRITE, 1, 0, 4097) + b"x" * 4097)
    assert await bad.closed()
    await good.write("/still", "here")
    assert await good.read("/still") == b"here"
    # a client vanishing mid-message does not hurt either
    half = await client()
    half.send_raw(HDR.pack(XsType.READ, 1, 0, 10) + b"/abc")
    await half.aclose()
    assert await good.read("/still") == b"here"
    assert xs.stats["protocol_errors"] == 1 and xs.stats["internal_errors"] == 0


async def test_pipelined_requests_are_answered_in_order(client):
    c = await client()
    msgs = b"".join(HDR.pack(XsType.WRITE, i, 0, len(p)) + p
                    for i, p in enumerate([b"/p/%d\0v%d" % (i, i) for i in range(20)]))
    c.send_raw(msgs)
    for i in range(20):
        t, r, tx, body = await c.read_msg()
        assert (t, r, body) == (XsType.WRITE, i, b"OK\0")
    assert await c.directory("/p") == [str(i) for i in range(20)]


async def test_server_shutdown_closes_clients(sock_dir):
    from aiovmm.xenstore import XenstoreServer
    async with XenstoreServer(sock_dir / "s.sock") as xs:
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "s.sock"))
        await xs.aclose()
        await xs.aclose()                                   # idempotent
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
    assert not (sock_dir / "s.sock").exists()


async def test_live_socket_is_refused_stale_replaced_only_own_unlinked(sock_dir):
    """A second server (a second `aiovmm run --xenstore-socket PATH`) on the socket of a live
    one is refused with one line and takes nothing over: the first still answers at its own
    inode. A stale socket file (its listener gone) is replaced. A server deletes at exit
    only the socket it bound: not one another process put at the path since."""
    import errno
    import os
    import socket

    from aiovmm.hypervisor import HostConfigError, Hypervisor
    from aiovmm.xenstore import XenstoreServer

    from .conftest import Client
    path = sock_dir / "live.sock"
    async with XenstoreServer(path):
        ino = os.lstat(path).st_ino
        second = XenstoreServer(path)
        with pytest.raises(OSError) as e:
            async with second:
                pass
        assert e.value.errno == errno.EADDRINUSE
        with pytest.raises(HostConfigError) as h:
            async with Hypervisor(memory_mib=16, xenstore_path=str(path)):
                pass
        assert str(h.value) == f"xenstore socket {path}: another process is listening on it"
        assert "\n" not in str(h.value)
        from aiovmm.control.daemon import _bind_unix      # the API socket: the same check
        with pytest.raises(OSError) as e:
            _bind_unix(str(path))
        assert e.value.errno == errno.EADDRINUSE
        assert os.lstat(path).st_ino == ino
        c = await Client.open(path)
        await c.write("/still", "first")
        assert await c.read("/still") == b"first"
        await c.aclose()
    assert not path.exists()

    # A stale socket: bound, then its listener went away without unlinking it.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    async with XenstoreServer(path) as xs:
        c = await Client.open(path)
        await c.write("/x", "y")
        await c.aclose()
        # Someone else's socket now stands at the path: this server's exit leaves it.
        os.unlink(path)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))
        other_ino = os.lstat(path).st_ino
        await xs.aclose()
    assert os.lstat(path).st_ino == other_ino
    other.close()
    os.unlink(path)

    # Not a socket: refused, left alone.
    path.write_text("mine")
    with pytest.raises(OSError) as e:
        async with XenstoreServer(path):
            pass
    assert e.value.errno == errno.ENOTSOCK and path.read_text() == "mine"


async def test_client_that_never_reads_is_disconnected_not_buffered(xs, client, monkeypatch):
    """A socket client that sets a watch and never reads while events keep coming is cut
    off once MAX_PENDING_OUTPUT bytes wait for it (lowered here to keep the test short);
    other clients carry on."""
    import socket
    import struct
    from aiovmm.xenstore import server as server_mod
    monkeypatch.setattr(server_mod, "MAX_PENDING_OUTPUT", 32 << 10)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(str(xs.sock))
    payload = b"/flood\0tok\0"
    raw.sendall(struct.pack("<IIII", XsType.WATCH, 1, 0, len(payload)) + payload)
    async with asyncio.timeout(10):                      # until the watch is registered
        while not any(w.path == "/flood" for c in xs.store.connections for w in c.watches):
            await asyncio.sleep(0.005)
    before = len(xs.store.connections)
    for batch in range(200):                  # at most 200,000 events (~6 MB)
        for i in range(1000):
            xs.store.write(f"/flood/n{i % 50}", "v")
        await asyncio.sleep(0.01)
        if len(xs.store.connections) < before:
            break
    assert len(xs.store.connections) < before, "the server kept buffering for a client that does not read"
    raw.close()
    c = await client()
    await c.write("/after", "ok")
    assert await c.read("/after") == b"ok"
