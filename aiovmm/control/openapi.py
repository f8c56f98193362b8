"""The OpenAPI 3 document of the daemon's API, built from api.ROUTES (so no route can be
missing from it) plus the schemas below. Served at /openapi.json; checked against the live
daemon by schemathesis in tests/control/test_openapi.py."""
from __future__ import annotations

from typing import Any

from .. import __version__

ERROR = {"$ref": "#/components/schemas/Error"}


def _obj(props: dict, required: list[str] | None = None, extra: bool = False) -> dict:
    d: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": extra}
    if required:
        d["required"] = required
    return d


INT = {"type": "integer"}
STR = {"type": "string"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}

SCHEMAS: dict[str, dict] = {
    "Error": _obj({"error": STR}, ["error"]),
    "Vif": _obj({"devid": INT, "mac": STR, "ifname": STR, "bridge": STR, "backend": STR,
                 "state": INT, "frontend_state": INT, "event_channel": INT, "tx_ring_ref": INT,
                 "rx_ring_ref": INT, "tx_bytes": INT, "tx_packets": INT, "rx_bytes": INT,
                 "rx_packets": INT},
                ["devid", "mac", "ifname", "state", "frontend_state", "tx_bytes", "rx_bytes"]),
    "Vbd": _obj({"devid": INT, "vdev": STR, "target": STR, "backend": STR, "readonly": BOOL,
                 "state": INT, "frontend_state": INT, "event_channel": INT, "ring_ref": INT,
                 "rd_reqs": INT, "wr_reqs": INT, "rd_sectors": INT, "wr_sectors": INT},
                ["devid", "vdev", "state", "frontend_state"]),
    "Domain": _obj({
        "id": INT, "name": STR, "uuid": STR, "state": {"type": "string", "pattern": "^[r-][b-][p-][s-][c-][d-]$"},
        "status": {"type": "string", "enum": ["running", "blocked", "paused", "shutdown"]},
        "memory_kib": INT, "max_memory_kib": INT, "max_pages_kib": INT, "target_kib": INT, "vcpus": INT,
        "cpu_time_s": NUM, "uptime_s": NUM, "weight": INT, "cap": INT,
        "vifs": {"type": "array", "items": {"$ref": "#/components/schemas/Vif"}},
        "vbds": {"type": "array", "items": {"$ref": "#/components/schemas/Vbd"}},
        "hypercalls": INT,
        "config": {"type": "object"},
        "vcpu_accounting": {"type": "array", "items": {"type": "object"}},
    }, ["id", "name", "uuid", "state", "status", "memory_kib", "max_memory_kib", "target_kib",
        "vcpus", "cpu_time_s", "uptime_s", "weight", "cap", "vifs", "vbds"]),
    "CreateRequest": {"oneOf": [
        _obj({"config": {**STR, "description": "xl.cfg text"},
              "config_path": {**STR, "description": "absolute path the config came from (relative kernel paths)"},
              "name": STR}, ["config"]),
        _obj({"kernel": {**STR, "minLength": 1}, "memory": {"type": "integer", "minimum": 1, "maximum": 1 << 20},
              "name": STR, "cmdline": STR, "ramdisk": {**STR, "description": "initial ramdisk (xl ramdisk=)"},
              "maxmem": {"type": "integer", "minimum": 1, "maximum": 1 << 20,
                         "description": "MiB the balloon may grow to (xl maxmem=)"},
              "vcpus": {"type": "integer", "minimum": 1, "maximum": 32},
              "vif": {"type": "array", "items": STR}, "disk": {"type": "array", "items": STR}},
             ["kernel"]),
    ]},
    "Status": _obj({"id": INT, "name": STR, "status": STR}, ["id", "name", "status"]),
    "DeviceStatus": _obj({"devid": INT, "status": STR}, ["devid", "status"]),
    "Memory": _obj({"mib": {"type": "integer", "minimum": 1, "maximum": 1 << 20}}, ["mib"]),
    "Sched": _obj({"id": INT, "name": STR, "weight": INT, "cap": INT}, ["id", "name", "weight", "cap"]),
    "SchedSet": _obj({"weight": {"type": "integer", "minimum": 1, "maximum": 65535},
                      "cap": {"type": "integer", "minimum": 0, "maximum": 6400}}),
    "IoLimit": _obj({"rate": {**STR, "description": "vif: xl rate, e.g. 10Mb/s@20ms"},
                     "iops": {"type": "integer", "minimum": 1}, "bps": {"type": "integer", "minimum": 1},
                     "burst_ms": {"type": "integer", "minimum": 1, "maximum": 10000}}),
    "Shutdown": _obj({"wait": BOOL, "timeout": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 600}}),
    "Vcpus": _obj({"id": INT, "name": STR, "vcpus": {"type": "array", "items": _obj({
        "vcpu": INT, "cpu": INT, "state": {"type": "string", "enum": ["r", "b", "p"]}, "online": BOOL,
        "time_s": NUM, "affinity": STR, "wait_s": NUM, "host_steal_s": NUM, "slices": INT,
        "priority": {"type": "string", "enum": ["BOOST", "UNDER", "OVER"]}, "parked": BOOL},
        ["vcpu", "cpu", "state", "time_s"])}}, ["id", "name", "vcpus"]),
    "Info": _obj({"host": STR, "release": STR, "machine": STR, "nr_cpus": INT, "total_memory": INT,
                  "free_memory": INT, "free_frames": INT, "xen_major": INT, "xen_minor": INT,
                  "xen_version": STR, "nr_domains": INT, "uptime_s": NUM, "tasks": INT,
                  "xenstore_nodes": INT, "event_loop_lag_s": NUM},
                 ["host", "nr_cpus", "total_memory", "free_memory", "free_frames", "nr_domains",
                  "tasks", "xenstore_nodes"], extra=True),
    "DeviceSpec": _obj({"spec": {**STR, "description": "xl syntax, e.g. mac=00:16:3e:01:02:03,bridge=br0 or target=/img,vdev=xvdb,access=rw"}}),
    "ConsoleInput": _obj({"data": STR}, ["data"]),
    "Queued": _obj({"queued": {**INT, "description": "bytes taken (input waiting for the guest is bounded)"}},
                   ["queued"]),
    "Dmesg": _obj({"lines": {"type": "array", "items": STR}}, ["lines"]),
    "SaveRequest": _obj({"file": {**STR, "description": "absolute path inside the daemon's save directory"},
                         "checkpoint": {**BOOL, "description": "keep the domain running (xl save -c)"}}, ["file"]),
    "Saved": _obj({"id": INT, "name": STR, "file": STR, "pages": INT, "bytes": INT, "seconds": NUM,
                   "status": {"type": "string", "enum": ["saved", "running"]}},
                  ["id", "name", "file", "pages", "bytes", "seconds", "status"]),
    "RestoreRequest": _obj({"file": STR, "name": STR}, ["file"]),
    "MigrateRequest": _obj({"destination": {**STR, "description": "HOST:PORT of the other daemon's --migration-listen"},
                            "downtime_ms": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 10000},
                            "bandwidth": {"type": "number", "minimum": 0, "description": "bytes/s, 0 = unlimited"}},
                           ["destination"]),
    "Progress": _obj({"id": INT, "operation": {"type": "string", "enum": ["save", "migrate"]}, "phase": STR,
                      "done": INT, "total": INT, "rounds": INT, "dirty": INT,
                      "round_done": INT, "round_total": INT},
                     ["id", "operation", "phase", "done", "total"]),
    "Migrated": _obj({"id": INT, "name": STR, "destination": STR, "remote_id": INT, "rounds": INT,
                      "pages_sent": INT, "bytes_sent": INT, "pages_ratio": NUM, "downtime_ms": NUM,
                      "total_s": NUM}, ["id", "name", "destination", "remote_id", "rounds", "downtime_ms"]),
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, desc: str = "OK") -> dict:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


# operationId -> (summary, request schema or None, success status, success schema, errors)
OPS: dict[str, tuple[str, dict | None, int, dict | None, list[int]]] = {
    "info": ("Host and hypervisor information (xl info)", None, 200, _ref("Info"), []),
    "listDomains": ("Domains (xl list)", None, 200, {"type": "array", "items": _ref("Domain")}, [400]),
    "createDomain": ("Create and start a domain from xl.cfg text or fields (xl create)", _ref("CreateRequest"),
                     201, _ref("Domain"), [400, 409]),
    "getDomain": ("One domain", None, 200, _ref("Domain"), [400, 404]),
    "destroyDomain": ("Destroy a domain at once (xl destroy)", None, 200, _ref("Status"), [404, 409]),
    "pauseDomain": ("Pause (xl pause)", None, 200, _ref("Domain"), [404, 409]),
    "unpauseDomain": ("Unpause (xl unpause)", None, 200, _ref("Domain"), [404, 409]),
    "shutdownDomain": ("Ask the guest to power off (xl shutdown [-w])", _ref("Shutdown"), 200, _ref("Status"), [400, 404, 409]),
    "rebootDomain": ("Ask the guest to reboot (xl reboot); the domain is built again", None, 200, _ref("Status"), [404, 409]),
    "setMemoryTarget": ("Balloon target through xenstore memory/target, the hypervisor's limit with it (xl mem-set)", _ref("Memory"), 200, _ref("Domain"), [400, 404, 409]),
    "setMemoryMax": ("Maximum memory (xl mem-max)", _ref("Memory"), 200, _ref("Domain"), [400, 404, 409]),
    "listVcpus": ("vCPUs (xl vcpu-list)", None, 200, _ref("Vcpus"), [404]),
    "getSchedCredit": ("Credit scheduler weight and cap (xl sched-credit)", None, 200, _ref("Sched"), [404]),
    "setSchedCredit": ("Set weight and/or cap (xl sched-credit -w/-c)", _ref("SchedSet"), 200, _ref("Sched"), [400, 404, 409]),
    "setIoLimit": ("Set or lift a vif's rate (xl syntax) or a vbd's iops/bps token bucket", _ref("IoLimit"), 200,
                   {"type": "object"}, [400, 404, 409]),
    "listVifs": ("Network interfaces (xl network-list)", None, 200, {"type": "array", "items": _ref("Vif")}, [404]),
    "attachVif": ("Hot-plug a network interface (xl network-attach)", _ref("DeviceSpec"), 201, _ref("Vif"), [400, 404, 409]),
    "detachVif": ("Unplug a network interface by devid or MAC (xl network-detach)", None, 200, _ref("DeviceStatus"), [404, 409]),
    "listVbds": ("Block devices (xl block-list)", None, 200, {"type": "array", "items": _ref("Vbd")}, [404]),
    "attachVbd": ("Hot-plug a block device (xl block-attach)", _ref("DeviceSpec"), 201, _ref("Vbd"), [400, 404, 409]),
    "detachVbd": ("Unplug a block device by devid or vdev (xl block-detach)", None, 200, _ref("DeviceStatus"), [404, 409]),
    "saveDomain": ("Suspend the guest and write it to a file in Xen's migration stream v2 (xl save [-c])",
                   _ref("SaveRequest"), 200, _ref("Saved"), [400, 404, 409]),
    "restoreDomain": ("A domain from a save file (xl restore)", _ref("RestoreRequest"), 201, _ref("Domain"),
                      [400, 404, 409]),
    "migrateDomain": ("Live-migrate the domain to another daemon (xl migrate)", _ref("MigrateRequest"), 200,
                      _ref("Migrated"), [400, 404, 409]),
    "getProgress": ("Progress of a save or live migration in progress", None, 200, _ref("Progress"), [404]),
    "getConsole": ("Recent console output (text)", None, 200, None, [404]),
    "sendConsoleInput": ("Send input to the guest's console", _ref("ConsoleInput"), 200, _ref("Queued"), [400, 404, 409]),
    "consoleWebSocket": ("Interactive console (WebSocket upgrade; xl console)", None, 101, None, [400, 404]),
    "dmesg": ("The hypervisor's log (xl dmesg [-c])", None, 200, _ref("Dmesg"), [400]),
    "openapi": ("This document", None, 200, {"type": "object"}, []),
    "metrics": ("Prometheus metrics", None, 200, None, []),
}

QUERY = {
    "listDomains": [("long", "include each domain's configuration (xl list -l)")],
    "getDomain": [("long", "include the configuration")],
    "dmesg": [("clear", "clear the log after reading (xl dmesg -c)")],
    "consoleWebSocket": [("access_token", "the bearer token, for browsers (TCP listener only)"),
                         ("raw", "output as the guest wrote it, terminal controls included (default: "
                                 "text, control bytes replaced)")],
}

PARAM_DOC = {"dom": "domain id or name", "dev": "device id, vdev (vbd) or MAC (vif)"}


def document() -> dict:
    from .api import ROUTES
    paths: dict[str, dict] = {}
    for method, path, _, op_id in ROUTES:
        summary, req, code, schema, errors = OPS[op_id]
        params = [{"name": n, "in": "path", "required": True, "description": PARAM_DOC[n],
                   "schema": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}}
                  for n in ("dom", "dev") if f"{{{n}}}" in path]
        for q, desc in QUERY.get(op_id, []):
            params.append({"name": q, "in": "query", "required": False, "description": desc,
                           "schema": {"type": "string"} if q == "access_token"
                           else {"type": "string", "enum": ["true", "false"]}})
        if schema is not None:
            ok = _json(schema)
        elif op_id == "metrics":
            ok = {"description": "OK", "content": {"text/plain": {"schema": STR}}}
        elif op_id == "getConsole":
            ok = {"description": "OK", "content": {"text/plain": {"schema": STR}}}
        else:
            ok = {"description": "Switching Protocols"}
        responses: dict[str, Any] = {str(code): ok}
        for e in errors:
            responses[str(e)] = _json(ERROR, "refused: one clear message")
        op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
        if params:
            op["parameters"] = params
        if req is not None:
            op["requestBody"] = {"required": op_id not in ("shutdownDomain", "setSchedCredit", "attachVif", "setIoLimit"),
                                 "content": {"application/json": {"schema": req}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "aiovmm control API", "version": __version__,
                 "description": "The toolstack of aiovmm (xl's verbs over HTTP). On the unix socket "
                                "no authentication (mode 0600); over TCP, TLS and a bearer token."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
