"""The board's figures, as plain queries over supervision's projection: per-department rates for a
period, overdue referrals by department, open and overdue cases per week, cases by street and
category; and the per-department rates as the XLSX form offices pass around.

A period is a pair of calendar days in China Standard Time, ``start`` included, ``end`` included;
a referral belongs to the period in which it was referred. The rates (README, "The board"):

- 响应率 response: referrals the department accepted or replied to, of those referred to it;
- 解决率 resolution: referrals replied to whose case was not then rated 不满意, of those referred;
- 满意率 satisfaction: of replied referrals whose case was rated, those rated 满意 or 基本满意;
- 按期办结率 on time: referrals replied to by their due date, of those replied to.

A rate whose denominator is zero is ``None`` (shown as "—"), never 0 % or 100 %.
"""

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from io import BytesIO

from sqlalchemy import and_, case, func, or_, select

from services.common.http import ValidationFailed
from services.common.timeutil import CST, iso
from services.supervision.models import case_projection, referral_projection
from services.supervision.projection import OPEN_REFERRAL

SATISFIED = ("满意", "基本满意")
MAX_PERIOD_DAYS = 3660
DEFAULT_PERIOD_DAYS = 90
RATES = ("response_rate", "resolution_rate", "satisfaction_rate", "on_time_rate")


@dataclass(frozen=True)
class Period:
    start: date
    end: date  # included

    @property
    def since(self) -> datetime:
        return datetime.combine(self.start, time(), CST)

    @property
    def until(self) -> datetime:  # excluded
        return datetime.combine(self.end + timedelta(days=1), time(), CST)

    def as_dict(self) -> dict:
        return {"from": self.start.isoformat(), "to": self.end.isoformat()}


def period_from(start: str | None, end: str | None, now: datetime) -> Period:
    """The period named by ``from``/``to`` (``YYYY-MM-DD``); by default the last 90 days, today
    included. A bad day or a reversed or too long period is a ValidationFailed naming the parameter."""
    today = now.astimezone(CST).date()

    def day(value, name, default):
        if value in (None, ""):
            return default
        try:
            return date.fromisoformat(value)
        except (TypeError, ValueError):
            raise ValidationFailed(
                f"{name} must be a day as YYYY-MM-DD, not {value!r}", [{"field": name, "problem": "not a date"}]
            ) from None

    period = Period(day(start, "from", today - timedelta(days=DEFAULT_PERIOD_DAYS - 1)), day(end, "to", today))
    if period.end < period.start:
        raise ValidationFailed(
            f"from ({period.start}) is after to ({period.end})", [{"field": "from", "problem": "after to"}]
        )
    if (period.end - period.start).days > MAX_PERIOD_DAYS:
        raise ValidationFailed(
            f"a period is at most {MAX_PERIOD_DAYS} days", [{"field": "to", "problem": "period too long"}]
        )
    return period


def percent(rate: float | None) -> str:
    """A rate as people read it: ``82.5%``, or ``—`` when there was nothing to divide by."""
    return "—" if rate is None else f"{rate * 100:.1f}%"


def _rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def department_rates(session, period: Period) -> list[dict]:
    """Per department with a referral in the period: the counts and the four rates, most referrals first."""
    r, c = referral_projection.c, case_projection.c
    replied = r.replied_at.is_not(None)
    count = lambda condition: func.sum(case((condition, 1), else_=0))  # noqa: E731
    rows = session.execute(
        select(
            r.department,
            func.max(r.department_name).label("department_name"),
            func.count().label("referred"),
            count(or_(r.accepted_at.is_not(None), replied)).label("responded"),
            count(and_(replied, or_(c.last_rating.is_(None), c.last_rating != "不满意"))).label("resolved"),
            count(replied).label("replied"),
            count(and_(replied, c.last_rating.is_not(None))).label("rated"),
            count(and_(replied, c.last_rating.in_(SATISFIED))).label("satisfied"),
            count(and_(replied, r.replied_on_time.is_(True))).label("on_time"),
            count(r.returned_at.is_not(None)).label("returned"),
        )
        .join(case_projection, c.case_id == r.case_id)
        .where(r.referred_at >= period.since, r.referred_at < period.until)
        .group_by(r.department)
    ).all()
    out = [
        {
            "department": row.department,
            "department_name": row.department_name or row.department,
            "referred": row.referred,
            "responded": int(row.responded),
            "resolved": int(row.resolved),
            "replied": int(row.replied),
            "rated": int(row.rated),
            "satisfied": int(row.satisfied),
            "on_time": int(row.on_time),
            "returned": int(row.returned),
            "response_rate": _rate(row.responded, row.referred),
            "resolution_rate": _rate(row.resolved, row.referred),
            "satisfaction_rate": _rate(row.satisfied, row.rated),
            "on_time_rate": _rate(row.on_time, row.replied),
        }
        for row in rows
    ]
    return sorted(out, key=lambda d: (-d["referred"], d["department"]))


def overdue_by_department(session, now: datetime, per_department: int = 20) -> list[dict]:
    """Referrals still running past their due date, grouped by department, the most first; each
    group lists its oldest ``per_department`` referrals with their cases."""
    r, c = referral_projection.c, case_projection.c
    rows = session.execute(
        select(r.referral_id, r.department, r.department_name, r.due_at, r.case_id, c.title, c.street)
        .join(case_projection, c.case_id == r.case_id)
        .where(r.status.in_(OPEN_REFERRAL), r.due_at < now)
        .order_by(r.due_at, r.referral_id)
    ).all()
    groups: dict[str, dict] = {}
    for row in rows:
        group = groups.setdefault(
            row.department,
            {
                "department": row.department,
                "department_name": row.department_name or row.department,
                "overdue": 0,
                "referrals": [],
            },
        )
        group["overdue"] += 1
        if len(group["referrals"]) < per_department:
            group["referrals"].append(
                {
                    "referral_id": row.referral_id,
                    "case_id": row.case_id,
                    "title": row.title,
                    "street": row.street,
                    "due_at": iso(row.due_at),
                    "days_overdue": (now - row.due_at).days,
                }
            )
    return sorted(groups.values(), key=lambda g: (-g["overdue"], g["department"]))


def weekly(session, now: datetime, weeks: int = 12) -> list[dict]:
    """For each of the last ``weeks`` weeks (Monday to Sunday, the current one last): the cases
    received that week, and at the week's end (or now, for the current week) the cases open and
    the referrals overdue."""
    today = now.astimezone(CST).date()
    monday = today - timedelta(days=today.weekday())
    r, c = referral_projection.c, case_projection.c
    out = []
    for back in range(weeks - 1, -1, -1):
        start_day = monday - timedelta(weeks=back)
        start = datetime.combine(start_day, time(), CST)
        end = min(start + timedelta(weeks=1), now)
        received = session.scalar(
            select(func.count()).select_from(case_projection).where(c.received_at >= start, c.received_at < end)
        )
        still_open = session.scalar(
            select(func.count())
            .select_from(case_projection)
            .where(c.received_at < end, or_(c.closed_at.is_(None), c.closed_at >= end))
        )
        ended = func.coalesce(r.replied_at, r.returned_at)
        overdue = session.scalar(
            select(func.count())
            .select_from(referral_projection)
            .where(
                r.referred_at < end,
                r.due_at < end,
                r.status != "superseded",
                or_(ended.is_(None), ended > r.due_at),  # ended after it was due, or not at all
                or_(ended.is_(None), ended >= end),  # and still running at the week's end
            )
        )
        out.append({"week": start_day.isoformat(), "received": received, "open": still_open, "overdue": overdue})
    return out


def cases_by(session, column_name: str, period: Period) -> list[dict]:
    """Cases received in the period by street or by category, the most first (``None`` as "")."""
    column = case_projection.c[column_name]
    rows = session.execute(
        select(column, func.count())
        .where(case_projection.c.received_at >= period.since, case_projection.c.received_at < period.until)
        .group_by(column)
    ).all()
    return sorted(({"name": name or "", "cases": n} for name, n in rows), key=lambda d: (-d["cases"], d["name"]))


def overview(session, now: datetime, period: Period) -> dict:
    """Everything the board's first page shows, as the JSON API returns it."""
    c = case_projection.c
    in_period = and_(c.received_at >= period.since, c.received_at < period.until)
    overdue = overdue_by_department(session, now)
    return {
        "now": iso(now),
        "period": period.as_dict(),
        "cases_received": session.scalar(select(func.count()).select_from(case_projection).where(in_period)),
        "cases_open": session.scalar(select(func.count()).select_from(case_projection).where(c.closed_at.is_(None))),
        "referrals_overdue": sum(g["overdue"] for g in overdue),
        "overdue_by_department": overdue,
        "weeks": weekly(session, now),
        "by_street": cases_by(session, "street", period),
        "by_category": cases_by(session, "category", period),
    }


# --- the XLSX form -----------------------------------------------------------------------------

XLSX_COLUMNS = (
    ("department", "单位代码"),
    ("department_name", "承办单位"),
    ("referred", "交办件数"),
    ("responded", "响应件数"),
    ("response_rate", "响应率"),
    ("resolved", "解决件数"),
    ("resolution_rate", "解决率"),
    ("rated", "评价件数"),
    ("satisfied", "满意件数"),
    ("satisfaction_rate", "满意率"),
    ("replied", "答复件数"),
    ("on_time", "按期办结件数"),
    ("on_time_rate", "按期办结率"),
    ("returned", "退回件数"),
)


def rates_workbook(rates: list[dict], period: Period, district: str = "龙岗区") -> bytes:
    """The rates per department as one sheet: a title row, the period, a header row, one row per
    department and a total; rates as percentages Excel can compute with."""
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font

    book = Workbook()
    sheet = book.active
    sheet.title = "办理情况"
    sheet.append([f"{district}政协群众意见建议办理情况统计表"])
    sheet.append([f"统计期间：{period.start.isoformat()} 至 {period.end.isoformat()}（按交办日期）"])
    sheet.append([title for _, title in XLSX_COLUMNS])
    for cell in sheet[1] + sheet[3]:
        cell.font = Font(bold=True)
    for row in rates:
        sheet.append([row[key] for key, _ in XLSX_COLUMNS])
    totals = {
        key: sum(row[key] for row in rates)
        for key in ("referred", "responded", "resolved", "rated", "satisfied", "replied", "on_time", "returned")
    }
    totals.update(
        department="",
        department_name="合计",
        response_rate=_rate(totals["responded"], totals["referred"]),
        resolution_rate=_rate(totals["resolved"], totals["referred"]),
        satisfaction_rate=_rate(totals["satisfied"], totals["rated"]),
        on_time_rate=_rate(totals["on_time"], totals["replied"]),
    )
    sheet.append([totals[key] for key, _ in XLSX_COLUMNS])
    rate_columns = [i for i, (key, _) in enumerate(XLSX_COLUMNS, start=1) if key in RATES]
    for row in sheet.iter_rows(min_row=4):
        for index in rate_columns:
            row[index - 1].number_format = "0.0%"
    for index, (key, title) in enumerate(XLSX_COLUMNS, start=1):
        sheet.column_dimensions[sheet.cell(row=3, column=index).column_letter].width = (
            28 if key == "department_name" else 12
        )
        sheet.cell(row=3, column=index).alignment = Alignment(horizontal="center", wrap_text=True)
    sheet.freeze_panes = "C4"
    out = BytesIO()
    book.save(out)
    return out.getvalue()
