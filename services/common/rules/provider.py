"""Hot reload: the running rules are replaced only by a complete, valid new version.

A service holds its rules in a ``RulesHolder``; a timer calls ``refresh()`` (cheap: it hashes
the files) and ``huiying rules reload`` calls it at once. A folder with any problem is refused:
the last good version keeps deciding, and the problems are kept for ``health`` and the CLI.
"""

import logging
import threading
from pathlib import Path

from nameko.extensions import DependencyProvider

from services.common.rules.ruleset import RulesetInvalid, content_version

log = logging.getLogger(__name__)


class RulesUnavailable(RuntimeError):
    pass


class RulesWithCalendar:
    """A service's ruleset and the working-day calendar beside it (``rules/calendar/``), loaded
    and replaced together."""

    def __init__(self, rules, calendar):
        self.rules, self.calendar = rules, calendar

    def close(self):
        self.rules.close()


def with_calendar(load_rules):
    """A loader for ``RulesHolder``: the service's rules plus the calendar file."""

    def load(directory: Path) -> RulesWithCalendar:
        from services.common.rules.ruleset import Problem
        from services.common.workdays import CalendarFileError, WorkingCalendar

        rules = load_rules(directory)
        try:
            calendar = WorkingCalendar.from_file(Path(directory) / "calendar" / "holidays.yaml")
        except CalendarFileError as exc:
            rules.close()
            raise RulesetInvalid([Problem(str(Path(directory) / "calendar" / "holidays.yaml"), 1, str(exc))]) from None
        return RulesWithCalendar(rules, calendar)

    return load


class RulesHolder:
    def __init__(self, directory: Path, loader):
        self.directory = Path(directory)
        self.loader = loader  # directory -> loaded rules (raises RulesetInvalid)
        self.current = None
        self.version = None
        self.problems: list[str] = []
        self._seen = None
        self._lock = threading.Lock()

    def refresh(self, force: bool = False) -> bool:
        """Load the files if they changed; True when a new version now decides."""
        with self._lock:
            seen, _ = content_version(self.directory)
            if seen == self._seen and not force:
                return False
            self._seen = seen
            try:
                loaded = self.loader(self.directory)
            except RulesetInvalid as exc:
                self.problems = [str(p) for p in exc.problems]
                log.error(
                    "rule files rejected; still deciding with version %s: %s", self.version, "; ".join(self.problems)
                )
                return False
            previous, self.current = self.current, loaded
            self.version, self.problems = seen, []
            if previous is not None and hasattr(previous, "close"):
                previous.close()
            log.info("rules version %s loaded from %s", seen, self.directory)
            return True

    def get(self):
        if self.current is None:
            raise RulesUnavailable("no valid rules loaded: " + "; ".join(self.problems))
        return self.current

    def status(self) -> dict:
        return {"version": self.version, "problems": self.problems}


class Rules(DependencyProvider):
    """Hands workers the service's ``RulesHolder``; loads (and must load) the rules at start."""

    def __init__(self, loader):
        self.loader = loader

    def setup(self):
        self.holder = RulesHolder(Path(self.container.config["HUIYING_RULES_DIR"]), self.loader)
        self.holder.refresh()
        self.holder.get()  # a service must not start without valid rules

    def get_dependency(self, worker_ctx):
        return self.holder
