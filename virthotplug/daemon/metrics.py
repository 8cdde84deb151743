"""Prometheus metrics of the daemon: what it counts and the state its gauges show. They are
served by ``metricsserver`` (``virthotplug watch --metrics-listen [ADDR:]PORT``).

Optional: needs prometheus-client (``pip install 'virthotplug[metrics]'``), imported only
when metrics are asked for. Everything lives in a private ``CollectorRegistry``. A fleet of
hosts is aggregated by Prometheus itself.

Per domain (labels ``host``, ``domain``), from the view of each domain's last reconcile
or resync, built at scrape time (``_DomainCollector``) from the domains' records; a domain
that stops or goes away is forgotten with its record, and with it every series it had:

    virthotplug_domain_vcpus{layer}            config/live: current count; hypervisor:
                                               vCPUs plugged; guest: CPUs present
    virthotplug_domain_vcpus_maximum           the vCPU maximum
    virthotplug_domain_guest_cpus{state}       guest CPUs online / offline
    virthotplug_domain_finding{code,severity}  1 for each drift finding present;
                                               code="invalid-policy" while the domain's
                                               policy is invalid (nothing is done then)
    virthotplug_domain_agent_connected         1 when the guest agent answered
    virthotplug_domain_last_reconcile_timestamp_seconds
    virthotplug_domain_policy_info{mode}       1 for the effective policy mode the daemon
                                               last used (none while the policy is invalid)
    virthotplug_domain_hotadds_pending         hot-added vCPUs (OST device check seen) the
                                               guest has not shown online yet; only while
                                               there are some
    virthotplug_domain_hotadd_pending_since_timestamp_seconds
                                               Unix time of the oldest such OST event

Per host (label ``host``):

    virthotplug_events_total{kind}                        events received
    virthotplug_ost_events_total{device,source,status}    ACPI _OST, decoded names
    virthotplug_actions_total{outcome}                    reconcile outcome codes
    virthotplug_reconciles_total{result}                  ok / failed / error (could
                                                          not reconcile: e.g. an invalid
                                                          policy)
    virthotplug_reconnects_total, virthotplug_host_connected (0 once the host's session
                                                          gave up, with its domains'
                                                          series gone)
    virthotplug_reconcile_duration_seconds                histogram
    virthotplug_hotadd_online_latency_seconds             histogram: from the OST hot-add
                                                          event to the reconcile that finds
                                                          the CPU online in the guest

Label values that a guest can influence are bounded: _OST names drop their hex detail
("reserved (0x1234)" counts as "reserved"), so a hostile guest cannot create series at will.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

from virthotplug.core.drift import INVALID_POLICY
from virthotplug.core.errors import UsageError
from virthotplug.core.events import Event, HostEvent, OstMonitorEvent
from virthotplug.daemon.domains import DomainRegistry, Hotadd

if TYPE_CHECKING:
    from virthotplug.core.schedule import Job
    from virthotplug.core.view import VcpuView
    from virthotplug.daemon.results import JobResult

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with: pip install 'virthotplug[metrics]'"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
MAX_PENDING_HOTADDS = 4096  # hot-adds of one domain waiting to be seen online


def prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise UsageError(f"--metrics-listen needs prometheus-client; {INSTALL_HINT}") from None
    return prometheus_client


def _bounded(name: str) -> str:
    """A decoded _OST name without its hex detail: a bounded set of label values."""
    return name.split(" (", 1)[0]


class _Latest(NamedTuple):
    """A domain as its last reconcile or resync left it."""

    view: VcpuView
    at: float  # when (Unix time)
    mode: Optional[str]  # its effective policy mode; None: invalid or not known


class _Domain(NamedTuple):
    """One domain in a scrape's snapshot."""

    host: str
    latest: _Latest
    hotadds: tuple[float, ...]  # Unix times of its pending hot-adds' OST events


def online_vcpus(view: VcpuView) -> frozenset[int]:
    """libvirt's vCPU ids whose CPUs the guest has online, as far as a view alone tells: a
    view does not map vCPU ids to guest CPU ids (``virsh setvcpu DOM 3`` may be the guest's
    cpu1), so only when the guest has as many CPUs online as libvirt counts are all of
    libvirt's vCPUs online; otherwise none is known to be."""
    if view.guest is None or view.live is None or len(view.guest.online) < view.live.current:
        return frozenset()
    enabled = frozenset(v.id for v in view.live.vcpus if v.enabled)
    if not enabled and view.hypervisor is not None:
        enabled = frozenset(view.hypervisor.vcpus)
    return enabled or frozenset(range(view.live.current))


class Metrics:
    """The daemon's metrics, and the observer ``Watch`` reports to (see ``results.Observer``).

    ``event`` runs on the daemon's main thread, ``reconciled``/``failed`` on reconcile
    workers: the per-domain series live in the domains' records (``domains``, under its
    lock, forgotten with the domain), the per-host bookkeeping under a lock of its own.
    """

    def __init__(self, domains: Optional[DomainRegistry] = None) -> None:
        prom = prometheus()
        self.registry = prom.CollectorRegistry(auto_describe=True)
        reg = self.registry
        prom.ProcessCollector(registry=reg)  # process_* : the daemon's own RSS, CPU, fds
        # What accumulates over time (counters, histograms) and the per-host connection state
        # are ordinary prometheus_client metrics: the library keeps their _total, _created and
        # bucket series. The per-domain gauges describe only the last reconcile of each
        # running domain, so they are built from the domains' records at each scrape instead.
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
        self.queue_depth = prom.Gauge(
            "virthotplug_reconcile_queue_depth",
            "reconciles waiting or running, every host together",
            registry=reg,
        )
        self._lock = threading.Lock()
        self.domains = domains if domains is not None else DomainRegistry()
        self._connected_before: set[str] = set()
        self._gone: set[str] = set()  # hosts whose session ended: never watched again
        self.clock = time.monotonic  # the events' clock (tests replace it)
        reg.register(_DomainCollector(self._snapshot))

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from ``depth`` at each scrape (``Watch.queue_depth``)."""
        self.queue_depth.set_function(depth)

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

    def resynced(
        self, host: str, views: Sequence[VcpuView], modes: Optional[Mapping[str, str]] = None
    ) -> None:
        """A bulk resync read ``views`` (on its own thread): they are each domain's latest.
        ``modes``: uuid → effective policy mode; a domain missing from it has no valid one."""
        try:
            now = time.time()
            modes = modes or {}
            with self._lock:
                if host in self._gone:
                    return
            pending = []
            domains = self.domains
            with domains.lock:
                records = domains.records_of(host, [view.uuid for view in views])
                for view, rec in zip(views, records):
                    if rec is not None:
                        rec.view, rec.view_at = view, now
                        rec.policy_mode = modes.get(view.uuid)
                        if rec.hotadds:
                            pending.append(view)
            for view in pending:
                self._hotadd_latency(host, view)
        except Exception:
            log.exception("metrics: recording a resync failed")

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
                with self.domains.lock:
                    hotadds = self.domains.record(ev.domain.key).hotadds
                    hotadds.setdefault(vcpu, Hotadd(ev.mono, ev.at))
                    while len(hotadds) > MAX_PENDING_HOTADDS:
                        del hotadds[next(iter(hotadds))]

    def _host_event(self, ev: HostEvent) -> None:
        if ev.what == "listed":
            return  # internal: the resync's list of domains
        self.events.labels(ev.host, ev.kind).inc()
        if ev.what == "connected":
            with self._lock:
                if ev.host in self._gone:
                    return
                again = ev.host in self._connected_before
                self._connected_before.add(ev.host)
            self.connected.labels(ev.host).set(1)
            if again:
                self.reconnects.labels(ev.host).inc()
        elif ev.what == "lost":
            self.connected.labels(ev.host).set(0)
        elif ev.what == "gone":
            self._host_gone(ev.host)

    def _host_gone(self, host: str) -> None:
        """The host's session gave up: the host is no longer watched. Its connection gauge
        goes to 0 and stays there (nothing reconnects a session that ended), and its
        domains' series go: nothing will update them again."""
        self.connected.labels(host).set(0)
        with self._lock:
            self._gone.add(host)
        with self.domains.lock:
            for rec in self.domains.records(host):
                rec.view, rec.hotadds = None, {}

    def _reconciled(self, job: Job, result: JobResult, seconds: float) -> None:
        host = job.ref.host
        self.duration.labels(host).observe(seconds)
        self.reconciles.labels(host, _result_label(result)).inc()
        codes = str(result.record.outcome or "")
        for code in filter(None, codes.split(",")):
            self.actions.labels(host, code).inc()
        view = result.view
        if view is None:
            return
        with self._lock:
            if host in self._gone:  # a reconcile still running when the session ended
                return
        key = (host, view.uuid)
        domains = self.domains
        with domains.lock:
            # A reconcile that began before the domain stopped must not bring back its series.
            if domains.forgotten_within(key, seconds):
                return
            domains.revived(key)
            rec = domains.record(key)
            rec.view, rec.view_at, rec.policy_mode = view, time.time(), result.policy_mode
        # The reconcile maps hot-adds to guest CPUs (the guest's present set after minus
        # before): the OST event's vcpuN is libvirt's id, not the guest's CPU number.
        self._hotadd_latency(host, view, result.hotadds_online)

    def _snapshot(self) -> list[_Domain]:
        """Every domain with a view; a hot-add of a domain not yet reconciled or resynced
        shows with its first view (its labels need the view's name)."""
        with self.domains.lock:
            return [
                _Domain(
                    rec.host,
                    _Latest(rec.view, rec.view_at, rec.policy_mode),
                    tuple(hotadd.wall for hotadd in rec.hotadds.values()),
                )
                for rec in self.domains.records()
                if rec.view is not None
            ]

    def _hotadd_latency(
        self, host: str, view: VcpuView, vcpus: Optional[frozenset[int]] = None
    ) -> None:
        """Observe the pending hot-adds ``vcpus`` (vCPU ids) of ``view`` found online; without
        ``vcpus`` (a resync), those ``online_vcpus`` says."""
        if view.guest is None:
            return
        online = vcpus if vcpus is not None else online_vcpus(view)
        now = self.clock()
        with self.domains.lock:
            rec = self.domains.get((host, view.uuid))
            hotadds = rec.hotadds if rec is not None else {}
            done = [hotadds.pop(vcpu) for vcpu in [v for v in hotadds if v in online]]
        for hotadd in done:
            self.hotadd_latency.labels(host).observe(max(0.0, now - hotadd.mono))

    # --- what a scrape returns --------------------------------------------------------------

    def text(self) -> bytes:
        """The registry in the Prometheus text format (what a scrape returns)."""
        return bytes(prometheus().generate_latest(self.registry))


class _DomainCollector:
    """The per-domain gauges, built at each scrape from a snapshot of the last views
    (a prometheus_client custom collector: the registry calls ``collect``)."""

    def __init__(self, snapshot: Callable[[], list[_Domain]]) -> None:
        from prometheus_client.core import GaugeMetricFamily  # present: prometheus() checked

        self._family = GaugeMetricFamily
        self._snapshot = snapshot

    def describe(self) -> list[Any]:
        return list(self._families([]))

    def collect(self) -> Iterator[Any]:
        return self._families(self._snapshot())

    def _families(self, domains: list[_Domain]) -> Iterator[Any]:
        dom = ["host", "domain"]
        gauge = self._family
        vcpus = gauge(
            "virthotplug_domain_vcpus",
            "vCPUs by layer: config/live current count, hypervisor plugged, guest present",
            labels=[*dom, "layer"],
        )
        maximum = gauge(
            "virthotplug_domain_vcpus_maximum", "vCPU maximum of the domain", labels=dom
        )
        guest_cpus = gauge(
            "virthotplug_domain_guest_cpus",
            "guest CPUs by state, from the guest agent",
            labels=[*dom, "state"],
        )
        finding = gauge(
            "virthotplug_domain_finding",
            "1 for each drift finding present at the last reconcile",
            labels=[*dom, "code", "severity"],
        )
        agent = gauge(
            "virthotplug_domain_agent_connected",
            "1 when the guest agent answered at the last reconcile",
            labels=dom,
        )
        last = gauge(
            "virthotplug_domain_last_reconcile_timestamp_seconds",
            "when the domain was last reconciled (Unix time)",
            labels=dom,
        )
        policy = gauge(
            "virthotplug_domain_policy_info",
            "1 for the effective policy mode of the domain's last reconcile or resync",
            labels=[*dom, "mode"],
        )
        pending = gauge(
            "virthotplug_domain_hotadds_pending",
            "hot-added vCPUs (OST device check seen) the guest has not shown online yet",
            labels=dom,
        )
        since = gauge(
            "virthotplug_domain_hotadd_pending_since_timestamp_seconds",
            "when the OST event of the oldest pending hot-add came (Unix time)",
            labels=dom,
        )
        for host, (view, at, mode), hotadds in domains:
            labels = [host, view.name]
            for layer, count in _layer_counts(view).items():
                if count is not None:
                    vcpus.add_metric([*labels, layer], count)
            limits = view.live or view.config
            if limits is not None:
                maximum.add_metric(labels, limits.maximum)
            if view.guest is not None:
                guest_cpus.add_metric([*labels, "online"], len(view.guest.online))
                guest_cpus.add_metric([*labels, "offline"], len(view.guest.offline))
            for code, severity in sorted({(f.code, f.severity) for f in view.findings}):
                finding.add_metric([*labels, code, severity], 1)
            agent.add_metric(labels, 1 if view.agent.state == "connected" else 0)
            last.add_metric(labels, at)
            if mode is not None:
                policy.add_metric([*labels, mode], 1)
            if hotadds:
                pending.add_metric(labels, len(hotadds))
                since.add_metric(labels, min(hotadds))
        yield from (vcpus, maximum, guest_cpus, finding, agent, last, policy, pending, since)


def _result_label(result: JobResult) -> str:
    """ok; failed: an action failed; error: could not reconcile (an invalid policy)."""
    if result.record.outcome == INVALID_POLICY:
        return "error"
    return "failed" if result.failed else "ok"


def _layer_counts(view: VcpuView) -> dict[str, Optional[int]]:
    """config/live: current count; hypervisor: vCPUs plugged; guest: CPUs present."""
    return {
        "config": view.config.current if view.config is not None else None,
        "live": view.live.current if view.live is not None else None,
        "hypervisor": view.hypervisor.count if view.hypervisor is not None else None,
        "guest": len(view.guest.present) if view.guest is not None else None,
    }
