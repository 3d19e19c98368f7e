"""Spend limits: an amount per UTC calendar period, and what to do when a job would exceed it.

Replicate has no balance or billing endpoint, so the limit is enforced locally against the job
store's ledger (``JobStore.reserve``): finished jobs count their computed cost, unfinished ones
their estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .store import JobStore

__all__ = ["PERIODS", "ACTIONS", "SpendLimit", "spend_summary"]

PERIODS = ("daily", "weekly", "monthly")
ACTIONS = ("warn", "block")


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if not isinstance(now, datetime):
        raise TypeError("now must be a datetime")
    if now.tzinfo is None:  # naive means UTC
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


@dataclass(frozen=True)
class SpendLimit:
    """``amount_usd`` per ``period`` (UTC calendar: daily from midnight, weekly from Monday
    00:00, monthly from the 1st); ``action`` "warn" submits anyway, "block" refuses."""

    amount_usd: float
    period: str = "monthly"
    action: str = "block"

    def __post_init__(self) -> None:
        amount = self.amount_usd
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise ValueError(f"spend limit amount_usd must be a number, got {amount!r}")
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(f"spend limit amount_usd must be a finite number >= 0, got {amount!r}")
        object.__setattr__(self, "amount_usd", float(amount))
        if self.period not in PERIODS:
            raise ValueError(f"spend limit period must be one of {', '.join(PERIODS)}, got {self.period!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"spend limit action must be one of {', '.join(ACTIONS)}, got {self.action!r}")

    def period_start(self, now: datetime | None = None) -> datetime:
        """Start (inclusive, tz-aware UTC) of the period containing ``now`` (naive = UTC)."""
        t = _utc(now)
        day = t.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "daily":
            return day
        if self.period == "weekly":
            return day - timedelta(days=day.weekday())
        return day.replace(day=1)

    def period_end(self, now: datetime | None = None) -> datetime:
        """Start of the next period: when the limit resets."""
        start = self.period_start(now)
        if self.period == "daily":
            return start + timedelta(days=1)
        if self.period == "weekly":
            return start + timedelta(days=7)
        return (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )

    def reserve_kwargs(self, now: datetime | None = None) -> dict[str, Any]:
        """Keyword arguments for ``JobStore.reserve``."""
        return {"limit_usd": self.amount_usd, "period_start": self.period_start(now), "action": self.action}

    def to_dict(self) -> dict[str, Any]:
        return {"amount_usd": self.amount_usd, "period": self.period, "action": self.action}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpendLimit:
        """Parse a settings dict; unknown keys and bad values raise ValueError. ``amount_usd``
        may be a numeric string (environment variables, text config)."""
        if not isinstance(data, Mapping):
            raise ValueError("spend limit must be a mapping")
        unknown = set(data) - {"amount_usd", "period", "action"}
        if unknown:
            raise ValueError(f"unknown spend limit field(s): {', '.join(sorted(map(str, unknown)))}")
        if "amount_usd" not in data:
            raise ValueError("spend limit needs amount_usd")
        amount = data["amount_usd"]
        if isinstance(amount, str):
            try:
                amount = float(amount.strip().lstrip("$"))
            except ValueError:
                raise ValueError(
                    f"spend limit amount_usd must be a number, got {data['amount_usd']!r}"
                ) from None
        return cls(
            amount_usd=amount, period=data.get("period", "monthly"), action=data.get("action", "block")
        )

    def describe(self) -> str:
        return f"${self.amount_usd:.2f} {self.period} ({self.action})"


def spend_summary(store: JobStore, now: datetime | None = None) -> dict[str, float]:
    """What the ledger counts in the current day, week and month (UTC), in USD."""
    now = _utc(now)
    return {
        period: round(store.spend_between(SpendLimit(1.0, period, "warn").period_start(now), now), 4)
        for period in PERIODS
    }
