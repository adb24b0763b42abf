"""The intake nameko service: entrypoints only. Work happens in cases.py, open311.py,
credentials.py; events leave through the outbox after each commit."""

import json
import logging

from nameko.rpc import rpc
from sqlalchemy import select

from services.common.auth import KeyCache, request_key
from services.common.base import ServiceBase
from services.common.batching import DEFAULT_MAX_BATCH, GATHER_OFF_THE_CASES_WAY, Coalesced
from services.common.directory import DirectoryError, parse_directory
from services.common.events import event_batch_handler
from services.common.http import Forbidden, NotFound, Unauthorized, ValidationFailed, http, json_body, json_response
from services.common.outbox import OutboxRelay
from services.intake import cases, credentials, open311
from services.intake.models import cases as cases_table
from services.intake.models import outbox
from services.intake.schemas import parse_submission
from services.intake.ticket_queue import DeadLetters, consume_tickets

log = logging.getLogger(__name__)

OPEN311 = "/open311/v2"
FORMAT = "<any(xml,json):fmt>"


def open311_http(method, url):
    return http(method, OPEN311 + url, error_renderer=open311.render_error)


class IntakeService(ServiceBase):
    name = "intake"

    dead_letter = DeadLetters()

    relay = OutboxRelay(outbox)

    # --- shared steps ---------------------------------------------------------------------

    def _directory_cache(self) -> cases.DirectoryCache:
        return self.state.setdefault("directory_cache", cases.DirectoryCache())

    def _submit(self, data, channel: str) -> cases.Submitted:
        """One submission (HTTP, Open311, the CLI), stored with whatever else is being stored."""
        [result] = self._store_together([(parse_submission(data), channel)])
        if isinstance(result, ValidationFailed):
            raise result
        return result

    def _store_together(self, received: list) -> list:
        """``received`` (each submission with its channel) stored together with the submissions
        the process's other workers hand over at about the same time, whatever their channel: one
        transaction and one publish for the HTTP requests, imports and ticket batches of a moment
        (batching.Coalesced). Stored apart, by channel, HTTP submissions came 1.0 to 1.1 to a
        transaction at 40 a second, and the two channels' transactions queued for each other's
        lock on the year's case counter (bench/README.md, 6 December)."""
        together = self.state.setdefault("submissions", Coalesced("submissions"))
        return together(received, self._submit_many)

    def _submit_many(self, received: list) -> list:
        """Store the submissions in one transaction (cases.submit_many), then publish their events."""
        prefix = self.config["HUIYING_CASE_PREFIX"]
        results = cases.submit_many(self.db, received, self._directory_cache(), prefix)
        self.publish_events()
        return results

    def _authenticate(self, key: str | None) -> dict | None:
        """The key's ``{"role", "subject"}``, remembered for a minute as the other services do
        (auth.KeyCache): a lookup per request was a noticeable share of an HTTP submission."""
        if not key:
            return None
        cache = self.state.setdefault("keys", KeyCache())
        who = cache.get(key)
        if who is None:
            with self.db() as session:
                who = credentials.authenticate(session, key)
            if who is not None:
                cache.put(key, who)
        return who

    def _caller(self, request, roles=("source", "staff")) -> dict:
        key = request_key(request)
        if not key:
            raise Unauthorized("an API key is required: Authorization: Bearer KEY")
        who = self._authenticate(key)
        if who is None:
            raise Unauthorized("unknown or revoked API key")
        if who["role"] not in roles:
            raise Forbidden(f"a {who['role']} key cannot do this")
        return who

    def _directory(self):
        with self.db() as session:
            return self._directory_cache().current(session)

    # --- RPC (operator CLI, other services) ----------------------------------------------

    @rpc(expected_exceptions=(ValidationFailed,))
    def submit_case(self, data: dict, channel: str = "cli") -> dict:
        result = self._submit(data, channel)
        return {"id": result.case_id, "created": result.created}

    @rpc
    def submit_cases(self, rows: list, channel: str = "import") -> list:
        """Batch submit, in one transaction (with whatever else is being stored): one result per
        row, ``{"id", "created"}`` or ``{"error", "details"}``."""
        parsed = []
        for data in rows:
            try:
                parsed.append(parse_submission(data))
            except ValidationFailed as exc:
                parsed.append(exc)
        stored = iter(self._store_together([(p, channel) for p in parsed if not isinstance(p, ValidationFailed)]))
        results = []
        for item in parsed:
            result = item if isinstance(item, ValidationFailed) else next(stored)
            if isinstance(result, ValidationFailed):
                results.append({"error": result.message, "details": result.details})
            else:
                results.append({"id": result.case_id, "created": result.created})
        return results

    @rpc(expected_exceptions=(NotFound,))
    def get_case(self, case_id: str) -> dict:
        with self.db() as session:
            return cases.case_view(cases.get_case_row(session, case_id))

    @rpc
    def get_cases(self, case_ids: list) -> list:
        """The cases known of ``case_ids``, as ``get_case`` shows them (unknown ids are left out)."""
        with self.db() as session:
            rows = session.execute(select(cases_table).where(cases_table.c.id.in_(list(case_ids)))).all()
        return [cases.case_view(row) for row in rows]

    @rpc(expected_exceptions=(DirectoryError,))
    def load_directory(self, document: dict) -> dict:
        directory = parse_directory(document)
        with self.db.begin() as session:
            summary = cases.store_directory(session, directory)
        self._directory_cache().invalidate()
        self.publish_events()
        return summary

    @rpc
    def get_reporter_contacts(self, case_ids: list) -> dict:
        """``{case id: {"phone"}}``, unmasked: for notify's SMS to the citizen, and nothing else
        (asked once per batch of events; an unknown case is left out)."""
        with self.db() as session:
            return {case_id: {"phone": phone} for case_id, phone in cases.reporter_phones(session, case_ids).items()}

    @rpc
    def get_directory(self) -> dict | None:
        directory = self._directory()
        return directory.model_dump(mode="json") if directory else None

    @rpc(expected_exceptions=(ValidationFailed,))
    def create_credential(self, role: str, subject: str) -> dict:
        with self.db.begin() as session:
            return credentials.issue(session, role, subject)

    @rpc
    def authenticate(self, key: str) -> dict | None:
        with self.db() as session:
            return credentials.authenticate(session, key)

    # --- status from routing (what the JSON API and Open311 report back) ---------------------

    # Intake's view of a case's status (what its JSON API and Open311 report) follows routing's
    # a moment later: no case waits on it, so its batches gather for a while (batching.py).
    @event_batch_handler("routing", "case_referred", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("routing", "case_needs_triage", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("routing", "referral_replied", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("routing", "case_reopened", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("routing", "case_closed", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    def on_routing_status(self, events: list):
        with self.db.begin() as session:
            cases.apply_routing_statuses(session, events)

    # --- AMQP ticket queue -------------------------------------------------------------------

    @consume_tickets(max_batch=DEFAULT_MAX_BATCH)
    def receive_tickets(self, bodies: list):
        """Every ticket waiting, stored in one transaction; the invalid ones dead-lettered with
        their reason once the valid ones are stored (a failed batch is tried ticket by ticket)."""
        valid, invalid = [], []  # (body, submission), (body, reason)
        for body in bodies:
            try:
                if isinstance(body, (bytes, str)):
                    try:
                        body = json.loads(body)
                    except (ValueError, UnicodeDecodeError) as exc:
                        invalid.append((body if isinstance(body, bytes) else body.encode(), f"body is not JSON: {exc}"))
                        continue
                valid.append((body, parse_submission(body)))
            except ValidationFailed as exc:
                invalid.append((body, _reason(exc)))
        results = self._store_together([(submission, "amqp") for _, submission in valid])
        invalid += [
            (body, _reason(result)) for (body, _), result in zip(valid, results) if isinstance(result, Exception)
        ]
        for body, reason in invalid:
            self.dead_letter(body, reason)

    # --- HTTP: health and the JSON API -----------------------------------------------------

    @http("POST", "/api/v1/cases")
    def http_submit_case(self, request):
        who = self._caller(request)
        data = json_body(request)
        if who["role"] == "source":
            if data.get("source", who["subject"]) != who["subject"]:
                raise Forbidden(f"this key submits for source {who['subject']!r} only")
            data = {**data, "source": who["subject"]}
        result = self._submit(data, "http")
        return json_response(201 if result.created else 200, {"id": result.case_id, "created": result.created})

    @http("GET", "/api/v1/cases/<case_id>")
    def http_get_case(self, request, case_id):
        who = self._caller(request)
        with self.db() as session:
            row = session.execute(select(cases_table).where(cases_table.c.id == case_id)).first()
        if row is None or (who["role"] == "source" and row.source != who["subject"]):
            raise NotFound(f"no case {case_id!r}")
        return json_response(200, cases.case_view(row))

    @http("GET", "/api/v1/cases")
    def http_find_case(self, request):
        """Look a case up by the caller's own id for it: ``?external_id=X[&source=S]``."""
        who = self._caller(request)
        external_id = request.args.get("external_id")
        if not external_id:
            raise ValidationFailed(
                "external_id is required", [{"field": "external_id", "problem": "missing"}], status=400
            )
        source = who["subject"] if who["role"] == "source" else request.args.get("source")
        if not source:
            raise ValidationFailed(
                "source is required for staff keys", [{"field": "source", "problem": "missing"}], status=400
            )
        with self.db() as session:
            case_id = cases.find_by_external_id(session, source, external_id)
            if case_id is None:
                raise NotFound(f"no case with external_id {external_id!r} from {source!r}")
            return json_response(200, cases.case_view(cases.get_case_row(session, case_id)))

    # --- HTTP: Open311 GeoReport v2 --------------------------------------------------------

    @open311_http("GET", f"/services.{FORMAT}")
    def open311_services(self, request, fmt):
        return open311.render(fmt, "services", "service", open311.service_list(self._directory()))

    @open311_http("GET", f"/services/<service_code>.{FORMAT}")
    def open311_service_definition(self, request, service_code, fmt):
        directory = self._directory()
        if directory is None or directory.resolve_category(service_code) != service_code:
            raise open311.Open311Error(f"no service {service_code!r}", status=404)
        return open311.render_definition(fmt, service_code)

    @open311_http("POST", f"/requests.{FORMAT}")
    def open311_post_request(self, request, fmt):
        who = self._authenticate(request.form.get("api_key"))
        if who is None or who["role"] not in ("source", "staff"):
            raise open311.Open311Error("api_key is missing or not valid", status=403)
        jurisdiction = request.form.get("jurisdiction_id")
        directory = self._directory()
        if (
            jurisdiction
            and directory
            and jurisdiction not in (directory.district.code, directory.district.code.lower())
        ):
            raise open311.Open311Error(f"unknown jurisdiction_id {jurisdiction!r}", status=404)
        data = open311.submission_from_form(request.form, who["subject"])
        try:
            result = self._submit(data, "open311")
        except ValidationFailed as exc:
            raise open311.Open311Error(exc.message, exc.details, status=400) from None
        return open311.render(
            fmt,
            "service_requests",
            "request",
            [{"service_request_id": result.case_id, "service_notice": "", "account_id": ""}],
        )

    @open311_http("GET", f"/requests.{FORMAT}")
    def open311_get_requests(self, request, fmt):
        query = select(cases_table)
        args = request.args
        if args.get("service_request_id"):
            query = query.where(cases_table.c.id.in_(args["service_request_id"].split(",")))
        else:
            if args.get("service_code"):
                query = query.where(cases_table.c.category.in_(args["service_code"].split(",")))
            if args.get("start_date"):
                query = query.where(
                    cases_table.c.received_at >= open311.parse_w3c_datetime(args["start_date"], "start_date")
                )
            if args.get("end_date"):
                query = query.where(
                    cases_table.c.received_at <= open311.parse_w3c_datetime(args["end_date"], "end_date")
                )
        query = query.order_by(cases_table.c.received_at.desc()).limit(1000)
        statuses = set(filter(None, args.get("status", "").split(",")))
        if statuses - {"open", "closed"}:
            raise open311.Open311Error("status must be open, closed or both (comma-separated)")
        with self.db() as session:
            rows = session.execute(query).all()
        names = self._category_names()
        records = [open311.request_record(cases.case_view(r), names) for r in rows]
        if statuses:
            records = [r for r in records if r["status"] in statuses]
        return open311.render(fmt, "service_requests", "request", records)

    @open311_http("GET", f"/requests/<request_id>.{FORMAT}")
    def open311_get_request(self, request, request_id, fmt):
        with self.db() as session:
            row = session.execute(select(cases_table).where(cases_table.c.id == request_id)).first()
        if row is None:
            raise open311.Open311Error(f"no service request {request_id!r}", status=404)
        return open311.render(
            fmt, "service_requests", "request", [open311.request_record(cases.case_view(row), self._category_names())]
        )

    @open311_http("GET", f"/tokens/<token>.{FORMAT}")
    def open311_get_token(self, request, token, fmt):
        with self.db() as session:
            exists = session.scalar(select(cases_table.c.id).where(cases_table.c.id == token))
        if not exists:
            raise open311.Open311Error(f"no request for token {token!r}", status=404)
        return open311.render(fmt, "service_requests", "request", [{"service_request_id": token, "token": token}])

    def _category_names(self) -> dict:
        directory = self._directory()
        return {c.code: c.name for c in directory.categories} if directory else {}


def _reason(exc: ValidationFailed) -> str:
    return exc.message + ": " + "; ".join(f"{d['field']}: {d['problem']}" for d in exc.details)
