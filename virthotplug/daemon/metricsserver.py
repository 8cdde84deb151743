"""The daemon's metrics endpoint: ``virthotplug watch --metrics-listen [ADDR:]PORT``.

Serves ``/metrics`` (``metrics.Metrics``'s registry) over HTTP on the one address given
(loopback when only a port is given), never on all interfaces unless asked, from a daemon
thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable, Optional

from virthotplug.core.errors import UsageError, VirtHotplugError, quote
from virthotplug.core.settings import parse_integer
from virthotplug.daemon.domains import DomainRegistry
from virthotplug.daemon.metrics import Metrics, prometheus

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def parse_listen(text: str) -> tuple[str, int]:
    """``PORT``, ``ADDR:PORT`` or ``[IPv6]:PORT`` → (address, port); no address: loopback.

    Port 0 asks the kernel for a free port (the one chosen is logged).
    """
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"--metrics-listen {quote(text)}: write an IPv6 address as [ADDR]:PORT")
    try:
        port = parse_integer(port_text, 0, 65535)  # the one number rule: ASCII digits only
    except ValueError:
        raise UsageError(
            f"--metrics-listen {quote(text)}: expected [ADDR:]PORT, PORT 0-65535"
        ) from None
    return host or LOOPBACK, port


class MetricsServer:
    """Serves one ``Metrics``' registry."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._server: Any = None

    def serve(self, address: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on ``address:port`` only, from a daemon thread; the bound
        address is returned (port 0 picks a free one)."""
        self._server = _serve(self.metrics.registry, address, port)
        bound = self._server.server_address
        log.info("metrics: serving http://%s/metrics", _host_port(bound[0], bound[1]))
        if not _is_loopback(str(bound[0])):
            log.warning(
                "metrics: %s is not a loopback address: every host that can reach it can read "
                "the metrics (domain names, vCPU counts); bind 127.0.0.1, or restrict access",
                _host_port(bound[0], bound[1]),
            )
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 (a wildcard such as 0.0.0.0 or :: is every interface: not one)."""
    import ipaddress

    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


INDEX_PAGE = (
    b"<html><head><title>virthotplug</title></head><body>"
    b'<p>virthotplug watch: <a href="/metrics">metrics</a></p></body></html>\n'
)


def _only_metrics(metrics_app: Any) -> Any:
    """The WSGI app: ``/metrics`` (the registry), a small page at ``/``, 404 elsewhere."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [INDEX_PAGE]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are at /metrics\n"]

    return app


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _serve(registry: Any, address: str, port: int) -> Any:
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    prom = prometheus()
    try:
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UsageError(f"--metrics-listen: cannot resolve {quote(address)}: {exc}") from None

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        server = make_server(
            address,
            port,
            _only_metrics(prom.make_wsgi_app(registry)),
            Server,
            handler_class=QuietHandler,
        )
    except OSError as exc:
        where = _host_port(address, port)
        # Not a usage error: the same command works once the port is free (exit status 1).
        raise VirtHotplugError(
            f"--metrics-listen: cannot listen on {where}: {exc.strerror}"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server


def start(listen: str, domains: Optional[DomainRegistry] = None) -> Optional[MetricsServer]:
    """Metrics for ``--metrics-listen`` (None when not asked for), already serving."""
    if not listen:
        return None
    address, port = parse_listen(listen)
    server = MetricsServer(Metrics(domains))
    server.serve(address, port)
    return server
