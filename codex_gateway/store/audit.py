"""What `ledger verify` proves, as arithmetic over rows read in one snapshot (no I/O here).

Every user's balance and reserved amount must equal the sums of its ledger entries, the
reserved amount must also equal its open leases, every usage row of a user must have exactly
one `settle` (for its cost) or `release` (it cost nothing) entry, and every key's spending and
reservation must equal its usage rows and key leases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from codex_gateway.billing.pricing import MONEY, ZERO
from codex_gateway.store.tables import RELEASE, SETTLE

Rows = Sequence[Sequence[Any]]


@dataclass(frozen=True)
class Snapshot:
    users: Rows  # id, name, balance, reserved
    entries: Rows  # user_id, kind, amount, reserved_change, request_id
    leases: Rows  # user_id, amount
    usage: Rows  # request_id, user_id, key_id, cost_usd
    keys: Rows  # id, spent_usd, reserved_usd
    key_leases: Rows  # key_id, amount


def _money(value: Any) -> Decimal:
    return Decimal(str(value))


def _sums(rows: Rows, key: int, value: int) -> dict[Any, Decimal]:
    sums: dict[Any, Decimal] = {}
    for row in rows:
        if row[key] is not None:
            sums[row[key]] = MONEY.add(sums.get(row[key], ZERO), _money(row[value]))
    return sums


def ledger_problems(snapshot: Snapshot) -> list[str]:
    """Every discrepancy, one sentence each; empty when the books balance."""
    return [
        *_user_problems(snapshot),
        *_settlement_problems(snapshot),
        *_key_problems(snapshot),
    ]


def _user_problems(snapshot: Snapshot) -> list[str]:
    balances = _sums(snapshot.entries, 0, 2)
    reservations = _sums(snapshot.entries, 0, 3)
    leased = _sums(snapshot.leases, 0, 1)
    problems = []
    for user_id, name, balance, reserved in snapshot.users:
        from_ledger = balances.get(user_id, ZERO)
        if _money(balance) != from_ledger:
            problems.append(
                f"user {name}: balance {balance} but its ledger adds up to {from_ledger}"
            )
        held = reservations.get(user_id, ZERO)
        if _money(reserved) != held:
            problems.append(
                f"user {name}: reserved {reserved} but its ledger's holds and releases add up "
                f"to {held}"
            )
        if _money(reserved) != leased.get(user_id, ZERO) or _money(reserved) < 0:
            problems.append(
                f"user {name}: reserved {reserved} but its open leases add up to "
                f"{leased.get(user_id, ZERO)}"
            )
    return problems


def _settlement_problems(snapshot: Snapshot) -> list[str]:
    settlements: dict[str, list[tuple[str, Decimal]]] = {}
    for _user_id, kind, amount, _reserved, request_id in snapshot.entries:
        if request_id is not None and kind in (SETTLE, RELEASE):
            settlements.setdefault(request_id, []).append((kind, _money(amount)))
    problems = []
    for request_id, owner, _key_id, cost in snapshot.usage:
        found = settlements.pop(request_id, [])
        if owner is None:
            if found:
                problems.append(f"request {request_id} has no user but is settled: {found}")
            continue
        expected_kinds = {SETTLE} if _money(cost) else {SETTLE, RELEASE}
        if len(found) != 1 or found[0][0] not in expected_kinds:
            kinds = [kind for kind, _ in found]
            problems.append(
                f"request {request_id}: needs exactly one settlement, has {len(found)} {kinds}"
            )
        elif found[0][1] != _money(cost).copy_negate():
            problems.append(
                f"request {request_id}: costs {cost} but was settled for {-found[0][1]}"
            )
    problems.extend(
        f"settlement of request {request_id} has no usage row" for request_id in settlements
    )
    return problems


def _key_problems(snapshot: Snapshot) -> list[str]:
    spent = _sums(snapshot.usage, 2, 3)
    leased = _sums(snapshot.key_leases, 0, 1)
    problems = []
    for key_id, key_spent, key_reserved in snapshot.keys:
        if _money(key_spent) != spent.get(key_id, ZERO):
            problems.append(
                f"key {key_id}: spent {key_spent} but its usage rows add up to "
                f"{spent.get(key_id, ZERO)}"
            )
        if _money(key_reserved) != leased.get(key_id, ZERO):
            problems.append(
                f"key {key_id}: reserved {key_reserved} but its leases add up to "
                f"{leased.get(key_id, ZERO)}"
            )
    return problems
