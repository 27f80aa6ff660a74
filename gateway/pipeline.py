"""The stage handlers: what a worker does with a route, infer or deliver job.

Each handler reads what it needs from the store, calls the pure parts (routing rules,
retry policy) and the edges out (senders), and returns the jobs that follow.  It raises
:class:`Transient` or :class:`Permanent`; the worker turns that into a retry or a dead
letter.  No handler keeps state between jobs except the senders' open connections.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import structlog

from gateway.config import Config, Destination, ModelConfig, RetryPolicyConfig
from gateway.deliver.dicom_scu import DicomSender, InstanceResult
from gateway.deliver.hl7_client import HL7Sender
from gateway.deliver.retry import RetryPolicy
from gateway.envelope import (
    BuildPayload,
    DeliverPayload,
    InferPayload,
    Job,
    Kind,
    NextJob,
    PayloadError,
    RoutePayload,
    Stage,
    new_id,
)
from gateway.errors import Permanent, Transient
from gateway.findings.records import model_run
from gateway.hl7.msh import parse_header
from gateway.infer.masks import decode_mask, encode_mask
from gateway.infer.runner import Limits, ModelRunner
from gateway.infer.runtime import InputError, SpoolInput, TextInput
from gateway.infer.text import identifiers_from_hl7, report_text_from_hl7
from gateway.observability.metrics import Metrics
from gateway.results.build import ResultBuilder, report_status, report_study_ids
from gateway.route.attributes import calling_ae_of, from_hl7, from_stored_dicom, hl7_keys
from gateway.route.rules import Attributes, decide
from gateway.security.audit import NO_AUDIT, Auditor, records
from gateway.security.deid import deidentify_text, reidentify
from gateway.security.tls import client_context
from gateway.store.findings import ModelRun
from gateway.store.queue import Queue
from gateway.store.store import Store, attr_text
from gateway.workers import Beat, Completion

log = structlog.get_logger(__name__)

P = TypeVar("P", RoutePayload, InferPayload, BuildPayload, DeliverPayload)

DEFAULT_RETRY = RetryPolicyConfig()
# a model run that crashed, hung or ran out of memory is tried once more, then dead-lettered
INFER_RETRY = RetryPolicy(initial=10.0, max=60.0, give_up_after=3600.0, max_attempts=2)


#: While one association runs, the instances the destination confirmed are recorded at
#: least every this many instances or seconds: a worker killed in the middle of a study
#: of thousands resends at most about that much, not the whole study.
PROGRESS_INSTANCES = 100
PROGRESS_SECONDS = 2.0


class DestinationGone(Permanent):
    """The destination is no longer in the configuration."""


class DeliveryProgress:
    """Records what a destination confirmed while the association is still running (each
    record one commit of the workers' bookkeeping); :meth:`flush` records the rest.  A
    record that fails now is kept for the next one: the send goes on."""

    def __init__(self, queue: Queue, destination: str, clock: Callable[[], float]) -> None:
        self.queue, self.destination, self.clock = queue, destination, clock
        self._pending: list[tuple[str, int]] = []
        self._since = time.monotonic()

    def __call__(self, result: InstanceResult) -> None:
        if result.delivered:
            self._pending.append((str(result.key), result.status or 0))
        due = time.monotonic() - self._since >= PROGRESS_SECONDS
        if len(self._pending) >= PROGRESS_INSTANCES or (self._pending and due):
            try:
                self.flush()
            except Transient as exc:
                log.warning(
                    "deliver.progress_not_recorded",
                    destination=self.destination,
                    instances=len(self._pending),
                    error=exc.message,
                )

    def flush(self) -> None:
        if self._pending:
            self.queue.record_deliveries(self.destination, self._pending, self.clock())
            self._pending = []
        self._since = time.monotonic()


class Pipeline:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        metrics: Metrics,
        *,
        runner: ModelRunner | None = None,
        clock: Callable[[], float] = time.time,
        audit: Auditor = NO_AUDIT,
    ) -> None:
        self.cfg = cfg
        self.runner = runner
        self.audit = audit
        self._now = clock
        self.store = store
        self.metrics = metrics
        # senders per destination, with the settings and the TLS generation they were made
        # with; a reload that renews certificates bumps the generation
        self._dicom: dict[str, tuple[Destination, DicomSender, int]] = {}
        self._hl7: dict[str, tuple[Destination, HL7Sender, int]] = {}
        self._tls_generation = 0

    # --- retry policy per job -------------------------------------------------------

    def retry_policy(self, job: Job) -> RetryPolicy:
        if job.stage is Stage.INFER:
            return INFER_RETRY
        payload = job.payload
        name = payload.destination if isinstance(payload, DeliverPayload) else ""
        dest = self.cfg.destinations.get(name)
        return RetryPolicy.from_config(dest.retry if dest is not None else DEFAULT_RETRY)

    # --- route ----------------------------------------------------------------------

    def attributes(self, job: Job) -> tuple[Kind, Attributes]:
        kind = _typed(job, RoutePayload).kind or self._guess_kind(job.subject)
        if kind is Kind.HL7:
            _, raw = self.store.read(job.subject)
            return kind, from_hl7(raw, hl7_keys(self.cfg.routes))  # what the routes test
        envelopes = self.store.queue.study_envelopes(job.subject)
        if not envelopes:
            raise Permanent("the study has no stored instances")
        return kind, from_stored_dicom(
            [self.store.attrs(e.id) for e in envelopes], calling_ae_of(envelopes[0].source)
        )

    def _guess_kind(self, subject: str) -> Kind:
        return Kind.DICOM if self.store.queue.study(subject) is not None else Kind.HL7

    def route(self, job: Job, beat: Beat) -> Sequence[NextJob]:
        kind, attrs = self.attributes(job)
        if kind is Kind.DICOM:
            # a report that names this study by accession number can find it later
            accessions = attrs.get("AccessionNumber")
            self.store.remember_study(job.subject, accession=accessions[0] if accessions else None)
        decision = decide(attrs, self.cfg.routes)
        fields = {"subject": job.subject[:12], "kind": kind.value}
        if not decision.matched:
            log.info("route.none", **fields, outcome="stored, not processed")
            return []
        then: list[NextJob] = []
        for name in decision.forward:
            dest = self._destination(name)
            if (dest.dicom is not None) != (kind is Kind.DICOM):
                # a route with both dicom and hl7 conditions may forward to both kinds:
                # each object goes to the destinations that speak its protocol
                log.info(
                    "route.forward_skipped",
                    **fields,
                    destination=name,
                    reason=f"a {kind.value} object cannot go to this destination",
                )
                continue
            then.append(_delivery(name, kind, job.subject, "forward"))
        for model in decision.run:
            then.append(
                NextJob(
                    Stage.INFER,
                    f"{model}|{job.subject}",
                    InferPayload(model, kind, job.subject, tuple(decision.send), decision.route),
                )
            )
        log.info(
            "route.matched",
            **fields,
            route=decision.route,
            run=list(decision.run),
            forward=list(decision.forward),
            send=list(decision.send),
        )
        return then

    # --- infer -----------------------------------------------------------------------

    def infer(self, job: Job, beat: Beat) -> Completion:
        """Run one model on one study or message (in a runner process); store the result
        encrypted in the spool and hand it to the result-building stage."""
        payload = _typed(job, InferPayload)
        name, kind, target = payload.model, payload.kind, payload.target
        model = self.cfg.models.get(name)
        if model is None:
            raise Permanent(
                f"model '{name}' is not configured in the running gateway (a model added "
                "by a reload needs a restart)"
            )
        if self.runner is None:
            raise Permanent(
                "no model runner: install the models extra (pip install -e '.[models]')"
            )
        result = self._run_model(name, kind, target, model, beat)
        inferred_at = self._now()
        result["made_at"] = inferred_at  # the results' content time, stable across rebuilds
        run = self._findings_run(payload, result, inferred_at)  # stored with the job's end
        mask = result.pop("mask", None)
        crosswalk = result.pop("crosswalk", None)
        log.info(
            "infer.done",
            model=name,
            version=result["model"]["version"],
            subject=target[:12],
            findings=len(result["findings"]),
            seconds=result.get("seconds"),
            device=result.get("device"),
            deidentified=model.deidentify,
        )
        send = payload.send
        if not send:
            # nothing goes anywhere: only the findings are kept (and the log line)
            return Completion(run=run)
        spool = self.store.spool
        # the result as the model made it (pseudonymous UIDs when it saw de-identified
        # input) and, apart from it, the crosswalk back to the originals
        result_key = spool.put(json.dumps(result).encode())
        mask_key = spool.put(encode_mask(mask)) if mask is not None else None
        crosswalk_key = spool.put(json.dumps(crosswalk).encode()) if crosswalk else None
        # results are built (SR/SEG for DICOM destinations, ORU for HL7 ones) by the
        # build stage, from the stored result
        build = NextJob(
            Stage.BUILD,
            f"{name}|{target}",
            BuildPayload(
                model=name,
                kind=kind,
                target=target,
                result=result_key,
                send=send,
                route=payload.route,
                mask=mask_key,
                crosswalk=crosswalk_key,
            ),
        )
        return Completion([build], run=run)

    def _findings_run(
        self, payload: InferPayload, result: dict[str, Any], inferred_at: float
    ) -> ModelRun:
        """The findings-store rows of a model result: the study (or the study a report
        names, by accession number or ZDS-1) by its key, never by UID; its modality and
        body part; the report's result status; and when it was received and complete."""
        target, queue = payload.target, self.store.queue
        study_key: str | None
        report = ""
        accession = ""
        if payload.kind is Kind.DICOM:
            study_key = target
            envelopes = queue.study_envelopes(target)
            received = min((e.received_at for e in envelopes), default=None)
            study = queue.study(target)
            complete = study.complete_due if study is not None else None
        else:
            env, raw = self.store.read(target)
            accession, study_uid = report_study_ids(raw)
            report = report_status(raw)
            study_key = self.store.find_study(accession=accession, study_uid=study_uid)
            received = complete = env.received_at
            envelopes = queue.study_envelopes(study_key) if study_key else []
        attrs = self.store.attrs(envelopes[0].id) if envelopes else {}
        accession = accession or attr_text(attrs, "AccessionNumber")
        return model_run(
            result,
            run_id=new_id(),
            kind="dicom" if payload.kind is Kind.DICOM else "hl7",
            subject=target,
            model=payload.model,
            inferred_at=inferred_at,
            study_key=study_key,
            accession_ref=self.store.accession_ref(accession) if accession else None,
            modality=attr_text(attrs, "Modality"),
            body_part=attr_text(attrs, "BodyPartExamined"),
            route=payload.route or "",
            report_status=report,
            received_at=received,
            complete_at=complete,
        )

    def _run_model(
        self, name: str, kind: Kind, target: str, model: ModelConfig, beat: Beat
    ) -> dict[str, Any]:
        assert self.runner is not None
        model_input: SpoolInput | TextInput
        if kind is Kind.DICOM:
            spool_keys, in_rows = self.store.study_instances(target)
            if not spool_keys and not in_rows:
                raise Permanent("the study has no stored instances")
            model_input = SpoolInput(
                str(self.store.spool.root),
                str(self.cfg.key_file),
                spool_keys,
                deidentify=model.deidentify,  # done inside the runner, before the model
                inline=in_rows,
            )
        else:
            _, raw = self.store.read(target)
            text = report_text_from_hl7(raw)
            if model.deidentify:
                text = deidentify_text(text, identifiers_from_hl7(raw))
            model_input = TextInput(text)
        limits = Limits(timeout=model.timeout, memory_mb=model.memory_mb)
        try:
            result = self.runner.run(name, model_input, limits, beat)
        except InputError:
            self.metrics.model_runs.labels(model=name, outcome="input").inc()
            raise
        except (Transient, Permanent):
            self.metrics.model_runs.labels(model=name, outcome="failed").inc()
            raise
        self.metrics.model_runs.labels(model=name, outcome="ok").inc()
        self.metrics.model_seconds.labels(model=name).observe(float(result.get("seconds", 0)))
        return result

    # --- build ----------------------------------------------------------------------

    def build(self, job: Job, beat: Beat) -> Sequence[NextJob]:
        """Turn a stored model result into what each ``send`` destination takes: an SR
        (and a SEG when there is a mask) for DICOM destinations, an ORU^R01 for HL7 ones.
        Each object is validated as it is built, stored encrypted, and handed to the
        destination's lane.  A result that cannot be built validly is a dead letter with
        the reason: nothing broken is ever sent."""
        payload = _typed(job, BuildPayload)
        spool = self.store.spool
        result = json.loads(spool.get(payload.result))
        if payload.crosswalk:  # the model saw de-identified input: put the UIDs back
            result = reidentify(result, json.loads(spool.get(payload.crosswalk)))
        mask = decode_mask(spool.get(payload.mask)) if payload.mask else None
        kind, target = payload.kind, payload.target
        builder = ResultBuilder(self.store, result, mask, kind=kind, target=target, beat=beat)
        then: list[NextJob] = []
        for name in payload.send:
            dest = self._destination(name)
            objects = builder.for_destination(name, dest)
            if not objects:
                log.info(
                    "build.nothing_to_send",
                    destination=name,
                    subject=target[:12],
                    reason=builder.skipped.get(name, "no result object for this destination"),
                )
                continue
            keys = [spool.put(data) for data in objects]
            then.append(
                NextJob(
                    Stage.DELIVER,
                    f"{name}|{payload.model}|{target}",
                    DeliverPayload(
                        destination=name,
                        kind=Kind.DICOM if dest.dicom is not None else Kind.HL7,
                        target=f"{payload.model}|{target}",
                        mode="result",
                        objects=tuple(keys),
                        study_uid=builder.study_uid(),
                    ),
                    lane=name,
                )
            )
        log.info(
            "build.done",
            model=payload.model,
            subject=target[:12],
            objects={
                p.destination: len(p.objects)
                for p in (n.payload for n in then)
                if isinstance(p, DeliverPayload)
            },
        )
        return then

    # --- deliver --------------------------------------------------------------------

    def _destination(self, name: str) -> Destination:
        dest = self.cfg.destinations.get(name)
        if dest is None:
            raise DestinationGone(f"destination '{name}' is no longer configured")
        return dest

    def deliver(self, job: Job, beat: Beat) -> Sequence[NextJob] | Completion:
        payload = _typed(job, DeliverPayload)
        name, target, objects = payload.destination, payload.target, payload.objects
        dest = self._destination(name)
        try:
            if objects and dest.dicom is not None:
                self._deliver_objects(name, dest, objects, beat, payload.study_uid)
            elif objects:
                for key in objects:
                    self._deliver_message(name, dest, key, result=True)
            elif dest.dicom is not None:
                self._deliver_study(name, dest, target, beat)
            else:
                self._deliver_message(name, dest, target)
        except Transient:
            self.metrics.deliveries.labels(destination=name, outcome="retry").inc()
            raise
        except Permanent:
            self.metrics.deliveries.labels(destination=name, outcome="refused").inc()
            raise
        self.metrics.deliveries.labels(destination=name, outcome="delivered").inc()
        if payload.mode == "result":  # the model run's result reached a destination
            model, _, subject = target.partition("|")
            return Completion(delivered=(model, subject))
        return []

    def _deliver_study(self, name: str, dest: Destination, study_key: str, beat: Beat) -> None:
        envelopes = self.store.queue.study_envelopes(study_key)

        def read(envelope_id: str) -> bytes:
            return self.store.read(envelope_id)[1]

        study_uid = (
            str(self.store.attrs(envelopes[0].id).get("StudyInstanceUID", "")) if envelopes else ""
        )
        self._send_instances(
            name, dest, [e.id for e in envelopes], read, beat, study_key, study_uid
        )

    def _deliver_objects(
        self, name: str, dest: Destination, keys: Sequence[str], beat: Beat, study_uid: str
    ) -> None:
        """Result objects (SEG first, then SR), by spool key."""
        self._send_instances(name, dest, keys, self.store.spool.get, beat, "result", study_uid)

    def _send_instances(
        self,
        name: str,
        dest: Destination,
        keys: Sequence[str],
        read: Callable[[str], bytes],
        beat: Beat,
        label: str,
        study_uid: str = "",
    ) -> None:
        queue = self.store.queue
        done = queue.delivered(name, keys)
        pending = [k for k in keys if k not in done]
        if not pending:
            return
        sender = self._dicom_sender(name, dest)

        def loader(key: str) -> Callable[[], bytes]:
            # read (and decrypt) one instance when the sender needs it, never the whole study
            def load() -> bytes:
                beat()
                return read(key)

            return load

        progress = DeliveryProgress(queue, name, self._now)
        results = sender.send_study(((k, loader(k)) for k in pending), on_result=progress)
        delivered: list[tuple[str, int]] = []
        failed_permanent = 0
        transient: str | None = None
        for result in results:
            if result.delivered:
                delivered.append((str(result.key), result.status or 0))
            elif result.transient:
                transient = transient or result.message
            else:
                failed_permanent += 1
        # what arrived is recorded (the rest of it: one commit) before any failure is
        # raised, so a retry sends only what did not
        progress.flush()
        if delivered or failed_permanent or transient:
            assert dest.dicom is not None
            self.audit(
                records.instances_transferred(
                    calling_ae=self.cfg.dicom.ae_title,
                    node=name,
                    ae_title=dest.dicom.ae_title,
                    host=dest.dicom.host,
                    port=dest.dicom.port,
                    study_uid=study_uid,
                    sent=len(delivered),
                    refused=failed_permanent,
                    retrying=transient,
                    result=label == "result",
                )
            )
        log.info(
            "deliver.study",
            destination=name,
            study=label[:12],
            sent=len(delivered),
            already=len(done),
            refused=failed_permanent,
        )
        if transient is not None:
            raise Transient(f"{name}: {transient}")
        if failed_permanent:
            raise Permanent(f"{name} refused {failed_permanent} of {len(pending)} instances")

    def _deliver_message(
        self, name: str, dest: Destination, envelope_id: str, *, result: bool = False
    ) -> None:
        """One HL7 message: a stored one (by envelope id) or a built result (spool key)."""
        if self.store.queue.delivered(name, [envelope_id]):
            return
        raw = self.store.spool.get(envelope_id) if result else self.store.read(envelope_id)[1]
        assert dest.hl7 is not None
        outcome = self._hl7_sender(name, dest).send(raw, timeout=dest.hl7.ack_timeout)
        self.store.queue.record_delivery(envelope_id, name, 0, self._now())
        assert dest.hl7 is not None
        self.audit(
            records.message_transferred(
                node=name,
                host=dest.hl7.host,
                port=dest.hl7.port,
                application=dest.hl7.application,
                facility=dest.hl7.facility,
                control_id=_control_id(raw),
                envelope_id=envelope_id,
                result=result,
                ack=outcome.code,
            )
        )
        log.info("deliver.message", destination=name, envelope_id=envelope_id, ack=outcome.code)

    def _dicom_sender(self, name: str, dest: Destination) -> DicomSender:
        # Senders are kept per destination, with the settings they were made from: after a
        # reload that changed the destination, the next delivery gets a new sender.  Only
        # the destination's own lane worker uses it, so no other thread is sending on it.
        held = self._dicom.get(name)
        if held is None or held[0] != dest or held[2] != self._tls_generation:
            assert dest.dicom is not None
            tls = client_context(dest.dicom.tls, self.cfg.path) if dest.dicom.tls else None
            sender = DicomSender(
                dest.dicom,
                calling_ae=self.cfg.dicom.ae_title,
                ssl_context=tls,
                uid_hash=lambda uid: self.store.keys.index("log", uid)[:12],
            )
            self._dicom[name] = held = (dest, sender, self._tls_generation)
        return held[1]

    def _hl7_sender(self, name: str, dest: Destination) -> HL7Sender:
        held = self._hl7.get(name)
        if held is None or held[0] != dest or held[2] != self._tls_generation:
            if held is not None:
                held[1].close()  # the old address: its connection goes
            assert dest.hl7 is not None
            tls = client_context(dest.hl7.tls, self.cfg.path) if dest.hl7.tls else None
            sender = HL7Sender(dest.hl7, ssl_context=tls)
            self._hl7[name] = held = (dest, sender, self._tls_generation)
        return held[1]

    def reset_senders(self) -> None:
        """The next delivery to each destination makes a new sender (with the TLS files
        as they are now: a reload after certificates were renewed).  The lane worker
        replaces its own sender, so nothing in flight is cut."""
        self._tls_generation += 1

    def close(self) -> None:
        for _, sender, _ in self._hl7.values():
            sender.close()


def _control_id(raw: bytes) -> str:
    """MSH-10 of a message for the audit record ('?' when it cannot be read)."""
    try:
        return parse_header(raw).control_id[:64] or "?"
    except Exception:
        return "?"


def _delivery(destination: str, kind: Kind, target: str, mode: Literal["forward"]) -> NextJob:
    return NextJob(
        Stage.DELIVER,
        f"{destination}|{target}",
        DeliverPayload(destination, kind, target, mode),
        lane=destination,
    )


def _typed(job: Job, cls: type[P]) -> P:
    """The job's payload as the record its stage takes (a Permanent error otherwise)."""
    try:
        payload = job.payload
    except PayloadError as exc:
        raise Permanent(f"unreadable job payload: {exc}") from None
    if not isinstance(payload, cls):
        raise Permanent(f"a {job.stage} job carries a {type(payload).__name__}")
    return payload
