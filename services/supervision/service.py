"""The supervision nameko service: entrypoints only.

It keeps its own projection of every case from the bus (projection.py), evaluates unresolved
cases against the rule files on each relevant event and in a periodic sweep (evaluation.py), and
carries out escalations exactly once (escalation.py). Operators check, test, simulate and explain
the rules through the CLI.
"""

import logging
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import eventlet
from nameko.rpc import RpcProxy, rpc
from nameko.timer import timer
from sqlalchemy import select

from services.common import metrics
from services.common.auth import KeyCache, actor_for, actor_for_key, require_staff
from services.common.base import ServiceBase
from services.common.batching import GATHER_OFF_THE_CASES_WAY, BackgroundRuns, Coalesced, GiveWay
from services.common.db import snapshot
from services.common.events import event_batch_handler
from services.common.http import (
    Conflict,
    Forbidden,
    NotFound,
    Unauthorized,
    ValidationFailed,
    download_response,
    http,
    json_body,
    json_response,
)
from services.common.outbox import OutboxRelay
from services.common.rules.provider import Rules, with_calendar
from services.common.rules.ruleset import RulesetInvalid
from services.common.timeutil import iso, now
from services.common.upsert import insert_ignoring_duplicates
from services.common.workdays import cst_date
from services.supervision import board, escalation, evaluation, projection, reports, sweeping
from services.supervision import rules as supervision_rules
from services.supervision.models import outbox, rule_versions

log = logging.getLogger(__name__)
EXPECTED = (NotFound, Forbidden, Conflict, ValidationFailed)
APPLY_BATCH = 500
SWEEPERS = 2  # shards swept at once by one replica
EVALUATION_GATHER_SECONDS = 0.5
# Batches of one queue of routing's events handed to the projection at once: one in the run,
# the others waiting to go into the next together (nameko's max_workers bounds them all).
PROJECTION_BATCHES_IN_FLIGHT = 4
# The evaluation after events takes at most this share of the time: under a sustained load its
# clusters are large and its runs long (0.15-0.35 s each at 200 cases/s in bench/e2e.py, with
# 8,000 cases open), and back to back they would leave the projection, in the same process and
# on the case's way to the board, a fraction of the CPU.
EVALUATION_AT_MOST_SHARE = 0.25
load_supervision = with_calendar(supervision_rules.load)


def into_the_projection(event_type: str):
    """A queue of routing's events, whose batches go straight to the projection's run
    (``_project``): that run takes what every batch handed over while the previous run went on,
    so a batch neither gathers nor waits for the previous batch's run to end. Both made a
    referral wait for about two runs before its own (bench/e2e.py at 200 cases/s: from routing's
    commit to supervision's, p50 68 ms, of which 28 ms before the batch was handed over, and
    p99 312 ms, of which 172 ms)."""
    return event_batch_handler("routing", event_type, gather_seconds=0, batches_in_flight=PROJECTION_BATCHES_IN_FLIGHT)


def parse_now(value) -> datetime:
    if value is None:
        return now()
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ValidationFailed(
            f"now must be ISO 8601 with a time zone, e.g. 2026-10-20T09:00:00+08:00; got {value!r}",
            [{"field": "now", "problem": "not ISO 8601"}],
        ) from None
    if moment.tzinfo is None:
        raise ValidationFailed("now must carry a time zone offset, e.g. +08:00", [{"field": "now", "problem": "naive"}])
    return moment


def decision_summary(decisions) -> list[dict]:
    return [
        {"rule_id": d.rule_id, "action": d.action, "scope": d.scope, "case_ids": d.case_ids}
        for d in sorted(decisions, key=lambda d: d.key)
    ]


class SupervisionService(ServiceBase):
    name = "supervision"

    relay = OutboxRelay(outbox)
    rules = Rules(load_supervision)
    intake = RpcProxy("intake")
    evaluations = BackgroundRuns("evaluation after events", EVALUATION_GATHER_SECONDS, EVALUATION_AT_MOST_SHARE)

    # --- evaluation ---------------------------------------------------------------------------

    def _evaluate_and_apply(self, moment: datetime, case_ids=None, shard=None, changed_since=None) -> dict:
        loaded = self.rules.get()
        self._record_rule_version()
        with snapshot(self.db) as session:
            evaluated, decided = evaluation.evaluate(
                session, loaded.rules, loaded.calendar, moment, case_ids, shard, changed_since, self._give_way().pause
            )
        decided.sort(key=lambda d: d.key)  # one order everywhere: concurrent sweeps never deadlock
        taken = []
        # One batch of decisions carried out at a time in this process: the sweepers and the
        # evaluation after events meet the same clusters, and each would only wait for the
        # other's locks on the same decisions and agenda links (replicas still may, rarely).
        applying = self.state.setdefault("applying", threading.Lock())
        growth_among = set(case_ids) if case_ids is not None else None
        for start in range(0, len(decided), APPLY_BATCH):
            with applying, self.db.begin() as session:
                taken += escalation.apply(session, decided[start : start + APPLY_BATCH], now(), growth_among)
        if taken:
            self.publish_events()
        return {
            "now": iso(moment),
            "evaluated": evaluated,
            "ruleset_version": loaded.rules.version,
            "decisions": decision_summary(taken),
            "repeated": len(decided) - len(taken),
        }

    def _sweep_whole(self, moment: datetime) -> dict:
        """Every unresolved case, a shard at a time (memory stays that of the largest shard)."""
        with self.db() as session:
            shards = sweeping.open_shards(session)
        total = {"now": iso(moment), "evaluated": 0, "decisions": [], "repeated": 0}
        for shard in shards:
            result = self._evaluate_and_apply(moment, shard=shard)
            total["evaluated"] += result["evaluated"]
            total["decisions"] += result["decisions"]
            total["repeated"] += result["repeated"]
        total["ruleset_version"] = self.rules.get().rules.version
        return total

    def _record_rule_version(self):
        holder = self.rules
        if holder.version is None or holder.version == self.state.get("recorded_version"):
            return
        loaded = holder.get()
        files = {"files": loaded.rules.files, "rule_ids": [r.id for r in loaded.rules.rules]}
        with self.db.begin() as session:
            previous = session.execute(
                select(rule_versions.c.files).order_by(rule_versions.c.loaded_at.desc()).limit(1)
            ).scalar()
            changes = _changes(previous, files)
            insert_ignoring_duplicates(
                session, rule_versions, dict(version=holder.version, loaded_at=now(), files=files, changes=changes)
            )
        self.state["recorded_version"] = holder.version

    # --- events: keep the projection, evaluate the case -------------------------------------

    # Intake's case_received is off a case's way to the board: routing's event about the case
    # (case_referred or case_needs_triage) follows within milliseconds and starts the case's row
    # on its own (projection.py), which intake's event completes. So its queue gathers for a
    # while: runs of many cases each, placed in clusters together. (Runs of at most 20 of them,
    # so that routing's events waited less for a run of intake's, cost more CPU for the same p99:
    # bench/e2e.py, bench/README.md.)
    @event_batch_handler("intake", "case_received", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    def on_case_received(self, events: list):
        self._project(events)

    # One handler, one queue per routing event type (nameko names each queue after the type).
    @into_the_projection("case_referred")
    @into_the_projection("case_needs_triage")
    @into_the_projection("referral_accepted")
    @into_the_projection("referral_returned")
    @into_the_projection("extension_requested")
    @into_the_projection("extension_granted")
    @into_the_projection("extension_refused")
    @into_the_projection("referral_replied")
    @into_the_projection("feedback_received")
    @into_the_projection("case_reopened")
    @into_the_projection("case_closed")
    def on_routing_event(self, events: list):
        self._project(events)

    def _project(self, events: list):
        """Every event queue's batches are projected by one run at a time in this process, with
        what the other queues' workers handed over meanwhile, in one transaction (Coalesced).
        As separate transactions, intake's events and routing's waited for each other's locks on
        the cases and their shards (bench/e2e.py's stages; tried again on 1 Dec with intake's
        events gathered: routing's runs took 55 ms instead of 20-25, bench/README.md)."""
        projecting = self.state.setdefault("projecting", Coalesced("projection"))
        projecting(events, self._project_together)

    def _project_together(self, events: list) -> None:
        with self._give_way().inside(), self.db.begin() as session:
            fresh = projection.record_events(session, events, self.rules.get().rules.settings)
        self._evaluate_after_events(fresh)

    def _give_way(self) -> GiveWay:
        """Sweeps and evaluations give way to the projection, which cases wait on (GiveWay)."""
        return self.state.setdefault("give_way", GiveWay())

    def _evaluate_after_events(self, case_ids: list):
        """Evaluate the cases events just changed, in the background (batching.InBackground),
        ``EVALUATION_GATHER_SECONDS`` after their projection's commit, or later when evaluations
        have been taking more than ``EVALUATION_AT_MOST_SHARE`` of the time: the handler goes on to
        the next events instead of waiting, and the cases of every batch handled meanwhile are
        evaluated together — their clusters once, one evaluation at a time. (Escalations are
        about working days; evaluating each event on its own cost most of supervision's time at
        a few cases a second.) Should the process die first, the next periodic sweep evaluates
        them: it takes every cluster changed since its previous pass."""
        if case_ids:
            self.evaluations(case_ids, self._evaluate_cases)

    def _evaluate_cases(self, case_ids: list) -> None:
        self._evaluate_and_apply(now(), sorted(set(case_ids)))

    @timer(interval=5)
    def periodic_sweep(self):
        """The time-based rules (催办, 逾期) need a sweep. Replicas share it: each takes the shards
        (street × category) that are due and not leased, one at a time, whole on the first pass
        of the day or of new rules, else only the clusters changed since (sweeping.py)."""
        self.rules.refresh()
        me = self.state.setdefault("replica", sweeping.replica_name())
        # Two sweepers, each taking one shard at a time: while one waits for PostgreSQL the other
        # evaluates, so a sweep uses both cores (the leases keep them apart, as between replicas).
        started = time.monotonic()
        sweepers = [eventlet.spawn(self._sweep_due_shards, me) for _ in range(SWEEPERS)]
        try:
            totals = [sweeper.wait() for sweeper in sweepers]
        finally:
            # Killing this worker (the container does) does not kill the sweepers it started,
            # nor does one sweeper's error end the other: left alone, they swept on after it.
            for sweeper in sweepers:
                sweeper.kill()  # nothing to a sweeper that has finished
        evaluated, decided = sum(t[0] for t in totals), sum(t[1] for t in totals)
        if evaluated:
            metrics.observe_run("sweep", time.monotonic() - started, evaluated)
        if decided:
            log.info("sweep by %s: %s cases, %s new decisions", me, evaluated, decided)

    def _sweep_due_shards(self, me: str) -> tuple[int, int]:
        loaded = self.rules.get()
        ruleset = loaded.rules
        interval, lease = ruleset.settings["sweep_interval_seconds"], ruleset.settings["sweep_lease_seconds"]
        evaluated, decided = 0, 0
        while True:
            with self.db.begin() as session:
                claim = sweeping.claim_shard(session, me, now(), interval, lease)
            if claim is None:
                return evaluated, decided
            started = now()
            today = cst_date(started)
            since = claim.changed_since(today, ruleset.version, loaded.calendar)
            result = self._evaluate_and_apply(started, shard=claim.shard, changed_since=since)
            whole = (today.isoformat(), ruleset.version) if since is None else None
            with self.db.begin() as session:
                if not sweeping.release_shard(session, claim.shard, me, now(), result["evaluated"], started, whole):
                    log.warning("sweep: the lease on %s ran out mid-sweep; raise sweep_lease_seconds", claim.shard)
            evaluated, decided = evaluated + result["evaluated"], decided + len(result["decisions"])

    # --- RPC: the operator CLI --------------------------------------------------------------

    @rpc(expected_exceptions=EXPECTED)
    def sweep(self, now_iso=None) -> dict:
        return self._sweep_whole(parse_now(now_iso))

    @rpc(expected_exceptions=EXPECTED)
    def explain(self, case_id, now_iso=None) -> dict:
        loaded = self.rules.get()
        moment = parse_now(now_iso)
        with snapshot(self.db) as session:
            projection.case_record(session, case_id)  # NotFound for an unknown case
            facts = evaluation.facts_of(session, loaded.rules, loaded.calendar, moment, case_id)
        return {
            "case_id": case_id,
            "now": iso(moment),
            "ruleset_version": loaded.rules.version,
            "facts": facts,
            "rules": loaded.rules.explain("escalate", facts),
        }

    @rpc(expected_exceptions=EXPECTED)
    def simulate(self, files: dict, now_iso=None) -> dict:
        """A dry run of candidate rule files over live data; changes nothing."""
        moment = parse_now(now_iso)
        running = self.rules.get()
        with tempfile.TemporaryDirectory() as folder:
            for relative, content in files.items():
                path = Path(folder) / relative
                if ".." in Path(relative).parts or path.suffix != ".yaml":
                    raise ValidationFailed(f"unexpected file {relative!r}", [{"field": "files", "problem": relative}])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content, encoding="utf-8")
            try:
                candidate = load_supervision(Path(folder))
            except RulesetInvalid as exc:
                raise ValidationFailed(
                    "the candidate rules are invalid",
                    [
                        {"field": p.file.replace(folder + "/", ""), "problem": f"line {p.line}: {p.message}"}
                        for p in exc.problems
                    ],
                ) from None
        try:
            with snapshot(self.db) as session:
                count, proposed = evaluation.evaluate(session, candidate.rules, candidate.calendar, moment)
                _, current = evaluation.evaluate(session, running.rules, running.calendar, moment)
        finally:
            candidate.close()
        proposed_keys = {(d.rule_id, d.action, d.subject_id) for d in proposed}
        current_keys = {(d.rule_id, d.action, d.subject_id) for d in current}
        return {
            "now": iso(moment),
            "evaluated": count,
            "ruleset_version": candidate.rules.version,
            "running_version": running.rules.version,
            "decisions": decision_summary(proposed),
            "added": decision_summary([d for d in proposed if (d.rule_id, d.action, d.subject_id) not in current_keys]),
            "removed": decision_summary(
                [d for d in current if (d.rule_id, d.action, d.subject_id) not in proposed_keys]
            ),
        }

    @rpc
    def reload_rules(self) -> dict:
        self.rules.refresh(force=True)
        self._record_rule_version()
        return self.rules.status()

    @rpc
    def rules_status(self) -> dict:
        return self.rules.status()

    @rpc
    def rule_versions(self) -> list:
        with self.db() as session:
            rows = session.execute(select(rule_versions).order_by(rule_versions.c.loaded_at)).all()
        return [{"version": r.version, "loaded_at": iso(r.loaded_at), "changes": r.changes} for r in rows]

    @rpc(expected_exceptions=(NotFound,))
    def get_case_record(self, case_id: str) -> dict:
        with snapshot(self.db) as session:
            record = projection.case_record(session, case_id)
            record["escalations"] = escalation.escalations_for(session, case_id)
            return record

    @rpc(expected_exceptions=EXPECTED)
    def department_rates(self, start=None, end=None, xlsx=False) -> dict:
        """``{"period", "departments"}`` as the report API; with ``xlsx``, also the workbook as
        base64 (``huiying report departments --xlsx FILE``)."""
        import base64

        period = reports.period_from(start, end, now())
        rates = self._department_rates(period)
        found = {"period": period.as_dict(), "departments": rates}
        if xlsx:
            found["xlsx_base64"] = base64.b64encode(reports.rates_workbook(rates, period)).decode()
        return found

    @rpc(expected_exceptions=EXPECTED)
    def list_agenda(self, status=None, kind=None) -> list:
        with self.db() as session:
            return escalation.list_items(session, status, kind)

    @rpc(expected_exceptions=EXPECTED)
    def show_agenda(self, agenda_id) -> dict:
        with self.db() as session:
            return escalation.show_item(session, agenda_id)

    @rpc(expected_exceptions=EXPECTED)
    def advance_agenda(self, agenda_id, to, findings=None, scheduled_for=None, note=None) -> dict:
        with self.db.begin() as session:
            result = escalation.advance(session, agenda_id, to, now(), "cli", findings, scheduled_for, note)
        self.publish_events()
        return result

    # --- HTTP (staff) -------------------------------------------------------------------------

    def _staff(self, request, what):
        actor = actor_for(request, self.state.setdefault("keys", KeyCache()), self.intake.authenticate)
        require_staff(actor, what)
        return actor

    @http("GET", "/api/v1/agenda")
    def http_agenda(self, request):
        self._staff(request, "the agenda")
        with self.db() as session:
            return json_response(
                200, {"items": escalation.list_items(session, request.args.get("status"), request.args.get("kind"))}
            )

    @http("GET", "/api/v1/agenda/<agenda_id>")
    def http_agenda_item(self, request, agenda_id):
        self._staff(request, "the agenda")
        with self.db() as session:
            return json_response(200, escalation.show_item(session, agenda_id))

    @http("POST", "/api/v1/agenda/<agenda_id>/advance")
    def http_advance(self, request, agenda_id):
        actor = self._staff(request, "changing the agenda")
        body = json_body(request)
        with self.db.begin() as session:
            result = escalation.advance(
                session,
                agenda_id,
                body.get("status"),
                now(),
                actor["subject"],
                body.get("findings"),
                body.get("scheduled_for"),
                body.get("note"),
            )
        self.publish_events()
        return json_response(200, result)

    @http("GET", "/api/v1/cases/<case_id>")
    def http_case(self, request, case_id):
        self._staff(request, "the whole-process record")
        return json_response(200, self.get_case_record(case_id))

    @http("POST", "/api/v1/rules/reload")
    def http_reload_rules(self, request):
        """As ``huiying rules reload``: ``{"version", "problems"}``, 200 when loaded; 422 when the
        folder is refused (the last good version keeps deciding; problems as ``FILE:LINE: message``)."""
        self._staff(request, "reloading the rules")
        result = self.reload_rules()
        return json_response(422 if result["problems"] else 200, result)

    # --- figures: the JSON API and the XLSX form (staff keys) -----------------------------------

    def _period(self, request):
        return reports.period_from(request.args.get("from"), request.args.get("to"), now())

    def _department_rates(self, period) -> list[dict]:
        with snapshot(self.db) as session:
            return reports.department_rates(session, period)

    @http("GET", "/api/v1/board/overview")
    def http_overview(self, request):
        """The board's first page as JSON: counts, overdue referrals by department, weekly open
        and overdue, cases by street and category (``?from=&to=`` days, default the last 90 days)."""
        self._staff(request, "the board")
        period = self._period(request)
        with snapshot(self.db) as session:
            return json_response(200, reports.overview(session, now(), period))

    @http("GET", "/api/v1/reports/departments")
    def http_department_rates(self, request):
        self._staff(request, "the department report")
        period = self._period(request)
        return json_response(200, {"period": period.as_dict(), "departments": self._department_rates(period)})

    @http("GET", "/api/v1/reports/departments.xlsx")
    def http_department_rates_xlsx(self, request):
        self._staff(request, "the department report")
        return self._rates_download(self._period(request))

    def _rates_download(self, period):
        return download_response(
            reports.rates_workbook(self._department_rates(period), period),
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            f"huiying-departments-{period.start}-{period.end}.xlsx",
        )

    # --- the board (HTML, read-only, staff login) ----------------------------------------------

    def _board_staff(self, request) -> dict:
        """The staff member behind the board session; 401 (to the login form) without one."""
        key = board.key_from_cookie(self.config["BOARD_SECRET"], request)
        if not key:
            raise Unauthorized("please log in")
        actor = actor_for_key(key, self.state.setdefault("keys", KeyCache()), self.intake.authenticate)
        require_staff(actor, "the board")
        return actor

    def _page(self, request, template, **context):
        return board.render(request, template, signed_in=True, names=self._names(), **context)

    def _names(self) -> dict:
        """The directory's names of streets, categories and departments, by code (asked of intake,
        which owns the directory, at most once a minute)."""
        cached = self.state.get("names")
        if cached and cached[0] > time.monotonic():
            return cached[1]
        directory = self.intake.get_directory() or {}
        names = {
            kind: {entry["code"]: entry["name"] for entry in directory.get(key) or []}
            for kind, key in (("street", "streets"), ("category", "categories"), ("department", "departments"))
        }
        self.state["names"] = (time.monotonic() + 60, names)
        return names

    @http("GET", "/board/static/board.css", error_renderer=board.html_error)
    def board_css(self, request):
        return board.stylesheet()

    @http("GET", "/board/login", error_renderer=board.html_error)
    def board_login_form(self, request):
        return board.render(request, "login.html", signed_in=False, next=board.safe_next(request.args.get("next")))

    @http("POST", "/board/login", error_renderer=board.html_error)
    def board_login(self, request):
        key = (request.form.get("key") or "").strip()
        target = board.safe_next(request.form.get("next"))
        actor = self.intake.authenticate(key) if key else None
        if actor is None or actor["role"] != "staff":
            problem = "不是有效的工作人员密钥 / not a valid staff key"
            return board.render(request, "login.html", status=401, signed_in=False, next=target, problem=problem)
        secure = request.scheme == "https" or request.headers.get("X-Forwarded-Proto") == "https"
        return board.logged_in(board.redirect(target), self.config["BOARD_SECRET"], key, secure)

    @http("POST", "/board/logout", error_renderer=board.html_error)
    def board_logout(self, request):
        return board.logged_out(board.redirect("/board/login"))

    @http("GET", "/board/", error_renderer=board.html_error)
    def board_overview(self, request):
        self._board_staff(request)
        period = self._period(request)
        with snapshot(self.db) as session:
            data = reports.overview(session, now(), period)
        names = self._names()
        return self._page(
            request,
            "overview.html",
            data=data,
            period=data["period"],
            weekly=board.grouped_bars(data["weeks"], "week", ["open", "overdue"]),
            by_street=board.horizontal_bars(data["by_street"], names["street"]),
            by_category=board.horizontal_bars(data["by_category"], names["category"]),
        )

    @http("GET", "/board", error_renderer=board.html_error)
    def board_root(self, request):
        return board.redirect("/board/")

    @http("GET", "/board/agenda", error_renderer=board.html_error)
    def board_agenda(self, request):
        self._board_staff(request)
        with snapshot(self.db) as session:
            items = escalation.list_items(session, with_cases=True)
        return self._page(request, "agenda.html", items=items)

    @http("GET", "/board/departments", error_renderer=board.html_error)
    def board_departments(self, request):
        self._board_staff(request)
        period = self._period(request)
        return self._page(request, "departments.html", rates=self._department_rates(period), period=period.as_dict())

    @http("GET", "/board/departments.xlsx", error_renderer=board.html_error)
    def board_departments_xlsx(self, request):
        self._board_staff(request)
        return self._rates_download(self._period(request))

    @http("GET", "/board/cases/<case_id>", error_renderer=board.html_error)
    def board_case(self, request, case_id):
        self._board_staff(request)
        return self._page(request, "case.html", record=self.get_case_record(case_id))


def _changes(previous: dict | None, current: dict) -> dict:
    if not previous:
        return {"first": True, "rules": current["rule_ids"]}
    old_files, new_files = previous["files"], current["files"]
    return {
        "files_added": sorted(set(new_files) - set(old_files)),
        "files_removed": sorted(set(old_files) - set(new_files)),
        "files_changed": sorted(f for f in set(old_files) & set(new_files) if old_files[f] != new_files[f]),
        "rules_added": sorted(set(current["rule_ids"]) - set(previous["rule_ids"])),
        "rules_removed": sorted(set(previous["rule_ids"]) - set(current["rule_ids"])),
    }
