"""The CLI's client of the daemon: plain HTTP/1.1 over the unix socket (stdlib, so a verb
starts fast), or HTTPS with a bearer token when AIOVMM_URL is set. The interactive console
uses aiohttp's WebSocket client over the same transport."""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_SOCKET = "/run/aiovmm/aiovmm.sock"


def split_host_port(dest: str) -> tuple[str, int]:
    """A migration destination, HOST:PORT (an IPv6 host in brackets): (host, port). The
    daemon's check and the CLI's (a bad one is a usage error there, before any request).
    Raises ValueError."""
    host, sep, port = dest.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= 5) \
            or not 0 < int(port) < 65536:
        raise ValueError(f"{dest!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class ClientError(Exception):
    """The daemon refused (its one-line message) or cannot be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        self.sock = s


def socket_path(arg: str | None = None) -> str:
    return arg or os.environ.get("AIOVMM_SOCKET") or DEFAULT_SOCKET


def dom_path(ref: str, *rest: str) -> str:
    return "/api/v1/domains/" + "/".join(quote(p, safe="") for p in (ref, *rest))


class Client:
    def __init__(self, sock: str | None = None, timeout: float = 120.0) -> None:
        self.sock = socket_path(sock)
        self.url = os.environ.get("AIOVMM_URL")          # https://host:port (TCP listener)
        self.token = os.environ.get("AIOVMM_TOKEN", "")
        self.cafile = os.environ.get("AIOVMM_CACERT")
        self.timeout = timeout

    def _conn(self) -> http.client.HTTPConnection:
        if self.url:
            u = urlsplit(self.url)
            if u.scheme != "https":
                raise ClientError("AIOVMM_URL must be https:// (the TCP listener is TLS only)")
            ctx = ssl.create_default_context(cafile=self.cafile)
            return http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=self.timeout, context=ctx)
        return _UnixConnection(self.sock, self.timeout)

    def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.url:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._conn()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except FileNotFoundError:
            raise ClientError(f"no daemon at {self.sock} (start `aiovmm serve`, or set --socket / AIOVMM_SOCKET)") from None
        except ConnectionRefusedError:
            raise ClientError(f"daemon at {self.sock} is not accepting connections") from None
        except PermissionError:
            raise ClientError(f"{self.sock}: permission denied (the socket is mode 0600)") from None
        except (OSError, http.client.HTTPException) as e:
            raise ClientError(f"cannot talk to the daemon: {e}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                msg = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                msg = payload.decode(errors="replace").strip() or resp.reason
            raise ClientError(msg, resp.status)
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    # -- the interactive console ---------------------------------------------------------------
    def ws_session(self):
        """(aiohttp ClientSession, base URL) for WebSocket use on this transport."""
        import aiohttp
        if self.url:
            ctx = ssl.create_default_context(cafile=self.cafile)
            conn = aiohttp.TCPConnector(ssl=ctx)
            headers = {"Authorization": f"Bearer {self.token}"}
            return aiohttp.ClientSession(connector=conn, headers=headers), self.url.rstrip("/")
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.sock)), "http://localhost"
