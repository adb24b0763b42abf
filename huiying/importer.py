"""Reading CSV and XLSX batch imports into case submissions.

Offices work in Excel, often with Chinese column headers: both English field names and the
usual Chinese headers are accepted. A row without an external id gets one derived from its
content, so re-running an interrupted import skips what was already imported.
"""

import csv
import hashlib
from pathlib import Path

COLUMN_ALIASES = {
    "external_id": ["external_id", "编号", "序号", "工单号", "外部编号"],
    "title": ["title", "标题", "主题", "问题"],
    "description": ["description", "内容", "描述", "意见建议", "建议内容", "问题描述"],
    "category": ["category", "类别", "分类"],
    "street": ["street", "街道"],
    "sector": ["sector", "界别"],
    "workstation": ["workstation", "工作站", "委员工作站"],
    "kind": ["kind", "类型"],
    "address": ["address", "地址", "地点"],
    "residents_affected": ["residents_affected", "影响人数", "涉及人数"],
    "reporter_name": ["reporter_name", "反映人", "姓名"],
    "reporter_phone": ["reporter_phone", "联系电话", "电话", "手机"],
    "received_at": ["received_at", "收到时间", "接收时间"],
}


class ImportFileError(ValueError):
    """The file as a whole cannot be read (not the per-row problems, which are reported)."""


def _field_for(header: str) -> str | None:
    header = (header or "").strip().lower()
    for field, aliases in COLUMN_ALIASES.items():
        if header in (a.lower() for a in aliases):
            return field
    return None


def _cell(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    text = str(value).strip()
    return text or None


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, list]]]:
    """Header cells and ``(spreadsheet row number, cells)`` for each non-empty row."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        try:
            with open(path, encoding="utf-8-sig", newline="") as fh:
                rows = list(csv.reader(fh))
        except UnicodeDecodeError:
            raise ImportFileError(f"{path}: not UTF-8 text; save the CSV as UTF-8 (Excel: 'CSV UTF-8')") from None
    elif suffix in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook

        try:
            workbook = load_workbook(path, read_only=True, data_only=True)
        except Exception as exc:
            raise ImportFileError(f"{path}: not a readable XLSX workbook ({type(exc).__name__})") from None
        rows = [list(r) for r in workbook.worksheets[0].iter_rows(values_only=True)]
        workbook.close()
    else:
        raise ImportFileError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv or .xlsx")
    if not rows:
        raise ImportFileError(f"{path}: the file is empty")
    header = [_cell(h) or "" for h in rows[0]]
    body = [(number, row) for number, row in enumerate(rows[1:], start=2) if any(_cell(c) for c in row)]
    return header, body


def column_map(path: Path, header: list[str]) -> dict[int, str]:
    mapping = {}
    for index, name in enumerate(header):
        field = _field_for(name)
        if field:
            mapping[index] = field
    missing = [f for f in ("title", "description") if f not in mapping.values()]
    if missing:
        raise ImportFileError(f"{path}: missing column(s) {', '.join(missing)}; header was: {', '.join(header)}")
    return mapping


def row_to_submission(cells: list, mapping: dict[int, str], source: str) -> dict:
    data = {"source": source}
    for index, field in mapping.items():
        value = _cell(cells[index]) if index < len(cells) else None
        if value is not None:
            data[field] = value
    if "external_id" not in data:
        content = "\x1f".join(str(data.get(k, "")) for k in ("title", "description", "street", "address"))
        data["external_id"] = "row-" + hashlib.sha256(content.encode()).hexdigest()[:20]
    return data
