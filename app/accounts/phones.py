"""Phone numbers as people write them, normalised to E.164."""

from __future__ import annotations

import functools
import re

import phonenumbers

from app.errors import Invalid

# ASCII digits, spaces and the usual punctuation; letters are refused (phonenumbers would read them as a keypad).
_WRITTEN_PHONE = re.compile(r"^\+?[0-9 ().\-]{5,32}$")


@functools.lru_cache(maxsize=4096)  # a login normalises the same phone twice (code, then token); parsing is slow
def normalise_phone(raw: str, default_region: str) -> str:
    candidate = raw.strip()
    if not _WRITTEN_PHONE.fullmatch(candidate):
        raise Invalid("not a phone number", "phone_invalid")
    try:
        number = phonenumbers.parse(candidate, default_region)
    except phonenumbers.NumberParseException as exc:
        raise Invalid("not a phone number", "phone_invalid") from exc
    if not phonenumbers.is_valid_number(number):
        raise Invalid("this phone number cannot exist", "phone_invalid")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
