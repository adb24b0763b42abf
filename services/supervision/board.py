"""The supervision board's presentation: server-rendered pages (Jinja2), in Chinese with English
available, behind a staff login, with charts drawn as inline SVG — nothing is fetched from the
internet, and there is no JavaScript. The figures come from reports.py, the same functions the
JSON API answers with, so a page and the API cannot disagree.

Logging in: a staff member pastes their staff API key (``huiying credentials create --staff``);
the board keeps it in a signed, expiring, HttpOnly cookie and checks it against intake like any
API key (so a revoked key stops working within the key cache's minute).
"""

import logging
from functools import cache
from pathlib import Path
from urllib.parse import urlencode

from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, FileSystemLoader, select_autoescape
from werkzeug.wrappers import Response

from services.common.http import ApiError
from services.supervision import reports

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "huiying_board"
LANGUAGE_COOKIE = "huiying_lang"
SESSION_SECONDS = 8 * 3600  # a working day
LANGUAGES = ("zh", "en")

# The board's words. A key missing from English falls back to Chinese.
MESSAGES = {
    "zh": {
        "board": "回应 · 民主监督看板",
        "overview": "总览",
        "agenda": "民主监督议题",
        "departments": "承办单位办理情况",
        "login": "登录",
        "logout": "退出",
        "staff_key": "工作人员 API 密钥",
        "login_hint": "请输入政协工作人员的 API 密钥（由 huiying credentials create --staff 生成）。",
        "period": "统计期间",
        "from": "从",
        "to": "至",
        "show": "查看",
        "cases_received": "期间收到",
        "cases_open": "未办结",
        "referrals_overdue": "超期交办",
        "weekly": "每周未办结与超期",
        "open": "未办结",
        "overdue": "超期",
        "received": "收到",
        "by_street": "各街道案件数",
        "by_category": "各类别案件数",
        "overdue_by_department": "各单位超期交办",
        "department": "承办单位",
        "case": "案件",
        "title": "标题",
        "street": "街道",
        "due": "办理期限",
        "days_overdue": "超期天数",
        "none": "暂无",
        "referred": "交办",
        "response_rate": "响应率",
        "resolution_rate": "解决率",
        "satisfaction_rate": "满意率",
        "on_time_rate": "按期办结率",
        "export_xlsx": "导出 Excel",
        "rates_note": "按交办日期统计。响应率＝签收或答复÷交办；解决率＝已答复且未被评为不满意÷交办；"
        "满意率＝满意与基本满意÷已评价；按期办结率＝按期答复÷已答复。",
        "item": "议题",
        "kind": "类型",
        "status": "状态",
        "rule": "触发规则",
        "cases": "关联案件",
        "created": "立项时间",
        "timeline": "全过程记录",
        "referrals": "交办",
        "escalations": "升级",
        "at": "时间",
        "event": "事项",
        "details": "详情",
        "lead": "主办",
        "round": "轮次",
        "language": "English",
        "error": "出错了",
        "back": "返回",
        "kind_agenda": "民主监督议题",
        "kind_joint_supervision": "联合督查督办",
        "kind_special_inspection": "专项视察监督",
    },
    "en": {
        "board": "Huiying · democratic supervision board",
        "overview": "Overview",
        "agenda": "Supervision agenda",
        "departments": "Departments",
        "login": "Log in",
        "logout": "Log out",
        "staff_key": "Staff API key",
        "login_hint": "Paste a committee staff API key (made by huiying credentials create --staff).",
        "period": "Period",
        "from": "from",
        "to": "to",
        "show": "Show",
        "cases_received": "Received in period",
        "cases_open": "Open",
        "referrals_overdue": "Overdue referrals",
        "weekly": "Open and overdue per week",
        "open": "open",
        "overdue": "overdue",
        "received": "received",
        "by_street": "Cases by street",
        "by_category": "Cases by category",
        "overdue_by_department": "Overdue referrals by department",
        "department": "Department",
        "case": "Case",
        "title": "Title",
        "street": "Street",
        "due": "Due",
        "days_overdue": "Days overdue",
        "none": "None",
        "referred": "Referred",
        "response_rate": "Response",
        "resolution_rate": "Resolution",
        "satisfaction_rate": "Satisfaction",
        "on_time_rate": "On time",
        "export_xlsx": "Export XLSX",
        "rates_note": "By the day of referral. Response = accepted or replied ÷ referred; resolution = replied and "
        "not rated unsatisfied ÷ referred; satisfaction = satisfied or basically satisfied ÷ rated; "
        "on time = replied by the due date ÷ replied.",
        "item": "Item",
        "kind": "Kind",
        "status": "Status",
        "rule": "Rule",
        "cases": "Cases",
        "created": "Created",
        "timeline": "Whole-process record",
        "referrals": "Referrals",
        "escalations": "Escalations",
        "at": "At",
        "event": "Event",
        "details": "Details",
        "lead": "lead",
        "round": "Round",
        "language": "中文",
        "error": "Something went wrong",
        "back": "Back",
        "kind_agenda": "Supervision agenda item",
        "kind_joint_supervision": "Joint supervision",
        "kind_special_inspection": "Special inspection",
    },
}

# Status and event codes as people say them; a code without a name here is shown as it is.
LABELS = {
    "zh": {
        "received": "已受理",
        "referred": "已交办",
        "accepted": "已签收",
        "returned": "已退回",
        "replied": "已答复",
        "superseded": "已改派",
        "triage": "待分办",
        "reopened": "重办中",
        "closed": "已办结",
        "proposed": "拟立项",
        "scheduled": "已排期",
        "under_supervision": "督办中",
        "concluded": "已办结",
        "case_received": "收到",
        "case_referred": "交办",
        "case_needs_triage": "待人工分办",
        "referral_accepted": "签收",
        "referral_returned": "退回",
        "referral_replied": "答复",
        "extension_requested": "申请延期",
        "extension_granted": "同意延期",
        "extension_refused": "不同意延期",
        "feedback_received": "评价",
        "case_reopened": "重办",
        "case_closed": "办结",
        "case_escalated": "升级督办",
        "supervisors_alerted": "通报特约监督员",
        "remind_department": "催办",
        "add_to_agenda": "纳入议题库",
        "open_joint_supervision": "联合督查督办",
        "trigger_special_inspection": "专项视察监督",
        "alert_supervisors": "通报特约监督员",
    },
    "en": {},
}


def label(lang: str, code) -> str:
    return LABELS[lang].get(code) or code or ""


_environment = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), trim_blocks=True
)


def language(request) -> str:
    wanted = request.args.get("lang") or request.cookies.get(LANGUAGE_COOKIE)
    return wanted if wanted in LANGUAGES else "zh"


def translator(lang: str):
    return lambda key: MESSAGES[lang].get(key) or MESSAGES["zh"].get(key, key)


def render(request, template: str, status: int = 200, **context) -> Response:
    lang = language(request)
    other = "en" if lang == "zh" else "zh"
    args = {k: v for k, v in request.args.items() if k != "lang"}
    html = _environment.get_template(template).render(
        t=translator(lang),
        lang=lang,
        other_language_url=f"{request.path}?{urlencode({**args, 'lang': other})}",
        percent=reports.percent,
        label=lambda code: label(lang, code),
        request=request,
        **context,
    )
    response = Response(html, status=status, mimetype="text/html")
    response.headers["Content-Security-Policy"] = "default-src 'self'; style-src 'self'; img-src 'self' data:"
    response.headers["Cache-Control"] = "no-store"
    if request.args.get("lang") in LANGUAGES:
        response.set_cookie(LANGUAGE_COOKIE, lang, max_age=365 * 86400, samesite="Lax", path="/board")
    return response


@cache
def _stylesheet_text() -> str:
    return (HERE / "static" / "board.css").read_text(encoding="utf-8")


def stylesheet() -> Response:
    """The board's one stylesheet, read from the package once per process."""
    return Response(_stylesheet_text(), mimetype="text/css", headers={"Cache-Control": "max-age=300"})


def redirect(location: str) -> Response:
    return Response("", status=303, headers={"Location": location})


# --- the staff session --------------------------------------------------------------------------


def _serializer(secret: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret, salt="huiying-board-session")


def session_cookie(secret: str, api_key: str) -> str:
    return _serializer(secret).dumps({"key": api_key})


def key_from_cookie(secret: str, request) -> str | None:
    """The staff key of the request's board session, or None (no cookie, tampered, or expired)."""
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        return None
    try:
        return _serializer(secret).loads(raw, max_age=SESSION_SECONDS)["key"]
    except (BadSignature, KeyError, TypeError):
        return None


def logged_in(response: Response, secret: str, api_key: str, secure: bool) -> Response:
    response.set_cookie(
        SESSION_COOKIE,
        session_cookie(secret, api_key),
        max_age=SESSION_SECONDS,
        httponly=True,
        secure=secure,
        samesite="Strict",
        path="/",
    )
    return response


def logged_out(response: Response) -> Response:
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def html_error(request, exc: Exception) -> Response:
    """Errors on board pages as a page in the reader's language (401 goes to the login form)."""
    if isinstance(exc, ApiError):
        if exc.status == 401:
            return redirect(f"/board/login?{urlencode({'next': request.full_path.rstrip('?')})}")
        return render(request, "error.html", status=exc.status, message=exc.message)
    log.error("unexpected error on %s %s: %s", request.method, request.path, type(exc).__name__, exc_info=exc)
    return render(request, "error.html", status=500, message="internal error")


def safe_next(target: str | None) -> str:
    """Where to go after logging in: only a path on the board (no open redirect)."""
    return target if target and target.startswith("/board") and not target.startswith("//") else "/board/"


# --- charts (inline SVG, drawn from the same figures as the tables) ----------------------------

CHART_WIDTH, CHART_HEIGHT = 640, 220


def grouped_bars(rows: list[dict], label: str, series: list[str]) -> dict:
    """Geometry for vertical bars, one group per row and one bar per series (weekly chart)."""
    top = max([1] + [row[s] for row in rows for s in series])
    left, bottom, plot_height = 40, CHART_HEIGHT - 30, CHART_HEIGHT - 50
    group_width = (CHART_WIDTH - left - 10) / max(1, len(rows))
    bar_width = group_width * 0.8 / len(series)
    bars, labels = [], []
    for i, row in enumerate(rows):
        x0 = left + i * group_width + group_width * 0.1
        for j, name in enumerate(series):
            height = plot_height * row[name] / top
            bars.append(
                {
                    "x": round(x0 + j * bar_width, 1),
                    "y": round(bottom - height, 1),
                    "width": round(bar_width - 1, 1),
                    "height": round(height, 1),
                    "series": j,
                    "value": row[name],
                    "name": name,
                    "label": row[label],
                }
            )
        labels.append({"x": round(x0 + group_width * 0.4, 1), "text": row[label][5:]})  # MM-DD
    ticks = [{"y": round(bottom - plot_height * k / 4, 1), "value": round(top * k / 4)} for k in range(5)]
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "bars": bars,
        "labels": labels,
        "ticks": ticks,
        "bottom": bottom,
        "left": left,
        "series": series,
    }


def horizontal_bars(rows: list[dict], labels: dict, limit: int = 12) -> dict:
    """Geometry for one horizontal bar per row (``name`` a code, ``cases``), the largest first;
    ``labels`` names the codes (the directory's street and category names)."""
    shown = rows[:limit]
    top = max([1] + [row["cases"] for row in shown])
    left, row_height, plot_width = 150, 22, CHART_WIDTH - 150 - 60
    bars = [
        {
            "y": 6 + i * row_height,
            "width": round(plot_width * row["cases"] / top, 1),
            "code": row["name"],
            "name": labels.get(row["name"], row["name"]) or "—",
            "value": row["cases"],
        }
        for i, row in enumerate(shown)
    ]
    return {
        "width": CHART_WIDTH,
        "height": 12 + len(shown) * row_height,
        "bars": bars,
        "left": left,
        "row_height": row_height,
    }
