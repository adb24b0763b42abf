"""``huiying``: the operator CLI (shared/CONTRACT.md lists its public commands).

Commands that read take ``--json`` and then print one JSON document on stdout. Expected failures
(broker down, bad file, unknown case) print one line on stderr and exit 1, never a traceback.
"""

import io
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from huiying import importer, stack
from services.common import config as settings
from services.common.directory import DirectoryError, load_directory_file
from services.common.http import ValidationFailed

RPC_TIMEOUT = 60
IMPORT_BATCH = 50


class CliError(click.ClickException):
    """One line on stderr, exit 1."""

    def show(self, file=None):
        click.echo(f"huiying: {self.format_message()}", err=True)


def emit(as_json: bool, document, human=None):
    if as_json:
        click.echo(json.dumps(document, ensure_ascii=False, indent=2))
    elif human is not None:
        human(document)
    else:
        click.echo(json.dumps(document, ensure_ascii=False, indent=2))


@contextmanager
def rpc_proxy():
    """A nameko RPC proxy to the running services, with their errors turned into one line."""
    from nameko.exceptions import RemoteError, RpcTimeout, UnknownService
    from nameko.standalone.rpc import ClusterRpcProxy

    try:
        stack.check_broker()
    except stack.StackError as exc:
        raise CliError(str(exc)) from None
    try:
        with ClusterRpcProxy({"AMQP_URI": settings.amqp_uri(), "serializer": "json"}, timeout=RPC_TIMEOUT) as proxy:
            yield proxy
    except UnknownService as exc:
        name = getattr(exc, "_service_name", exc)
        raise CliError(f"the {name} service is not running; start the stack with 'huiying up'") from None
    except RpcTimeout:
        raise CliError(f"no answer within {RPC_TIMEOUT}s; is the stack running? ('huiying status')") from None
    except RemoteError as exc:
        raise CliError(exc.value or exc.exc_type) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Huiying (回应): every suggestion gets an outcome and a response."""


# --- the stack ------------------------------------------------------------------------------


@main.command()
@click.argument("services", nargs=-1, type=click.Choice(settings.SERVICES))
def migrate(services):
    """Create or upgrade each service's own tables (all four by default)."""
    from services.common.migrations import upgrade

    for service in services or settings.SERVICES:
        upgrade(service)
        click.echo(f"{service}: tables at the latest migration", err=True)


@main.command()
@click.option("--timeout", default=90, show_default=True, help="Seconds to wait for all to be healthy.")
def up(timeout):
    """Migrate, declare queues, start the four services in the background, wait until healthy."""
    _start_stack(timeout)


def _start_stack(timeout: float) -> None:
    from services.common.migrations import upgrade
    from services.common.topology import TopologyMismatch, declare_all

    try:
        stack.check_broker()
        for service in settings.SERVICES:
            upgrade(service)
        # Before any service publishes: an event sent to an exchange without queues is lost.
        declare_all(settings.amqp_uri())
        already_running = {service for service in settings.SERVICES if stack.running_pid(service)}

        def announce(service, pid):
            click.echo(
                f"{service}: pid {pid}, http://{settings.http_address(service)}, log {stack.log_file(service)}",
                err=True,
            )

        for service in settings.SERVICES:
            announce(service, stack.start(service))
        stack.wait_healthy(
            settings.SERVICES,
            timeout=timeout,
            spawned=set(settings.SERVICES) - already_running,
            on_start=announce,
        )
    except (stack.StackError, settings.ConfigurationError, TopologyMismatch) as exc:
        raise CliError(str(exc)) from None
    click.echo("all four services are healthy", err=True)


@main.command()
@click.option("--stop", is_flag=True, help="Stop the demo's services (and nothing else).")
@click.option("--timeout", default=120, show_default=True, help="Seconds to wait for the services.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
def demo(stop, timeout, as_json):
    """Replay the Longgang demo scenario (58 海吉星 suggestions, 12345 tickets, returns, extensions,
    replies, ratings, reminders, agenda, special inspection) on a stack of its own in var/demo,
    with a movable clock; the services stay up afterwards for the board."""
    import contextlib
    import os
    import shutil
    import signal

    from huiying import demo as scenario
    from services.common.timeutil import CLOCK_FILE_VARIABLE, set_clock

    if os.environ.get("HUIYING_VAR_DIR", "").rstrip("/").endswith("demo"):
        demo_dir = settings.var_dir()
    else:
        if not stop and any(stack.running_pid(service) for service in settings.SERVICES):
            raise CliError(
                "the services started by 'huiying up' are running; stop them with 'huiying down' first "
                "(the demo runs its own, with its own database and a clock it moves)"
            )
        demo_dir = settings.var_dir() / "demo"
    os.environ["HUIYING_VAR_DIR"] = str(demo_dir)
    os.environ[CLOCK_FILE_VARIABLE] = str(demo_dir / "clock")
    os.environ.pop("DATABASE_URL", None)  # the demo's own SQLite database in var/demo
    stack.stop_all(settings.SERVICES)
    mail_pid = demo_dir / "run" / "mail-sink.pid"
    if mail_pid.exists():  # the demo's mail server, if it started one
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(mail_pid.read_text()), signal.SIGTERM)
    if stop:
        click.echo("the demo's services are stopped", err=True)
        return
    shutil.rmtree(demo_dir, ignore_errors=True)
    demo_dir.mkdir(parents=True)
    set_clock(demo_dir / "clock", scenario.START)
    if "HUIYING_SMTP_HOST" not in os.environ:  # somewhere for e-mails and SMS to go (kept by nobody)
        from huiying.mail_sink import SmtpSink

        sink = SmtpSink(detached=True, sms_gateway="HUIYING_SMS_GATEWAY_URL" not in os.environ)
        (demo_dir / "run").mkdir(parents=True, exist_ok=True)
        mail_pid.write_text(str(sink.process.pid))
        os.environ.update(HUIYING_SMTP_HOST="127.0.0.1", HUIYING_SMTP_PORT=str(sink.port))
        os.environ.setdefault("HUIYING_SMS_GATEWAY_URL", f"http://127.0.0.1:{sink.sms_port}/sms")
    _start_stack(timeout)

    from services.common.topology import event_handler_queue_names
    from services.notify.queue import QUEUE as DELIVERIES

    queues = [*event_handler_queue_names(), DELIVERIES.name]
    with rpc_proxy() as proxy:
        replay = scenario.Demo(
            proxy,
            demo_dir / "clock",
            say=lambda line: click.echo(line, err=True),
            settle=lambda: scenario.wait_until_settled(settings.amqp_uri(), queues),
        )
        summary = replay.run()

    def human(doc):
        click.echo(f"\ndemo time now {doc['demo_time']}: {doc['cases']} cases, {doc['referrals']} referrals")
        click.echo("  departments: " + ", ".join(f"{k} {v}" for k, v in doc["steps"].items()))
        click.echo("  ratings: " + ", ".join(f"{k} {v}" for k, v in doc["ratings"].items()))
        click.echo("  escalations (per case): " + ", ".join(f"{k} {v}" for k, v in doc["decisions"].items()))
        click.echo(
            f"  reminder digests: {doc['digests']}; agenda: " + ", ".join(f"{k} {v}" for k, v in doc["agenda"].items())
        )
        click.echo("  notifications: " + ", ".join(f"{k} {v}" for k, v in doc["notifications"].items()))
        click.echo(f"\nthe board: {doc['board']}  (log in with the staff key {doc['staff_key']})")
        click.echo("stop the demo with: huiying demo --stop")

    emit(as_json, summary, human)


@main.command()
def down():
    """Stop what 'huiying up' started."""
    for service, was_running in stack.stop_all(settings.SERVICES).items():
        click.echo(f"{service}: {'stopped' if was_running else 'not running'}", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def status(as_json):
    """Each service's health, queue depths and dead-letter counts."""
    from services.common.events import DEAD_QUEUE as EVENTS_DEAD_QUEUE
    from services.common.topology import event_handler_queue_names
    from services.intake.ticket_queue import DEAD_QUEUE, RETRY_QUEUE, TICKET_QUEUE
    from services.notify.queue import DEAD_QUEUE as NOTIFY_DEAD_QUEUE

    services = {}
    for service in settings.SERVICES:
        services[service] = stack.health(service, readiness=True) | {"pid": stack.running_pid(service)}
    try:
        stack.check_broker()
        names = event_handler_queue_names()
        names += [TICKET_QUEUE.name, RETRY_QUEUE.name]
        queues = stack.queue_depths(settings.amqp_uri(), names)
        dead_queues = [DEAD_QUEUE.name, EVENTS_DEAD_QUEUE.name, NOTIFY_DEAD_QUEUE.name]
        dead = {name: v["messages"] for name, v in stack.queue_depths(settings.amqp_uri(), dead_queues).items()}
        broker = "ok"
    except stack.StackError as exc:
        queues, dead, broker = {}, {}, str(exc)
    document = {"services": services, "broker": broker, "queues": queues, "dead_letters": dead}

    def human(doc):
        for name, s in doc["services"].items():
            state = "ready" if s.get("ready") else "healthy, NOT ready" if s["healthy"] else "NOT healthy"
            click.echo(f"{name:12} {state:18} {s['url']}  pid={s['pid']}")
            for check, outcome in s["checks"].items():
                if outcome != "ok":
                    click.echo(f"  {check}: {outcome}")
        click.echo(f"broker       {doc['broker']}")
        for name, q in doc["queues"].items():
            messages = "-" if q["messages"] is None else q["messages"]
            consumers = "-" if q["consumers"] is None else q["consumers"]
            click.echo(f"  {messages:>6} msgs {consumers:>3} consumers  {name}")
        for name, count in doc["dead_letters"].items():
            click.echo(f"  {count if count is not None else '-':>6} dead letters  {name}")

    emit(as_json, document, human)
    if not all(s["healthy"] for s in services.values()):
        sys.exit(1)


# --- reference data and credentials ---------------------------------------------------------


@main.group()
def directory():
    """The district directory (streets, sectors, departments, members, supervisors)."""


@directory.command("load")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def directory_load(file, as_json):
    """Validate FILE (YAML or JSON) and make it the current directory."""
    try:
        loaded = load_directory_file(file)
    except DirectoryError as exc:
        raise CliError(str(exc)) from None
    with rpc_proxy() as proxy:
        summary = proxy.intake.load_directory(loaded.model_dump(mode="json"))
    emit(
        as_json,
        summary,
        lambda s: click.echo(
            f"loaded {s['district']}: {s['streets']} streets, {s['sectors']} sectors in {s['sector_groups']} groups, "
            f"{s['workstations']} workstations, {s['departments']} departments, {s['members']} members, "
            f"{s['special_supervisors']} special supervisors (version {s['content_hash']})"
        ),
    )


@main.group()
def credentials():
    """API keys for ticketing systems, departments and staff."""


@credentials.command("create")
@click.option("--source", help="A ticketing system or channel (its key is also its Open311 api_key).")
@click.option("--department", help="A department code from the directory.")
@click.option("--staff", help="A committee staff member's name.")
@click.option("--json", "as_json", is_flag=True)
def credentials_create(source, department, staff, as_json):
    """Issue a key; it is printed once and stored only as a hash."""
    chosen = [
        (role, subject)
        for role, subject in (("source", source), ("department", department), ("staff", staff))
        if subject
    ]
    if len(chosen) != 1:
        raise CliError("give exactly one of --source, --department, --staff")
    role, subject = chosen[0]
    with rpc_proxy() as proxy:
        issued = proxy.intake.create_credential(role, subject)
    emit(
        as_json,
        issued,
        lambda d: click.echo(f"{d['key']}\n(role {d['role']}, subject {d['subject']}; shown once, keep it safe)"),
    )


# --- cases ----------------------------------------------------------------------------------


@main.command()
@click.option("--source", required=True)
@click.option("--external-id", required=True)
@click.option("--title", required=True)
@click.option("--description", required=True)
@click.option("--category")
@click.option("--street")
@click.option("--reporter-phone")
@click.option("--kind", type=click.Choice(["proposal", "consultation_topic", "public_opinion", "referral"]))
@click.option("--json", "as_json", is_flag=True)
def submit(source, external_id, title, description, category, street, reporter_phone, kind, as_json):
    """Submit one case, as a channel would."""
    from services.intake.schemas import parse_submission

    data = {
        k: v
        for k, v in dict(
            source=source,
            external_id=external_id,
            title=title,
            description=description,
            category=category,
            street=street,
            reporter_phone=reporter_phone,
            kind=kind,
        ).items()
        if v
    }
    try:
        parse_submission(data)  # the same rules as the service, checked before the round trip
    except ValidationFailed as exc:
        raise CliError(str(exc)) from None
    with rpc_proxy() as proxy:
        result = proxy.intake.submit_case(data, "cli")
    emit(as_json, result, lambda r: click.echo(f"{r['id']} ({'created' if r['created'] else 'already received'})"))


@main.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--source", required=True, help="The channel these rows came from, e.g. consultation-2026-07.")
@click.option("--json", "as_json", is_flag=True)
def import_(file, source, as_json):
    """Import cases from a CSV or XLSX file; rejected rows are reported with reasons."""
    from services.intake.schemas import parse_submission

    try:
        header, rows = importer.read_rows(file)
        mapping = importer.column_map(file, header)
    except OSError as exc:
        raise CliError(f"{file}: cannot read: {exc.strerror}") from None
    except importer.ImportFileError as exc:
        raise CliError(str(exc)) from None

    report = {"imported": 0, "duplicates": 0, "rejected": []}
    valid = []
    for number, cells in rows:
        data = importer.row_to_submission(cells, mapping, source)
        try:
            parse_submission(data)
            valid.append((number, data))
        except ValidationFailed as exc:
            report["rejected"].append({"row": number, "reason": str(exc)})

    # The bar goes to stderr, and only on a terminal: stdout stays clean for --json and pipes.
    bar_stream = sys.stderr if sys.stderr.isatty() else io.StringIO()
    with rpc_proxy() as proxy, click.progressbar(length=len(valid), label="importing", file=bar_stream) as bar:
        for start in range(0, len(valid), IMPORT_BATCH):
            batch = valid[start : start + IMPORT_BATCH]
            for (number, _), result in zip(batch, proxy.intake.submit_cases([d for _, d in batch], "import")):
                if "error" in result:
                    details = "; ".join(f"{d['field']}: {d['problem']}" for d in result.get("details", []))
                    report["rejected"].append(
                        {"row": number, "reason": f"{result['error']} — {details}" if details else result["error"]}
                    )
                elif result["created"]:
                    report["imported"] += 1
                else:
                    report["duplicates"] += 1
            bar.update(len(batch))
    report["rejected"].sort(key=lambda r: r["row"])

    def human(r):
        click.echo(f"imported {r['imported']}, already there {r['duplicates']}, rejected {len(r['rejected'])}")
        for rejected in r["rejected"]:
            click.echo(f"  row {rejected['row']}: {rejected['reason']}")

    emit(as_json, report, human)


# --- referrals, triage, feedback (routing) ---------------------------------------------------


def _print_referrals(found):
    if not found:
        click.echo("no referrals")
    for r in found:
        extension = f"  extension {r['extension']['status']}" if r.get("extension") else ""
        lead = " (lead)" if r["lead"] else ""
        click.echo(f"{r['id']:24} {r['status']:10} due {r['due_at']}  {r['department_name']}{lead}{extension}")


@main.group()
def referral():
    """Referrals to departments: list them and act on them as committee staff."""


@referral.command("list")
@click.option("--status", type=click.Choice(["referred", "accepted", "returned", "replied", "superseded"]))
@click.option("--department", help="A department code.")
@click.option("--case", "case_id", help="Only this case's referrals.")
@click.option("--json", "as_json", is_flag=True)
def referral_list(status, department, case_id, as_json):
    with rpc_proxy() as proxy:
        found = proxy.routing.list_referrals(status, department, case_id)
    emit(as_json, found, _print_referrals)


def _referral_step(referral_id, step, params, as_json):
    with rpc_proxy() as proxy:
        result = proxy.routing.referral_step(referral_id, step, params)
    emit(as_json, result, lambda r: click.echo(json.dumps(r, ensure_ascii=False)))


@referral.command("accept")
@click.argument("referral_id")
@click.option("--json", "as_json", is_flag=True)
def referral_accept(referral_id, as_json):
    """The department accepts the referral."""
    _referral_step(referral_id, "accept", {}, as_json)


@referral.command("return")
@click.argument("referral_id")
@click.option("--reason", required=True, help="Why it is not this department's (退回理由).")
@click.option("--json", "as_json", is_flag=True)
def referral_return(referral_id, reason, as_json):
    """Return (退回) a referral within the return window; the case is re-routed or triaged."""
    _referral_step(referral_id, "return", {"reason": reason}, as_json)


@referral.command("extend")
@click.argument("referral_id")
@click.option("--days", type=int, required=True, help="Working days asked for (延期).")
@click.option("--reason", required=True)
@click.option("--json", "as_json", is_flag=True)
def referral_extend(referral_id, days, reason, as_json):
    """Ask for more time before the deadline."""
    _referral_step(referral_id, "extension", {"working_days": days, "reason": reason}, as_json)


@referral.command("decide")
@click.argument("referral_id")
@click.option("--grant/--refuse", required=True)
@click.option("--note")
@click.option("--json", "as_json", is_flag=True)
def referral_decide(referral_id, grant, note, as_json):
    """Grant or refuse a pending extension request (staff)."""
    _referral_step(referral_id, "extension_decision", {"grant": grant, "note": note}, as_json)


@referral.command("reply")
@click.argument("referral_id")
@click.option("--result", required=True, help="What was done (答复).")
@click.option("--json", "as_json", is_flag=True)
def referral_reply(referral_id, result, as_json):
    """The department's reply with the result."""
    _referral_step(referral_id, "reply", {"result": result}, as_json)


@main.command()
@click.argument("case_id")
@click.option("--rating", required=True, type=click.Choice(["满意", "基本满意", "不满意"]))
@click.option("--comment")
@click.option("--json", "as_json", is_flag=True)
def feedback(case_id, rating, comment, as_json):
    """Record the citizen's rating of a replied case; 不满意 reopens it for redo (重办)."""
    with rpc_proxy() as proxy:
        result = proxy.routing.record_feedback(case_id, rating, comment)
    emit(as_json, result, lambda r: click.echo(f"{r['case_id']}: {r['status']}"))


@main.group()
def triage():
    """Cases no rule could route: staff route them by hand (人工分派)."""


@triage.command("list")
@click.option("--json", "as_json", is_flag=True)
def triage_list(as_json):
    with rpc_proxy() as proxy:
        cases = proxy.routing.list_triage()

    def human(found):
        if not found:
            click.echo("the triage list is empty")
        for c in found:
            click.echo(f"{c['case_id']}  {c['title']}  [{c['category'] or '-'} / {c['street'] or '-'}]  {c['reason']}")

    emit(as_json, cases, human)


@triage.command("route")
@click.argument("case_id")
@click.option("--department", "departments", multiple=True, required=True, help="Repeat for several.")
@click.option("--lead", help="The lead department (default: the first).")
@click.option("--json", "as_json", is_flag=True)
def triage_route(case_id, departments, lead, as_json):
    with rpc_proxy() as proxy:
        result = proxy.routing.route_triaged_case(case_id, list(departments), lead)
    emit(as_json, result, lambda r: _print_referrals_brief(r))


def _print_referrals_brief(result):
    for r in result.get("referrals", []):
        click.echo(f"{r['referral_id']}  {r['department_name']}{' (lead)' if r['lead'] else ''}  due {r['due_at']}")


@main.group()
def rules():
    """The rule files in rules/: check, test, simulate, explain, reload."""


RULESETS = ("routing", "supervision")


def _load_rulesets(directory: Path):
    """Every ruleset in DIR with the calendar; ``(loaded, problems)``."""
    from services.common.rules.provider import with_calendar
    from services.common.rules.ruleset import RulesetInvalid
    from services.notify import settings as notify_settings
    from services.routing import rules as routing_rules
    from services.supervision import rules as supervision_rules

    loaders = {"routing": routing_rules.load, "supervision": supervision_rules.load}
    loaded, problems = {}, []
    for name in RULESETS:
        try:
            loaded[name] = with_calendar(loaders[name])(directory)
        except RulesetInvalid as exc:
            problems += [str(p) for p in exc.problems]
    try:
        notify_settings.load(directory)  # recipients, sources and templates
    except RulesetInvalid as exc:
        problems += [str(p) for p in exc.problems]
    return loaded, problems


@rules.command("check")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
def rules_check(directory):
    """Validate the rule files; each problem as FILE:LINE: message on stderr."""
    directory = directory or settings.rules_dir()
    loaded, problems = _load_rulesets(directory)
    for problem in dict.fromkeys(problems):
        click.echo(problem, err=True)
    if problems:
        sys.exit(1)
    for name, rules_and_calendar in loaded.items():
        ruleset = rules_and_calendar.rules
        click.echo(f"{name}: {len(ruleset.rules)} rules, version {ruleset.version}: valid")


@rules.command("test")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
def rules_test(directory):
    """Run the *.test.yaml cases beside the rules; exit 1 on a failure."""
    from services.common.rules import testing
    from services.routing.rules import STAGES as ROUTING_STAGES
    from services.supervision.rules import STAGES as SUPERVISION_STAGES

    directory = directory or settings.rules_dir()
    loaded, problems = _load_rulesets(directory)
    for problem in dict.fromkeys(problems):
        click.echo(problem, err=True)
    if problems:
        raise CliError("the rules are invalid; fix them first ('huiying rules check')")
    stages = {"routing": ROUTING_STAGES, "supervision": SUPERVISION_STAGES}
    outcomes = []
    for name, rules_and_calendar in loaded.items():
        outcomes += testing.run(Path(directory) / name, rules_and_calendar.rules, stages[name])
    for outcome in outcomes:
        if outcome.passed:
            click.echo(f"{outcome.where} {outcome.name} PASSED")
        else:
            click.echo(f"{outcome.where} {outcome.name} FAILED: {outcome.message}")
    passed = sum(o.passed for o in outcomes)
    click.echo(f"{passed} passed, {len(outcomes) - passed} failed")
    if passed != len(outcomes):
        sys.exit(1)


@rules.command("simulate")
@click.option("--now", "now_iso", required=True, help="ISO 8601 with offset, e.g. 2026-10-20T09:00:00+08:00")
@click.option("--rules", "directory", type=click.Path(path_type=Path), help="Candidate rules (default: rules/).")
@click.option("--json", "as_json", is_flag=True)
def rules_simulate(now_iso, directory, as_json):
    """Dry run of the supervision rules over live data: what would fire, and how that differs
    from the running rules. Changes nothing."""
    directory = Path(directory or settings.rules_dir())
    files = {}
    for sub in ("supervision", "calendar"):
        for path in sorted((directory / sub).rglob("*.yaml")):
            if not path.name.endswith(".test.yaml"):
                files[str(path.relative_to(directory))] = path.read_text(encoding="utf-8")
    if not any(name.startswith("supervision/") for name in files):
        raise CliError(f"{directory / 'supervision'}: no rule files")
    with rpc_proxy() as proxy:
        result = proxy.supervision.simulate(files, now_iso)

    def human(r):
        click.echo(
            f"{r['evaluated']} unresolved cases as of {r['now']}; candidate {r['ruleset_version']}, "
            f"running {r['running_version']}"
        )
        for title, entries in (("would decide", r["decisions"]), ("added", r["added"]), ("removed", r["removed"])):
            click.echo(f"{title}: {len(entries)}")
            for d in entries:
                click.echo(f"  {d['rule_id']} {d['action']} {', '.join(d['case_ids'])}")

    emit(as_json, result, human)


@rules.command("explain")
@click.argument("case_id")
@click.option("--now", "now_iso", help="ISO 8601 with offset (default: now).")
@click.option("--json", "as_json", is_flag=True)
def rules_explain(case_id, now_iso, as_json):
    """Why each supervision rule did or did not fire for a case."""
    with rpc_proxy() as proxy:
        result = proxy.supervision.explain(case_id, now_iso)

    def human(r):
        click.echo(f"{r['case_id']} as of {r['now']} (rules {r['ruleset_version']})")
        for rule in r["rules"]:
            if rule["matched"]:
                click.echo(f"  FIRES    {rule['rule_id']}")
            else:
                click.echo(f"  no       {rule['rule_id']}: {'; '.join(rule['failed_conditions'])}")

    emit(as_json, result, human)


@rules.command("reload")
@click.option("--json", "as_json", is_flag=True)
def rules_reload(as_json):
    """Make the running services load the rule files now (a bad file is refused)."""
    with rpc_proxy():
        pass  # one clear line when the broker is down
    status = {name: _ask_if_running(name, "reload_rules") for name in (*RULESETS, "notify")}

    def human(s):
        for name, v in s.items():
            if v is None:
                click.echo(f"{name}: not running")
                continue
            refused = f"; REFUSED: {'; '.join(v['problems'])}" if v["problems"] else ""
            click.echo(f"{name}: version {v['version']}{refused}")

    emit(as_json, status, human)
    if any(v and v["problems"] for v in status.values()):
        sys.exit(1)


def _ask_if_running(service: str, method: str, *args, timeout: int = 10):
    """Call a service's RPC method; None when the service is not running."""
    from nameko.exceptions import RpcTimeout, UnknownService
    from nameko.standalone.rpc import ClusterRpcProxy

    try:
        with ClusterRpcProxy({"AMQP_URI": settings.amqp_uri(), "serializer": "json"}, timeout=timeout) as proxy:
            return getattr(getattr(proxy, service), method)(*args)
    except (UnknownService, RpcTimeout):
        return None


@rules.command("versions")
@click.option("--json", "as_json", is_flag=True)
def rules_versions(as_json):
    """Each version of the supervision rules that decided, and what changed."""
    with rpc_proxy() as proxy:
        versions = proxy.supervision.rule_versions()
    emit(
        as_json,
        versions,
        lambda vs: [
            click.echo(f"{v['loaded_at']}  {v['version']}  {json.dumps(v['changes'], ensure_ascii=False)}") for v in vs
        ],
    )


@main.group()
def notify():
    """Notifications: what failed, and sending it again."""


@notify.command("failures")
@click.option("--json", "as_json", is_flag=True)
def notify_failures(as_json):
    """Deliveries parked after their last attempt (addresses masked)."""
    with rpc_proxy() as proxy:
        found = proxy.notify.failures()

    def human(rows):
        if not rows:
            click.echo("no failed deliveries")
        for d in rows:
            click.echo(
                f"{d['id']:6} {d['case_id'] or '-':16} {d['recipient']:24} {d['channel']:8} "
                f"{d['address']}  after {d['attempts']}: {d['last_error']}"
            )

    emit(as_json, found, human)


@notify.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True, help="Every failed delivery.")
@click.option("--json", "as_json", is_flag=True)
def notify_retry(ids, everything, as_json):
    """Send parked deliveries again."""
    if not ids and not everything:
        raise CliError("name delivery ids, or --all")
    with rpc_proxy() as proxy:
        result = proxy.notify.retry(None if everything else list(ids))
    emit(as_json, result, lambda r: click.echo(f"queued again: {len(r['retried'])}"))


# --- supervision: sweep and agenda ------------------------------------------------------------


@main.command()
@click.option("--now", "now_iso", required=True, help="ISO 8601 with offset, e.g. 2026-10-20T09:00:00+08:00")
@click.option("--json", "as_json", is_flag=True)
def sweep(now_iso, as_json):
    """Evaluate every unresolved case as of NOW and carry out the decisions (each only once)."""
    with rpc_proxy() as proxy:
        result = proxy.supervision.sweep(now_iso)

    def human(r):
        click.echo(
            f"{r['evaluated']} unresolved cases as of {r['now']}: {len(r['decisions'])} new decisions, "
            f"{r['repeated']} already taken"
        )
        for d in r["decisions"]:
            click.echo(f"  {d['rule_id']} → {d['action']}: {', '.join(d['case_ids'])}")

    emit(as_json, result, human)


@main.group()
def report():
    """Reports offices pass around."""


@report.command("departments")
@click.option("--from", "start", help="First day (YYYY-MM-DD), by day of referral; default 90 days ago.")
@click.option("--to", "end", help="Last day, included; default today.")
@click.option("--xlsx", "xlsx_file", type=click.Path(dir_okay=False, path_type=Path), help="Write the XLSX form here.")
@click.option("--json", "as_json", is_flag=True)
def report_departments(start, end, xlsx_file, as_json):
    """Per department: referred, 响应率, 解决率, 满意率, 按期办结率 over a period (README, "The board")."""
    import base64

    from services.supervision.reports import percent

    with rpc_proxy() as proxy:
        found = proxy.supervision.department_rates(start, end, bool(xlsx_file))
    if xlsx_file:
        partial = xlsx_file.with_name(xlsx_file.name + ".partial")
        partial.write_bytes(base64.b64decode(found.pop("xlsx_base64")))
        partial.replace(xlsx_file)  # never a half-written file under the name asked for

    def human(doc):
        click.echo(f"{doc['period']['from']} – {doc['period']['to']}, by day of referral")
        click.echo(f"{'department':32} {'referred':>8} {'响应率':>7} {'解决率':>7} {'满意率':>7} {'按期办结率':>7}")
        for d in doc["departments"]:
            rates = (d["response_rate"], d["resolution_rate"], d["satisfaction_rate"], d["on_time_rate"])
            click.echo(
                f"{d['department_name'][:30]:32} {d['referred']:>8} " + " ".join(f"{percent(r):>9}" for r in rates)
            )
        if xlsx_file:
            click.echo(f"written: {xlsx_file}", err=True)

    emit(as_json, found, human)


@main.group()
def agenda():
    """The democratic-supervision agenda (民主监督议题库), joint supervision and special inspections."""


@agenda.command("list")
@click.option("--status", type=click.Choice(["proposed", "scheduled", "under_supervision", "concluded"]))
@click.option("--kind", type=click.Choice(["agenda", "joint_supervision", "special_inspection"]))
@click.option("--json", "as_json", is_flag=True)
def agenda_list(status, kind, as_json):
    with rpc_proxy() as proxy:
        items = proxy.supervision.list_agenda(status, kind)

    def human(found):
        if not found:
            click.echo("the agenda is empty")
        for i in found:
            click.echo(f"{i['id']}  {i['status']:17} {i['kind']:18} {len(i['case_ids'])} case(s)  {i['title']}")

    emit(as_json, items, human)


@agenda.command("show")
@click.argument("agenda_id")
@click.option("--json", "as_json", is_flag=True)
def agenda_show(agenda_id, as_json):
    with rpc_proxy() as proxy:
        item = proxy.supervision.show_agenda(agenda_id)
    emit(as_json, item, _print_agenda_item)


def _print_agenda_item(i):
    click.echo(f"{i['id']}  {i['title']}")
    click.echo(f"  {i['kind']}, {i['status']}, by rule {i['rule_id']} ({i['scope']})")
    for c in i.get("cases", []):
        click.echo(f"  {c['id']}  {c['status']:10} {c['title']}")
    for step in i["history"]:
        click.echo(f"  {step['at']}  {step['status']}  by {step['by']}")
    if i["findings"]:
        click.echo(f"  findings: {i['findings']}")


@agenda.command("advance")
@click.argument("agenda_id")
@click.option("--to", "to", required=True, type=click.Choice(["scheduled", "under_supervision", "concluded"]))
@click.option("--findings", help="Required to conclude.")
@click.option("--date", "scheduled_for", help="The scheduled date (YYYY-MM-DD).")
@click.option("--note")
@click.option("--json", "as_json", is_flag=True)
def agenda_advance(agenda_id, to, findings, scheduled_for, note, as_json):
    """Move an item on: proposed → scheduled → under_supervision → concluded (with findings)."""
    with rpc_proxy() as proxy:
        item = proxy.supervision.advance_agenda(agenda_id, to, findings, scheduled_for, note)
    emit(as_json, item, _print_agenda_item)


@main.group()
def case():
    """One case's whole-process record."""


@case.command("show")
@click.argument("case_id")
@click.option("--json", "as_json", is_flag=True)
def case_show(case_id, as_json):
    """Every step of a case from receipt to closure or escalation."""
    with rpc_proxy() as proxy:
        record = proxy.supervision.get_case_record(case_id)
    record["deliveries"] = _ask_if_running("notify", "deliveries_for", case_id, timeout=5)  # None: not known

    def human(r):
        click.echo(f"{r['id']}  {r['title']}")
        click.echo(f"  status {r['status']}  kind {r['kind'] or '-'}")
        click.echo(f"  category {r['category'] or '-'}  street {r['street'] or '-'}")
        for referral in r["referrals"]:
            click.echo(f"  referral {referral['department_name']} ({referral['status']}), due {referral['due_at']}")
        for step in r["timeline"]:
            click.echo(f"  {step['at']}  {step['event']}")
        for delivery in r["deliveries"] or []:
            click.echo(
                f"  notified {delivery['recipient']} by {delivery['channel']} ({delivery['address']}): "
                f"{delivery['status']}"
            )
        for escalation in r["escalations"]:
            agenda_item = f" ({escalation['agenda_id']})" if escalation.get("agenda_id") else ""
            click.echo(
                f"  escalated: {escalation['action']}{agenda_item} by rule {escalation['rule_id']} "
                f"at {escalation['at']}"
            )

    emit(as_json, record, human)


if __name__ == "__main__":
    main()
