"""The command line's tables: one line a row, whatever the values hold."""

from __future__ import annotations

from decimal import Decimal

from codex_gateway.cli.context import table


def test_a_table_shows_each_row_on_one_line_with_control_characters_escaped() -> None:
    rows = [
        # a note stored before such notes were refused, and an upstream's words
        {"note": "evil\x1b[31mred\nnewline", "amount": Decimal("-0.5")},
        {"note": "usage limit reached\r", "amount": None},
    ]

    shown = table(rows, ["note", "amount"]).splitlines()

    assert shown == [
        "NOTE" + " " * 22 + "AMOUNT",
        "evil\\x1b[31mred\\nnewline  -0.5",
        "usage limit reached\\r" + " " * 5 + "-",
    ]
