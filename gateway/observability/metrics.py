"""Prometheus metrics, in one registry per gateway process (no global default registry);
:mod:`gateway.dashboard.web` serves them at /metrics.

Several processes (``gateway run`` supervises ingest and worker processes) use
prometheus_client's multiprocess mode: the supervisor gives each child a
``PROMETHEUS_MULTIPROC_DIR``, where every child's values live in memory-mapped files, and
its /metrics adds them up (:class:`Merged`) with its own.  Chosen over scraping each child
(a socket per child, a parser, a merge of text) because the library keeps it consistent:
the counts of a child that died or was restarted stay in the sums (no counter reset every
time a child is replaced), a scrape needs no child to answer, and the existing metric
names and labels stay as they were (no ``process`` label for a dashboard to sum away).
The gauges say how to combine processes (``livesum``); the queue's gauges are set by the
supervisor alone, from the database, when /metrics is read."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

#: The environment variable that puts a process's metrics into shared files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self, children_dir: str | None = None) -> None:
        """*children_dir*: the multiprocess directory of the child processes, whose
        values :meth:`render` adds to this process's own (the supervisor's)."""
        self.children_dir = children_dir
        r = self.registry = CollectorRegistry()
        self.instances = Counter(
            "gateway_dicom_instances_received", "DICOM instances received", ["outcome"], registry=r
        )
        self.instance_bytes = Counter(
            "gateway_dicom_bytes_received", "Bytes of DICOM instances stored", registry=r
        )
        self.associations = Counter(
            "gateway_dicom_associations", "DICOM associations by outcome", ["outcome"], registry=r
        )
        self.active_associations = Gauge(
            "gateway_dicom_active_associations", "DICOM associations open now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.hl7_messages = Counter(
            "gateway_hl7_messages", "HL7 messages by type and ACK code", ["type", "ack"], registry=r
        )
        self.hl7_connections = Counter(
            "gateway_hl7_connections", "MLLP connections by outcome", ["outcome"], registry=r
        )
        self.spool_errors = Counter(
            "gateway_spool_errors", "Failed durable writes (spool or queue)", ["kind"], registry=r
        )
        self.queue_depth = Gauge(
            "gateway_queue_jobs",
            "Jobs in the queue by stage and state",
            ["stage", "state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.studies = Gauge(
            "gateway_studies",
            "Studies by assembly state",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.deliveries = Counter(
            "gateway_deliveries",
            "Delivery attempts by destination and outcome",
            ["destination", "outcome"],
            registry=r,
        )
        self.jobs = Counter(
            "gateway_jobs",
            "Jobs processed by stage and outcome (done, retry, dead)",
            ["stage", "outcome"],
            registry=r,
        )
        self.disk_free = Gauge(
            "gateway_disk_free_bytes",
            "Free space on the data dir's and the spool's volumes (ingest stops below "
            "gateway.min_free_mb)",
            ["volume"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.dead_letters = Gauge(
            "gateway_dead_letters", "Jobs that gave up", registry=r, multiprocess_mode="livesum"
        )
        self.purged = Counter(
            "gateway_purged_total",
            "Studies and messages deleted by retention",
            ["kind"],
            registry=r,
        )
        self.oldest_waiting = Gauge(
            "gateway_oldest_waiting_seconds",
            "Age of the oldest job not yet done, by lane",
            ["lane"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.studies_completed = Counter(
            "gateway_studies_completed", "Studies marked complete", registry=r
        )
        self.certificate_days_left = Gauge(
            "gateway_certificate_days_left",
            "Days until each configured TLS certificate expires (negative: expired)",
            ["certificate"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.audit_failures = Counter(
            "gateway_audit_failures", "Audit records that could not be written", registry=r
        )
        self.model_runs = Counter(
            "gateway_model_runs",
            "Model runs by model and outcome (ok, input, failed)",
            ["model", "outcome"],
            registry=r,
        )
        self.model_seconds = Histogram(
            "gateway_model_run_seconds",
            "Time of successful model runs, input reading included",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )

        self.processes = Gauge(
            "gateway_processes",
            "Child processes of gateway run that are up and ready, by role",
            ["role"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.process_restarts = Counter(
            "gateway_process_restarts",
            "Child processes restarted after they exited, by role",
            ["role"],
            registry=r,
        )

    def render(self) -> bytes:
        if self.children_dir is None:
            return generate_latest(self.registry)
        children = CollectorRegistry()
        MultiProcessCollector(children, path=self.children_dir)  # type: ignore[no-untyped-call]
        merged = CollectorRegistry()
        merged.register(Merged([self.registry.collect, children.collect]))
        return generate_latest(merged)


class Merged(Collector):
    """The metric families of several sources as one: samples with the same name and
    labels are added up (counters, histogram buckets, and gauges whose processes each hold
    a part).  ``_created`` samples are left out: a sum of timestamps means nothing, and
    the multiprocess files have none."""

    def __init__(self, sources: Iterable[Callable[[], Iterable[Metric]]]) -> None:
        self.sources = list(sources)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
        for source in self.sources:
            for family in source():
                if family.name not in families:
                    families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                    samples[family.name] = {}
                found = samples[family.name]
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    before = found.get(key)
                    if before is not None:
                        sample = before._replace(value=before.value + sample.value)
                    found[key] = sample
        for name, family in families.items():
            family.samples = list(samples[name].values())
            yield family
