"""Money columns take only Decimals and keep every digit on both backends."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from codex_gateway.store.types import Money, decimal_text

SQLITE = sqlite.dialect()
POSTGRESQL = postgresql.dialect()


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        # plain decimal strings, never an exponent
        (Decimal("0.1"), "0.1"),
        (Decimal("1E-18"), "0.000000000000000001"),
        (Decimal("1E+3"), "1000"),
        (Decimal("-0.114295"), "-0.114295"),
        # no value
        (None, None),
    ],
)
def test_sqlite_stores_money_as_a_plain_decimal_string(value: Any, stored: str | None) -> None:
    assert Money().process_bind_param(value, SQLITE) == stored


def test_postgresql_is_given_the_decimal_itself() -> None:
    value = Decimal("0.000000000000000001")

    assert Money().process_bind_param(value, POSTGRESQL) is value


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRESQL], ids=["sqlite", "postgresql"])
@pytest.mark.parametrize("value", [0.1, 1, "0.1"])
def test_money_that_is_not_a_decimal_is_refused(value: Any, dialect: Dialect) -> None:
    with pytest.raises(TypeError, match=f"money must be a Decimal, got {type(value).__name__}"):
        Money().process_bind_param(value, dialect)


@pytest.mark.parametrize(
    ("value", "loaded"),
    [
        # what SQLite hands back
        ("0.300000000000000001", Decimal("0.300000000000000001")),
        # what PostgreSQL hands back
        (Decimal("0.3"), Decimal("0.3")),
        # no value
        (None, None),
    ],
)
def test_money_is_read_back_as_a_decimal(value: Any, loaded: Decimal | None) -> None:
    result = Money().process_result_value(value, SQLITE)

    assert result == loaded
    assert result is None or isinstance(result, Decimal)


@pytest.mark.parametrize(
    "text",
    ["0", "-0", "0E-7", "1E-7", "-1.5E-12", "1E+3", "2.50", "123456789012345678901234.000001"],
)
def test_decimal_text_is_the_exact_fixed_point_text(text: str) -> None:
    value = Decimal(text)

    written = decimal_text(value)

    assert written == format(value, "f")
    assert "E" not in written
    assert Decimal(written) == value
