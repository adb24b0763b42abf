"""API keys for ticketing systems (also their Open311 ``api_key``), departments and staff.

A key is printed once when issued; only its SHA-256 is stored. Keys are 256 random bits, so a
fast hash is enough (there is nothing to brute-force as with passwords).
"""

import hashlib
import secrets

from sqlalchemy import insert, select

from services.common.http import ValidationFailed
from services.common.timeutil import now
from services.intake.models import credentials

ROLES = ("source", "department", "staff")


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def issue(session, role: str, subject: str) -> dict:
    if role not in ROLES:
        raise ValidationFailed(
            f"role must be one of {', '.join(ROLES)}", [{"field": "role", "problem": "unknown role"}]
        )
    subject = (subject or "").strip()
    if not subject or len(subject) > 128:
        raise ValidationFailed(
            "subject must be 1 to 128 characters", [{"field": "subject", "problem": "empty or too long"}]
        )
    key = "hy_" + secrets.token_urlsafe(32)
    session.execute(
        insert(credentials).values(
            key_hash=_hash(key), key_prefix=key[:10], role=role, subject=subject, created_at=now()
        )
    )
    return {"key": key, "role": role, "subject": subject}


def authenticate(session, key: str | None) -> dict | None:
    """The credential's ``{"role", "subject"}``, or None for a missing, unknown or revoked key."""
    if not key:
        return None
    row = session.execute(
        select(credentials.c.role, credentials.c.subject).where(
            credentials.c.key_hash == _hash(key), credentials.c.revoked_at.is_(None)
        )
    ).first()
    return {"role": row.role, "subject": row.subject} if row else None
