from __future__ import annotations

import pytest

from app.accounts.phones import normalise_phone
from app.errors import Invalid


@pytest.mark.parametrize("written", ["+7 (916) 123-45-67", "8 916 123 45 67", "89161234567", "9161234567",
                                     "+7-916-123-45-67", " +79161234567 "])
def test_russian_formats_give_one_e164(written: str) -> None:
    assert normalise_phone(written, "RU") == "+79161234567"


def test_the_default_region_decides_national_numbers() -> None:
    assert normalise_phone("030 1234567", "DE") == "+49301234567"
    assert normalise_phone("+49 30 1234567", "RU") == "+49301234567"


@pytest.mark.parametrize("garbage", ["garbage", "123", "+7 916 CALL-ME", "8 916 123 45 6", "", "++79161234567",
                                     "+7 916 123 45 67 89", "7916\uff11\uff12\uff134567"])
def test_impossible_numbers(garbage: str) -> None:
    with pytest.raises(Invalid) as refused:
        normalise_phone(garbage, "RU")
    assert refused.value.extra["reason"] == "phone_invalid"
