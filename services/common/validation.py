"""Turning pydantic errors into messages that name the field and the problem — and never echo
the input back (it may hold a phone number)."""

from pydantic import ValidationError


def field_path(loc) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def problems(exc: ValidationError) -> list[dict]:
    """``[{"field": "reporter_phone", "problem": "..."}]``"""
    out = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        message = error["msg"].removeprefix("Value error, ")
        out.append({"field": field_path(error["loc"]) or None, "problem": message})
    return out


def one_line(exc: ValidationError) -> str:
    return "; ".join(f"{p['field']}: {p['problem']}" if p["field"] else p["problem"] for p in problems(exc))
