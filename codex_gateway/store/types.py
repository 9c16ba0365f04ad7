"""Column types that keep money exact on every backend."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import DateTime, Numeric, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


def bind_money(value: Any) -> Decimal | None:
    """A money value on its way into the database: a Decimal, or None; anything else is
    refused, since a float or a string would not be exact."""
    if value is None or isinstance(value, Decimal):
        return value
    raise TypeError(f"money must be a Decimal, got {type(value).__name__}")


def decimal_text(value: Decimal) -> str:
    """A decimal's exact text with no exponent (`0.0000001`, never `1E-7`): `str`, which is
    about three times faster and writes an exponent only for a positive one (`1E+1`) or more
    than six zeros after the point, else the fixed-point form."""
    text = str(value)
    return format(value, "f") if "E" in text else text


def json_decimal(value: Any) -> str:
    """orjson's fallback for a row it writes (a usage row, a batch for PostgreSQL, a journal
    or spool line): a Decimal as its exact text; anything else it does not write itself is a
    TypeError naming its type."""
    if isinstance(value, Decimal):
        return decimal_text(value)
    raise TypeError(f"no JSON form for {type(value).__name__}")


def bind_utc(value: Any) -> datetime | None:
    """A timestamp on its way into the database, in UTC; one without a zone is refused."""
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise TypeError("timestamps must be timezone-aware datetimes")
    return value.astimezone(UTC)


class Money(TypeDecorator[Decimal]):
    """NUMERIC on PostgreSQL; a decimal string on SQLite, whose NUMERIC would round to float."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(80))
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        money = bind_money(value)
        if money is not None and dialect.name == "sqlite":
            return decimal_text(money)
        return money

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return Decimal(str(value)) if not isinstance(value, Decimal) else value


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and read back as UTC-aware on every backend.

    SQLite keeps no time zone, so values read from it get UTC attached again.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return bind_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
