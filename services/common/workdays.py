"""Working days on the official Chinese calendar (public holidays and 调休 working weekends).

The ``chinese-calendar`` package covers the years the State Council has published. For later
years we fall back to a list kept with the rules (``rules/calendar/holidays.yaml``: days off and
weekend days made working days, filled in by staff when the year's notice appears), and for a
year in neither, to plain weekends — with a warning, never a crash.
"""

import calendar as month_calendar
import logging
from datetime import date, datetime, time, timedelta
from pathlib import Path

import chinese_calendar
from chinese_calendar import constants as published

from services.common.rules import yamlfile
from services.common.timeutil import CST

log = logging.getLogger(__name__)
PUBLISHED_YEARS = frozenset(d.year for d in published.holidays)


class CalendarFileError(ValueError):
    pass


class WorkingCalendar:
    def __init__(
        self,
        holidays: set[date] = frozenset(),
        workdays: set[date] = frozenset(),
        fallback_years: frozenset = frozenset(),
    ):
        self.holidays = set(holidays)
        self.workdays = set(workdays)
        self.fallback_years = set(fallback_years)
        self._warned: set[int] = set()
        self._between: dict = {}  # sweeps ask the same (start, end) pairs for thousands of cases
        self._working: dict[date, bool] = {}  # every referral's deadline counts the same days
        self._added: dict = {}  # (start, count): every case referred on a day gets one of a few

    @classmethod
    def from_file(cls, path: Path) -> "WorkingCalendar":
        """Read the fallback list; a missing file means weekends only for unpublished years."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            document = yamlfile.load(path) or {}
        except yamlfile.YamlFileError as exc:
            raise CalendarFileError(str(exc)) from None
        years = document.get("years") if isinstance(document, dict) else None
        if not isinstance(years, dict):
            raise CalendarFileError(f"{path}:1: expected 'years:' mapping each year to holidays and workdays")
        holidays, workdays = set(), set()
        for year, entry in years.items():
            line = yamlfile.line_of(years, year)
            if not isinstance(year, int) or not isinstance(entry, dict):
                raise CalendarFileError(f"{path}:{line}: each year is a number with holidays: and workdays: lists")
            for key, target in (("holidays", holidays), ("workdays", workdays)):
                for index, day in enumerate(entry.get(key) or []):
                    if not isinstance(day, date) or isinstance(day, datetime) or day.year != year:
                        where = yamlfile.line_of(entry.get(key), index, line)
                        raise CalendarFileError(f"{path}:{where}: {key} of {year} must be dates in {year} (YYYY-MM-DD)")
                    target.add(day)
        return cls(holidays, workdays, frozenset(years))

    def source(self, year: int) -> str:
        if year in PUBLISHED_YEARS:
            return "chinese-calendar"
        if year in self.fallback_years:
            return "rules/calendar/holidays.yaml"
        return "weekends only"

    def is_working_day(self, day: date) -> bool:
        working = self._working.get(day)
        if working is None:
            working = self._working[day] = self._is_working_day(day)
        return working

    def _is_working_day(self, day: date) -> bool:
        if day.year in PUBLISHED_YEARS:
            return chinese_calendar.is_workday(day)
        if day.year not in self._warned:
            self._warned.add(day.year)
            log.warning(
                "working days of %s are not published in chinese-calendar; using %s", day.year, self.source(day.year)
            )
        if day in self.workdays:
            return True
        if day in self.holidays:
            return False
        return day.weekday() < 5

    def add_working_days(self, start: date, count: int) -> date:
        """The ``count``-th working day after ``start`` (``start`` itself does not count)."""
        key = (start, count)
        if key not in self._added:
            if len(self._added) > 100_000:
                self._added.clear()
            day, remaining = start, count
            while remaining > 0:
                day += timedelta(days=1)
                if self.is_working_day(day):
                    remaining -= 1
            self._added[key] = day
        return self._added[key]

    def next_working_day(self, day: date) -> date:
        while not self.is_working_day(day):
            day += timedelta(days=1)
        return day

    def working_days_between(self, start: date, end: date) -> int:
        """Working days after ``start`` up to and including ``end`` (negative when end < start)."""
        if end < start:
            return -self.working_days_between(end, start)
        key = (start, end)
        if key not in self._between:
            if len(self._between) > 100_000:
                self._between.clear()
            self._between[key] = sum(
                1 for n in range(1, (end - start).days + 1) if self.is_working_day(start + timedelta(days=n))
            )
        return self._between[key]


def add_months(day: date, months: int) -> date:
    month_index = day.month - 1 + months
    year, month = day.year + month_index // 12, month_index % 12 + 1
    return date(year, month, min(day.day, month_calendar.monthrange(year, month)[1]))


def end_of_day(day: date) -> datetime:
    """A deadline day ends at 23:59:59 China Standard Time."""
    return datetime.combine(day, time(23, 59, 59), tzinfo=CST)


def cst_date(moment: datetime) -> date:
    return moment.astimezone(CST).date()
