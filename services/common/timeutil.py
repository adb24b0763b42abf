"""China Standard Time helpers: instants are stored with their zone, calendar days are Shanghai's."""

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

CST = ZoneInfo("Asia/Shanghai")


def now() -> datetime:
    return datetime.now(timezone.utc)


def to_cst(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: every instant must carry its time zone")
    return moment.astimezone(CST)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in China Standard Time, e.g. ``2026-10-01T09:30:00+08:00``."""
    if moment is None:
        return None
    return to_cst(moment).isoformat(timespec="seconds")
