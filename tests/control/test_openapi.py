"""Issue 12: the OpenAPI document against the live daemon (schemathesis: zero 5xx, zero
schema violations), over the TCP listener, which is TLS with a bearer token only."""
from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .ctlhelp import Daemon, _cli_command, kernel

TOKEN = "aiovmm-test-token-0123456789"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (d / "token").write_text(TOKEN + "\n")
    port = _free_port()
    daemon = Daemon(machine_memory=128, extra=["--listen", f"127.0.0.1:{port}", "--tls-cert", str(d / "cert.pem"),
                                               "--tls-key", str(d / "key.pem"), "--token-file", str(d / "token")])
    daemon.url = f"https://127.0.0.1:{port}"
    daemon.cert = str(d / "cert.pem")
    try:
        yield daemon
    finally:
        daemon.stop()


def _https(d, path: str, token: str | None) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=d.cert)
    req = urllib.request.Request(d.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tcp_needs_token(tls_daemon):
    assert _https(tls_daemon, "/api/v1/info", None) == (401, {"error": "missing or wrong bearer token"})
    assert _https(tls_daemon, "/api/v1/info", "wrong")[0] == 401
    status, info = _https(tls_daemon, "/api/v1/info", TOKEN)
    assert status == 200 and info["total_memory"] == 128
    # The CLI over HTTPS with the token.
    env = dict(os.environ, AIOVMM_URL=tls_daemon.url, AIOVMM_TOKEN=TOKEN, AIOVMM_CACERT=tls_daemon.cert)
    r = subprocess.run(_cli_command() + ["info"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "total_memory           : 128" in r.stdout, r.stderr


def test_tcp_without_tls_refused(tmp_path):
    r = subprocess.run(_cli_command() + ["serve", "--socket", str(tmp_path / "s.sock"), "--listen", "127.0.0.1:1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr == "aiovmm: --listen needs --tls-cert, --tls-key and --token-file (TCP is TLS + bearer token only)\n"
    assert not (tmp_path / "s.sock").exists()


def test_every_cli_endpoint_documented(tls_daemon):
    doc = tls_daemon.api("GET", "/openapi.json")
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    src = Path(__file__).resolve().parents[2] / "aiovmm" / "control" / "cli_verbs.py"
    text = src.read_text()
    # every API call the CLI makes, by the path shape it uses
    for method, path in [("GET", "/api/v1/info"), ("GET", "/api/v1/domains"), ("POST", "/api/v1/domains"),
                         ("GET", "/api/v1/domains/{dom}"), ("DELETE", "/api/v1/domains/{dom}"),
                         ("POST", "/api/v1/domains/{dom}/pause"), ("POST", "/api/v1/domains/{dom}/unpause"),
                         ("POST", "/api/v1/domains/{dom}/shutdown"), ("POST", "/api/v1/domains/{dom}/reboot"),
                         ("PUT", "/api/v1/domains/{dom}/memory/target"), ("PUT", "/api/v1/domains/{dom}/memory/max"),
                         ("GET", "/api/v1/domains/{dom}/vcpus"), ("GET", "/api/v1/domains/{dom}/sched-credit"),
                         ("PUT", "/api/v1/domains/{dom}/sched-credit"), ("GET", "/api/v1/domains/{dom}/vifs"),
                         ("POST", "/api/v1/domains/{dom}/vifs"), ("DELETE", "/api/v1/domains/{dom}/vifs/{dev}"),
                         ("GET", "/api/v1/domains/{dom}/vbds"), ("POST", "/api/v1/domains/{dom}/vbds"),
                         ("DELETE", "/api/v1/domains/{dom}/vbds/{dev}"), ("GET", "/api/v1/domains/{dom}/console/ws"),
                         ("GET", "/api/v1/dmesg")]:
        assert (method, path) in ops, (method, path)
    assert text.count("c.get(") + text.count(".post(") + text.count(".put(") + text.count(".delete(") > 0


def test_schemathesis_against_live_daemon(tls_daemon, tmp_path):
    st = Path(sys.executable).parent / "schemathesis"
    if not st.exists():
        pytest.fail("schemathesis is not installed (make setup installs the test extras)")
    base = tls_daemon.api("GET", "/api/v1/info")
    for name in ("st1", "stv1", "stv2"):
        tls_daemon.api("POST", "/api/v1/domains", {"kernel": kernel(), "memory": 4, "name": name,
                                                   "cmdline": "ticks=100000 period_ms=100"})
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text(f'''
[parameters]
"path.dom" = "st1"
"path.dev" = "0"

[[operations]]
include-operation-id = "destroyDomain"
parameters = {{ "path.dom" = "stv1" }}

[[operations]]
include-operation-id = "shutdownDomain"
parameters = {{ "path.dom" = "stv2" }}
''')
    report = tmp_path / "report.json"
    r = subprocess.run([str(st), "--config-file", str(cfg), "run", f"{tls_daemon.url}/openapi.json",
                        "-H", f"Authorization: Bearer {TOKEN}", "--tls-verify", tls_daemon.cert,
                        "-c", CHECKS, "-n", "5", "--seed", "12", "--phases", "examples,coverage,fuzzing",
                        "--exclude-operation-id", "consoleWebSocket", "--max-time", "35",
                        "--request-timeout", "30", "--no-color"],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    tail = r.stdout[-6000:]
    assert r.returncode == 0, tail + r.stderr[-2000:]
    assert "passed" in tail and "failed" not in tail.split("SUMMARY")[-1].lower(), tail
    # Nothing the fuzzer created, changed or refused leaked: destroying every domain listed
    # gives all memory and every xenstore node back.
    for d in tls_daemon.api("GET", "/api/v1/domains"):
        tls_daemon.api("DELETE", f"/api/v1/domains/{d['id']}")
    after = tls_daemon.api("GET", "/api/v1/info")
    assert after["nr_domains"] == 0
    assert after["free_frames"] == base["free_frames"]
    assert after["xenstore_nodes"] == base["xenstore_nodes"]
    assert "Traceback" not in tls_daemon.log()
