"""Who hears of what (``rules/notify/recipients.yaml``), which ticketing systems want status back
(``rules/notify/sources.yaml``), and the message templates (``rules/notify/templates/*.j2``,
Jinja2): all files operators edit, validated here with file and line."""

from dataclasses import dataclass
from pathlib import Path

import jinja2

from services.common.rules import yamlfile
from services.common.rules.ruleset import Problem, RulesetInvalid

RECIPIENTS = ("department", "supervisors", "inspection_office", "citizen", "raiser")
EVENTS = (
    "case_referred",
    "department_reminded",
    "case_escalated",
    "supervisors_alerted",
    "referral_replied",
    "case_closed",
    "case_reopened",
    "case_needs_triage",
)
STATUS_EVENTS = ("case_referred", "case_needs_triage", "referral_replied", "case_reopened", "case_closed")


@dataclass
class Route:
    event: str
    to: list
    template: str
    kinds: list | None = None
    digest: bool = False  # collected into one daily message per recipient instead


@dataclass
class NotifySettings:
    routes: list
    max_attempts: int
    digest_hour: int
    callbacks: dict  # source -> callback URL
    templates: jinja2.Environment
    version: str

    def close(self):
        pass

    def render(self, template: str, context: dict) -> tuple[str, str]:
        """``(subject, body)``: a template's first line is the subject."""
        text = self.templates.get_template(f"{template}.j2").render(**context).strip()
        subject, _, body = text.partition("\n")
        return subject.strip(), body.strip() or subject.strip()


def load(directory: Path) -> NotifySettings:
    from services.common.rules.ruleset import content_version

    folder = Path(directory) / "notify"
    problems: list[Problem] = []
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder / "templates")),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
    )
    routes, max_attempts, digest_hour, callbacks = [], 6, 9, {}
    try:
        document = yamlfile.load(folder / "recipients.yaml") or {}
        for index, entry in enumerate(document.get("routes") or []):
            line = yamlfile.line_of(document["routes"], index)
            where = str(folder / "recipients.yaml")
            if not isinstance(entry, dict) or entry.get("event") not in EVENTS:
                problems.append(Problem(where, line, f"event must be one of {', '.join(EVENTS)}"))
                continue
            to = entry.get("to") or []
            unknown = [r for r in to if r not in RECIPIENTS]
            if not to or unknown:
                problems.append(Problem(where, line, f"to: lists recipients from {', '.join(RECIPIENTS)}"))
                continue
            template = entry.get("template")
            try:
                templates.get_template(f"{template}.j2")
            except jinja2.TemplateNotFound:
                problems.append(Problem(where, line, f"no template {template}.j2 in {folder / 'templates'}"))
                continue
            except jinja2.TemplateSyntaxError as exc:
                problems.append(Problem(str(folder / "templates" / f"{template}.j2"), exc.lineno, exc.message))
                continue
            if entry.get("digest") not in (None, "daily"):
                problems.append(Problem(where, line, "digest: daily is the only digest there is"))
                continue
            routes.append(Route(entry["event"], list(to), template, entry.get("kinds"), entry.get("digest") == "daily"))
        max_attempts = (document.get("settings") or {}).get("max_attempts", 6)
        digest_hour = (document.get("settings") or {}).get("digest_hour", 9)
        if not isinstance(digest_hour, int) or isinstance(digest_hour, bool) or not 0 <= digest_hour <= 23:
            problems.append(Problem(str(folder / "recipients.yaml"), 1, "digest_hour must be an hour 0..23"))
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or not 1 <= max_attempts <= 20:
            problems.append(Problem(str(folder / "recipients.yaml"), 1, "max_attempts must be a whole number 1..20"))
        sources = yamlfile.load(folder / "sources.yaml") or {}
        for source, entry in (sources.get("sources") or {}).items():
            if not isinstance(entry, dict) or not str(entry.get("callback", "")).startswith(("http://", "https://")):
                problems.append(
                    Problem(
                        str(folder / "sources.yaml"),
                        yamlfile.line_of(sources["sources"], source),
                        f"{source}: callback must be an http(s) URL",
                    )
                )
                continue
            callbacks[source] = entry["callback"]
    except yamlfile.YamlFileError as exc:
        problems.append(Problem(exc.path, exc.line, exc.message))
    if problems:
        raise RulesetInvalid(problems)
    return NotifySettings(routes, max_attempts, digest_hour, callbacks, templates, content_version(folder)[0])
