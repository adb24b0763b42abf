"""China Standard Time helpers: instants are stored with their zone, calendar days are Shanghai's."""

import os
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

CST = ZoneInfo("Asia/Shanghai")

# A movable clock for ``huiying demo`` (and only for it): when HUIYING_CLOCK_FILE names a file,
# every process's "now" is the real time plus the number of seconds written in that file, so the
# demo can move all four services a week ahead at once. The file is read again when it changes.
CLOCK_FILE_VARIABLE = "HUIYING_CLOCK_FILE"
_offset = {"path": None, "mtime": None, "seconds": 0.0}


def now() -> datetime:
    real = datetime.now(timezone.utc)
    path = os.environ.get(CLOCK_FILE_VARIABLE)
    return real + timedelta(seconds=_clock_offset(path)) if path else real


def _clock_offset(path: str) -> float:
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return 0.0  # no file yet: the real time
    if (_offset["path"], _offset["mtime"]) != (path, mtime):
        with open(path, encoding="utf-8") as clock:
            text = clock.read().strip()
        try:
            seconds = float(text or 0)
        except ValueError:
            raise ValueError(
                f"{path} ({CLOCK_FILE_VARIABLE}) must hold a number of seconds, not {text[:40]!r}"
            ) from None
        _offset.update(path=path, mtime=mtime, seconds=seconds)
    return _offset["seconds"]


def set_clock(path, moment: datetime) -> None:
    """Make ``now()`` in every process reading ``path`` say ``moment`` (then run on from there).
    Written whole, then renamed into place, so no process reads half a number."""
    seconds = (moment - datetime.now(timezone.utc)).total_seconds()
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as clock:
        clock.write(f"{seconds:.3f}\n")
    os.replace(partial, path)


def to_cst(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: every instant must carry its time zone")
    return moment.astimezone(CST)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in China Standard Time, e.g. ``2026-10-01T09:30:00+08:00``."""
    if moment is None:
        return None
    return to_cst(moment).isoformat(timespec="seconds")
