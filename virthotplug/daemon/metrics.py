"""Prometheus metrics of the daemon: ``virthotplug watch --metrics-listen [ADDR:]PORT``.

Optional: needs prometheus-client (``pip install 'virthotplug[metrics]'``), imported only
when metrics are asked for. Everything lives in a private ``CollectorRegistry`` served on
the one address given (loopback when only a port is given), never on all interfaces unless
asked. A fleet of hosts is aggregated by Prometheus itself.

Per domain (labels ``host``, ``domain``), refreshed by every reconcile, dropped when the
domain stops or goes away:

    virthotplug_domain_vcpus{layer}            config/live: current count; hypervisor:
                                               vCPUs plugged; guest: CPUs present
    virthotplug_domain_vcpus_maximum           the vCPU maximum
    virthotplug_domain_guest_cpus{state}       guest CPUs online / offline
    virthotplug_domain_finding{code,severity}  1 for each drift finding present
    virthotplug_domain_agent_connected         1 when the guest agent answered
    virthotplug_domain_last_reconcile_timestamp_seconds

Per host (label ``host``):

    virthotplug_events_total{kind}                        events received
    virthotplug_ost_events_total{device,source,status}    ACPI _OST, decoded names
    virthotplug_actions_total{outcome}                    reconcile outcome codes
    virthotplug_reconciles_total{result}                  ok / failed / error
    virthotplug_reconnects_total, virthotplug_host_connected
    virthotplug_reconcile_duration_seconds                histogram
    virthotplug_hotadd_online_latency_seconds             histogram: from the OST hot-add
                                                          event to the reconcile that finds
                                                          the CPU online in the guest

Label values that a guest can influence are bounded: _OST names drop their hex detail
("reserved (0x1234)" counts as "reserved"), so a hostile guest cannot create series at will.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from virthotplug.core.errors import UsageError
from virthotplug.core.events import FORGET, Event, HostEvent, OstMonitorEvent

if TYPE_CHECKING:
    from virthotplug.core.schedule import Job
    from virthotplug.core.view import VcpuView
    from virthotplug.daemon.watch import JobResult

log = logging.getLogger("virthotplug.daemon.watch")

LOOPBACK = "127.0.0.1"
INSTALL_HINT = "install it with: pip install 'virthotplug[metrics]'"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
MAX_PENDING_HOTADDS = 4096  # hot-adds waiting to be seen online, across all domains
MAX_FORGOTTEN = 4096  # stopped domains remembered (see ``Metrics.forget``)
LAYERS = ("config", "live", "hypervisor", "guest")


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
        raise UsageError(f"--metrics-listen {text!r}: write an IPv6 address as [ADDR]:PORT")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"--metrics-listen {text!r}: expected [ADDR:]PORT, PORT 0-65535")
    return host or LOOPBACK, int(port_text)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise UsageError(f"--metrics-listen needs prometheus-client; {INSTALL_HINT}") from None
    return prometheus_client


def _bounded(name: str) -> str:
    """A decoded _OST name without its hex detail: a bounded set of label values."""
    return name.split(" (", 1)[0]


@dataclass
class _DomainSeries:
    """The label sets one domain has in the registry (to remove them exactly)."""

    name: str
    layers: set[str] = field(default_factory=set)
    guest: bool = False
    findings: set[tuple[str, str]] = field(default_factory=set)


class Metrics:
    """The daemon's metrics, and the observer ``Watch`` reports to (see ``watch.Observer``).

    ``event`` runs on the daemon's main thread, ``reconciled``/``failed`` on reconcile
    workers: shared bookkeeping is under one lock.
    """

    def __init__(self) -> None:
        prom = _prometheus()
        self.registry = prom.CollectorRegistry(auto_describe=True)
        reg = self.registry
        prom.ProcessCollector(registry=reg)  # process_* : the daemon's own RSS, CPU, fds
        dom = ["host", "domain"]
        self.vcpus = prom.Gauge(
            "virthotplug_domain_vcpus",
            "vCPUs by layer: config/live current count, hypervisor plugged, guest present",
            [*dom, "layer"],
            registry=reg,
        )
        self.vcpus_max = prom.Gauge(
            "virthotplug_domain_vcpus_maximum", "vCPU maximum of the domain", dom, registry=reg
        )
        self.guest_cpus = prom.Gauge(
            "virthotplug_domain_guest_cpus",
            "guest CPUs by state, from the guest agent",
            [*dom, "state"],
            registry=reg,
        )
        self.finding = prom.Gauge(
            "virthotplug_domain_finding",
            "1 for each drift finding present at the last reconcile",
            [*dom, "code", "severity"],
            registry=reg,
        )
        self.agent = prom.Gauge(
            "virthotplug_domain_agent_connected",
            "1 when the guest agent answered at the last reconcile",
            dom,
            registry=reg,
        )
        self.last_reconcile = prom.Gauge(
            "virthotplug_domain_last_reconcile_timestamp_seconds",
            "when the domain was last reconciled (Unix time)",
            dom,
            registry=reg,
        )
        self.events = prom.Counter(
            "virthotplug_events", "events received, by kind", ["host", "kind"], registry=reg
        )
        self.ost = prom.Counter(
            "virthotplug_ost_events",
            "ACPI_DEVICE_OST events by decoded source and status",
            ["host", "device", "source", "status"],
            registry=reg,
        )
        self.actions = prom.Counter(
            "virthotplug_actions", "reconcile outcomes by code", ["host", "outcome"], registry=reg
        )
        self.reconciles = prom.Counter(
            "virthotplug_reconciles",
            "reconciles by result (ok, failed: an action failed, error: could not reconcile)",
            ["host", "result"],
            registry=reg,
        )
        self.reconnects = prom.Counter(
            "virthotplug_reconnects", "connections re-established", ["host"], registry=reg
        )
        self.connected = prom.Gauge(
            "virthotplug_host_connected", "1 while connected to the host", ["host"], registry=reg
        )
        self.duration = prom.Histogram(
            "virthotplug_reconcile_duration_seconds",
            "time one reconcile of one domain took",
            ["host"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.hotadd_latency = prom.Histogram(
            "virthotplug_hotadd_online_latency_seconds",
            "from the OST hot-add event to the reconcile that finds the CPU online in the guest",
            ["host"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._lock = threading.Lock()
        self._domains: dict[tuple[str, str], _DomainSeries] = {}
        self._connected_before: set[str] = set()
        # (host, uuid, vCPU id) → monotonic time of its OST hot-add event; insertion ordered.
        self._hotadds: dict[tuple[str, str, int], float] = {}
        self._forgotten: dict[tuple[str, str], float] = {}  # (host, uuid) → when it stopped
        self._server: Any = None
        self.clock = time.monotonic  # the events' clock (tests replace it)

    # --- the observer -----------------------------------------------------------------------

    def event(self, ev: Event) -> None:
        try:
            self._event(ev)
        except Exception:  # metrics must never take the daemon down
            log.exception("metrics: recording an event failed")

    def reconciled(self, job: Job, result: JobResult, seconds: float) -> None:
        try:
            self._reconciled(job, result, seconds)
        except Exception:
            log.exception("metrics: recording a reconcile failed")

    def failed(self, job: Job, seconds: float) -> None:
        try:
            self.duration.labels(job.ref.host).observe(seconds)
            self.reconciles.labels(job.ref.host, "error").inc()
        except Exception:
            log.exception("metrics: recording a reconcile failed")

    def _event(self, ev: Event) -> None:
        if isinstance(ev, HostEvent):
            self._host_event(ev)
            return
        if ev.domain is None:
            return
        host = ev.domain.host
        self.events.labels(host, ev.kind).inc()
        if isinstance(ev, OstMonitorEvent) and ev.ost is not None:
            ost = ev.ost
            self.ost.labels(
                host,
                "cpu" if ost.is_cpu else "other",
                _bounded(ost.source_name),
                _bounded(ost.status_name),
            ).inc()
            vcpu = ev.hotadd_vcpu
            if vcpu is not None:
                with self._lock:
                    self._hotadds.setdefault((host, ev.domain.uuid, vcpu), ev.mono)
                    while len(self._hotadds) > MAX_PENDING_HOTADDS:
                        del self._hotadds[next(iter(self._hotadds))]
        if ev.intent == FORGET:
            self.forget(host, ev.domain.uuid)

    def _host_event(self, ev: HostEvent) -> None:
        if ev.what == "listed":
            return  # internal: the resync's list of domains
        self.events.labels(ev.host, ev.kind).inc()
        if ev.what == "connected":
            self.connected.labels(ev.host).set(1)
            with self._lock:
                again = ev.host in self._connected_before
                self._connected_before.add(ev.host)
            if again:
                self.reconnects.labels(ev.host).inc()
        elif ev.what == "lost":
            self.connected.labels(ev.host).set(0)

    def _reconciled(self, job: Job, result: JobResult, seconds: float) -> None:
        host = job.ref.host
        self.duration.labels(host).observe(seconds)
        self.reconciles.labels(host, "failed" if result.failed else "ok").inc()
        codes = str(result.record.outcome or "")
        for code in filter(None, codes.split(",")):
            self.actions.labels(host, code).inc()
        view = result.view
        if view is None:
            return
        with self._lock:
            # A reconcile that began before the domain stopped must not bring back its series.
            forgotten = self._forgotten.get((host, view.uuid))
            if forgotten is not None and forgotten >= self.clock() - seconds:
                return
            self._forgotten.pop((host, view.uuid), None)
        self._update_domain(host, view)
        self._hotadd_latency(host, view)

    def forget(self, host: str, uuid: str) -> None:
        """Drop a domain's series (it stopped or went away)."""
        key = (host, uuid)
        with self._lock:
            self._forgotten[key] = self.clock()
            while len(self._forgotten) > MAX_FORGOTTEN:
                del self._forgotten[next(iter(self._forgotten))]
            for pending in [k for k in self._hotadds if k[:2] == key]:
                del self._hotadds[pending]
            series = self._domains.pop(key, None)
            if series is not None:
                self._remove_series(host, series)

    # --- per-domain series ------------------------------------------------------------------

    def _update_domain(self, host: str, view: VcpuView) -> None:
        key = (host, view.uuid)
        with self._lock:
            series = self._domains.get(key)
            renamed = series is not None and series.name != view.name
            if series is None or renamed:
                old, series = series, _DomainSeries(view.name)
                self._domains[key] = series
            else:
                old = None
            if old is not None:
                self._remove_series(host, old)
            self._set_layers(host, view, series)
            name = view.name
            if view.guest is not None:
                self.guest_cpus.labels(host, name, "online").set(len(view.guest.online))
                self.guest_cpus.labels(host, name, "offline").set(len(view.guest.offline))
                series.guest = True
            elif series.guest:
                for state in ("online", "offline"):
                    _remove(self.guest_cpus, host, name, state)
                series.guest = False
            findings = {(f.code, f.severity) for f in view.findings}
            for code, severity in series.findings - findings:
                _remove(self.finding, host, name, code, severity)
            for code, severity in findings:
                self.finding.labels(host, name, code, severity).set(1)
            series.findings = findings
            self.agent.labels(host, name).set(1 if view.agent.state == "connected" else 0)
            self.last_reconcile.labels(host, name).set(time.time())

    def _set_layers(self, host: str, view: VcpuView, series: _DomainSeries) -> None:
        counts = {
            "config": view.config.current if view.config is not None else None,
            "live": view.live.current if view.live is not None else None,
            "hypervisor": view.hypervisor.count if view.hypervisor is not None else None,
            "guest": len(view.guest.present) if view.guest is not None else None,
        }
        for layer, count in counts.items():
            if count is None:
                if layer in series.layers:
                    _remove(self.vcpus, host, view.name, layer)
                    series.layers.discard(layer)
            else:
                self.vcpus.labels(host, view.name, layer).set(count)
                series.layers.add(layer)
        maximum = view.live or view.config
        if maximum is not None:
            self.vcpus_max.labels(host, view.name).set(maximum.maximum)

    def _remove_series(self, host: str, series: _DomainSeries) -> None:
        name = series.name
        for layer in LAYERS:
            _remove(self.vcpus, host, name, layer)
        for state in ("online", "offline"):
            _remove(self.guest_cpus, host, name, state)
        for code, severity in series.findings:
            _remove(self.finding, host, name, code, severity)
        for gauge in (self.vcpus_max, self.agent, self.last_reconcile):
            _remove(gauge, host, name)

    def _hotadd_latency(self, host: str, view: VcpuView) -> None:
        if view.guest is None:
            return
        now = self.clock()
        with self._lock:
            done = [
                (key, at)
                for key, at in self._hotadds.items()
                if key[0] == host and key[1] == view.uuid and key[2] in view.guest.online
            ]
            for key, _ in done:
                del self._hotadds[key]
        for _, at in done:
            self.hotadd_latency.labels(host).observe(max(0.0, now - at))

    # --- exposition -------------------------------------------------------------------------

    def text(self) -> bytes:
        """The registry in the Prometheus text format (what a scrape returns)."""
        return bytes(_prometheus().generate_latest(self.registry))

    def serve(self, address: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on ``address:port`` only, from a daemon thread; the bound
        address is returned (port 0 picks a free one)."""
        self._server = _serve(self.registry, address, port)
        bound = self._server.server_address
        log.info("metrics: serving http://%s/metrics", _host_port(bound[0], bound[1]))
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # older prometheus-client raises when absent
        metric.remove(*labels)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _serve(registry: Any, address: str, port: int) -> Any:
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    prom = _prometheus()
    try:
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UsageError(f"--metrics-listen: cannot resolve {address!r}: {exc}") from None

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        server = make_server(
            address, port, prom.make_wsgi_app(registry), Server, handler_class=QuietHandler
        )
    except OSError as exc:
        where = _host_port(address, port)
        raise UsageError(f"--metrics-listen: cannot listen on {where}: {exc.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server


def start(listen: str) -> Optional[Metrics]:
    """Metrics for ``--metrics-listen`` (None when not asked for), already serving."""
    if not listen:
        return None
    address, port = parse_listen(listen)
    metrics = Metrics()
    metrics.serve(address, port)
    return metrics
