"""The control plane: `aiovmm serve` (one Hypervisor, many domains) with a REST API on a
unix socket, an OpenAPI document, a web page, Prometheus metrics, and the client the
xl-style CLI verbs use (ARCHITECTURE §9).

    daemon.py     the Controller (domains, their configs, lifecycle) and `serve`
    api.py        HTTP routes (aiohttp), errors as 4xx with one message
    openapi.py    the OpenAPI 3 document of every route the CLI uses
    metrics.py    /metrics (prometheus-client), CPU-time metering, event-loop lag
    client.py     the CLI's HTTP client (unix socket, or HTTPS with a bearer token)
    cli_verbs.py  the verbs: create, list, console, pause, ... (xl's names and columns)
    web/          the page served at / (written here; nothing from a CDN)
"""
