"""What a case submission must look like, whichever channel it came through.

The same model validates the HTTP API, Open311 (after mapping its parameters), the AMQP ticket
queue and batch-import rows, so a case means the same thing everywhere.
"""

import re
from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.http import ValidationFailed
from services.common.validation import problems

KINDS = ("proposal", "consultation_topic", "public_opinion", "referral")
SOURCE_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class CaseSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    source: str = Field(min_length=1, max_length=64, pattern=SOURCE_PATTERN)
    external_id: str = Field(min_length=1, max_length=128)
    title: str = Field(min_length=1, max_length=200)
    description: str = Field(min_length=1, max_length=10000)
    category: str | None = Field(default=None, max_length=64)
    street: str | None = Field(default=None, max_length=64)
    sector: str | None = Field(default=None, max_length=64)
    workstation: str | None = Field(default=None, max_length=64)
    kind: Literal["proposal", "consultation_topic", "public_opinion", "referral"] | None = None
    address: str | None = Field(default=None, max_length=300)
    lat: float | None = Field(default=None, ge=-90, le=90, allow_inf_nan=False)
    lon: float | None = Field(default=None, ge=-180, le=180, allow_inf_nan=False)
    residents_affected: int | None = Field(default=None, ge=0, le=100_000_000)
    reporter_name: str | None = Field(default=None, max_length=64)
    reporter_phone: str | None = Field(default=None, max_length=32)
    received_at: AwareDatetime | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _plain_text(cls, value):
        if isinstance(value, str):
            if _CONTROL.search(value):
                raise ValueError("contains control characters")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("is not valid Unicode text") from None
        return value

    @field_validator(
        "category",
        "street",
        "sector",
        "workstation",
        "address",
        "reporter_name",
        "reporter_phone",
        "kind",
        mode="before",
    )
    @classmethod
    def _blank_is_absent(cls, value):
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("reporter_phone")
    @classmethod
    def _phone(cls, value):
        if value is None:
            return None
        compact = re.sub(r"[\s()-]", "", value)
        if not re.fullmatch(r"\+?\d{5,20}", compact):
            raise ValueError("must be a phone number: digits, optionally with +, spaces or dashes")
        return compact

    @field_validator("received_at")
    @classmethod
    def _not_in_future(cls, value: datetime | None):
        from services.common.timeutil import now

        if value is not None and (value - now()).total_seconds() > 300:
            raise ValueError("is in the future")
        return value


def parse_submission(data) -> CaseSubmission:
    """Validate a submission; raise ``ValidationFailed`` naming each field and its problem."""
    if not isinstance(data, dict):
        raise ValidationFailed("a case submission is a JSON object", [{"field": None, "problem": "expected an object"}])
    try:
        return CaseSubmission.model_validate(data)
    except ValidationError as exc:
        details = problems(exc)
        fields = ", ".join(sorted({d["field"] or "body" for d in details}))
        raise ValidationFailed(f"invalid case submission: {fields}", details) from None
