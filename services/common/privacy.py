"""Personal data: phone numbers are stored but shown masked (138****1234) wherever not needed."""

import re

_PHONE_LIKE = re.compile(r"(?<!\d)(\+?86[- ]?)?(1[3-9]\d)[- ]?(\d{4})[- ]?(\d{4})(?!\d)")


def mask_phone(phone: str | None) -> str | None:
    if not phone:
        return phone
    digits = re.sub(r"\D", "", phone)
    if len(digits) < 7:
        return "*" * len(digits)
    return f"{digits[:3]}****{digits[-4:]}"


def mask_phones_in_text(text: str) -> str:
    """Mask mainland mobile numbers that appear inside free text (titles, descriptions, logs)."""
    return _PHONE_LIKE.sub(lambda m: f"{m.group(2)}****{m.group(4)}", text)
