"""The routing nameko service: entrypoints only. The work is in rules.py (what the rule files
decide) and referrals.py (the lifecycle); events leave through the outbox after each commit."""

import logging

from nameko.rpc import RpcProxy, rpc
from nameko.timer import timer

from services.common.auth import KeyCache, actor_for, require_role, require_staff
from services.common.base import ServiceBase
from services.common.db import snapshot
from services.common.events import event_batch_handler, reliable_event_handler
from services.common.http import (
    Conflict,
    Forbidden,
    NotFound,
    ValidationFailed,
    download_response,
    http,
    json_body,
    json_response,
)
from services.common.outbox import OutboxRelay
from services.common.rules.provider import Rules, with_calendar
from services.common.timeutil import now
from services.routing import referrals
from services.routing import rules as routing_rules
from services.routing.models import outbox

log = logging.getLogger(__name__)
EXPECTED = (NotFound, Forbidden, Conflict, ValidationFailed)
CLI_ACTOR = {"role": "staff", "subject": "cli"}
DEPARTMENT_API = ("department", "staff")


class RoutingService(ServiceBase):
    name = "routing"

    relay = OutboxRelay(outbox)
    rules = Rules(with_calendar(routing_rules.load))
    intake = RpcProxy("intake")

    # --- shared steps ---------------------------------------------------------------------

    def _context(self) -> referrals.Context:
        loaded = self.rules.get()
        if "department_names" not in self.state:
            self._refresh_directory()
        return referrals.Context(loaded.rules, loaded.calendar, dict(self.state.get("department_names", {})), now())

    def _refresh_directory(self):
        directory = self.intake.get_directory()
        self.state["department_names"] = {d["code"]: d["name"] for d in (directory or {}).get("departments", [])}

    def _step(self, function, *args):
        """Run one lifecycle step in a transaction, then publish its events. The context (which
        may ask intake for the directory) is made first: no RPC while a transaction is open."""
        context = self._context()
        with self.db.begin() as session:
            result = function(session, context, *args)
        self.publish_events()
        return result

    def _actor(self, request) -> dict:
        return actor_for(request, self.state.setdefault("keys", KeyCache()), self.intake.authenticate)

    # --- events -------------------------------------------------------------------------------

    @event_batch_handler("intake", "case_received")
    def on_case_received(self, events: list):
        context = self._context()
        with self.db.begin() as session:
            referrals.record_and_route_new_cases(session, context, events)  # not redeliveries, already routed
        self.publish_events()

    @reliable_event_handler("intake", "directory_loaded")
    def on_directory_loaded(self, event):
        self._refresh_directory()

    @timer(interval=2)
    def watch_rule_files(self):
        self.rules.refresh()

    # --- RPC (the operator CLI) -------------------------------------------------------------

    @rpc
    def reload_rules(self) -> dict:
        self.rules.refresh(force=True)
        return self.rules.status()

    @rpc
    def rules_status(self) -> dict:
        return self.rules.status()

    @rpc(expected_exceptions=EXPECTED)
    def list_referrals(self, status=None, department=None, case_id=None) -> list:
        names = self._context().department_names
        with self.db() as session:
            return referrals.list_referrals(session, CLI_ACTOR, names, status, department, case_id)

    @rpc(expected_exceptions=EXPECTED)
    def get_case_routing(self, case_id) -> dict:
        names = self._context().department_names
        with snapshot(self.db) as session:
            return referrals.case_view(session, case_id, CLI_ACTOR, names)

    @rpc
    def list_triage(self) -> list:
        with self.db() as session:
            return referrals.triage_list(session)

    @rpc(expected_exceptions=EXPECTED)
    def route_triaged_case(self, case_id, departments, lead=None) -> dict:
        return self._step(referrals.route_from_triage, CLI_ACTOR, case_id, departments, lead)

    @rpc(expected_exceptions=EXPECTED)
    def referral_step(self, referral_id, step, params=None) -> dict:
        return self._apply(CLI_ACTOR, referral_id, step, params or {})

    @rpc(expected_exceptions=EXPECTED)
    def record_feedback(self, case_id, rating, comment=None) -> dict:
        return self._step(referrals.feedback, CLI_ACTOR, case_id, rating, comment)

    def _apply(self, actor, referral_id, step, params):
        if step == "accept":
            return self._step(referrals.accept, actor, referral_id)
        if step == "return":
            return self._step(referrals.return_referral, actor, referral_id, params.get("reason"))
        if step == "extension":
            return self._step(
                referrals.request_extension, actor, referral_id, params.get("working_days"), params.get("reason")
            )
        if step == "extension_decision":
            grant = params.get("grant")
            if not isinstance(grant, bool):
                raise ValidationFailed("grant must be true or false", [{"field": "grant", "problem": "missing"}])
            return self._step(referrals.decide_extension, actor, referral_id, grant, params.get("note"))
        if step == "reply":
            return self._step(referrals.reply, actor, referral_id, params.get("result"))
        raise NotFound(f"no step {step!r}")

    # --- HTTP: the department API -----------------------------------------------------------

    def _referral_query(self, request) -> tuple[dict, dict, dict]:
        """``(actor, filters, department names)`` of a list or export request."""
        actor = self._actor(request)
        require_role(actor, DEPARTMENT_API, "referrals")
        return actor, referrals.filters(request.args), self._context().department_names

    @http("GET", "/api/v1/referrals")
    def http_list_referrals(self, request):
        """The caller's referrals (staff: all), filtered by ``status``, ``case_id``, ``q`` (search)."""
        actor, found, names = self._referral_query(request)
        with self.db() as session:
            listed = referrals.list_referrals(session, actor, names, limit=referrals.limit_from(request.args), **found)
        return json_response(200, {"referrals": listed})

    @http("GET", "/api/v1/referrals/export.csv")
    def http_export_referrals(self, request):
        """The list (same filters, no page limit) as a CSV file Excel opens."""
        actor, found, names = self._referral_query(request)
        with self.db() as session:
            body = referrals.export_csv(session, actor, names, **found)
        return download_response(body, "text/csv; charset=utf-8", "referrals.csv")

    @http("GET", "/api/v1/referrals/<referral_id>")
    def http_get_referral(self, request, referral_id):
        actor = self._actor(request)
        require_role(actor, DEPARTMENT_API, "referrals")
        names = self._context().department_names
        with self.db() as session:
            row = referrals._referral(session, referral_id, actor, lock=False)
            return json_response(200, referrals.referral_view(row, names))

    @http("POST", "/api/v1/referrals/<referral_id>/<any(accept,return,extension,reply):step>")
    def http_referral_step(self, request, referral_id, step):
        actor = self._actor(request)
        require_role(actor, DEPARTMENT_API, "referral steps")
        return json_response(200, self._apply(actor, referral_id, step, json_body(request)))

    @http("POST", "/api/v1/referrals/<referral_id>/extension/decision")
    def http_extension_decision(self, request, referral_id):
        actor = self._actor(request)
        require_staff(actor, "deciding extensions")
        return json_response(200, self._apply(actor, referral_id, "extension_decision", json_body(request)))

    @http("POST", "/api/v1/cases/<case_id>/feedback")
    def http_feedback(self, request, case_id):
        actor = self._actor(request)
        body = json_body(request)
        return json_response(
            200, self._step(referrals.feedback, actor, case_id, body.get("rating"), body.get("comment"))
        )

    @http("GET", "/api/v1/cases/<case_id>")
    def http_case(self, request, case_id):
        actor = self._actor(request)
        names = self._context().department_names
        with snapshot(self.db) as session:
            return json_response(200, referrals.case_view(session, case_id, actor, names))

    @http("GET", "/api/v1/triage")
    def http_triage(self, request):
        require_staff(self._actor(request), "the triage list")
        with self.db() as session:
            return json_response(200, {"cases": referrals.triage_list(session)})

    @http("POST", "/api/v1/triage/<case_id>/route")
    def http_route_triaged(self, request, case_id):
        actor = self._actor(request)
        require_staff(actor, "routing from the triage list")
        body = json_body(request)
        departments = body.get("departments")
        if not isinstance(departments, list) or not all(isinstance(d, str) for d in departments):
            raise ValidationFailed(
                "departments must be a list of department codes",
                [{"field": "departments", "problem": "not a list of codes"}],
            )
        return json_response(
            200, self._step(referrals.route_from_triage, actor, case_id, departments, body.get("lead"))
        )

    @http("POST", "/api/v1/rules/reload")
    def http_reload_rules(self, request):
        """As ``huiying rules reload``: ``{"version", "problems"}``, 200 when loaded; 422 when the
        folder is refused (the last good version keeps deciding; problems as ``FILE:LINE: message``)."""
        require_staff(self._actor(request), "reloading the rules")
        result = self.reload_rules()
        return json_response(422 if result["problems"] else 200, result)
