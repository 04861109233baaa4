"""Found in review: a cycle with a fill missing inside it was closed with wrong figures (P&L 25, truth 35).
It ended (a fill took it to zero), so it is closed, but without figures, and says why."""
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

from monitor import planner
from monitor.clock import to_ms
from monitor.models import Account, AccountSnapshot, Fill, PositionRow
from monitor.planner import PlanSettings, plan_account

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
ADDRESS = "0x" + "ab" * 20
ACCOUNT = Account(id=1, address=ADDRESS, label=None, active=True)


def mk(sz, px, start, at, n, pnl):
    return Fill(coin="BTC", price=D(px), size=D(sz), side="A", time_ms=to_ms(at), start_position=D(start),
                direction="Close Long", closed_pnl=D(pnl), fee=D("0.1"), hash=f"0x{n:064x}", oid=n, tid=n)


def test_a_cycle_with_a_missing_fill_is_not_closed_with_wrong_figures():
    row = PositionRow(id=7, account_id=1, coin="BTC", side="long", size=D(2), entry_price=D(100), status="open",
                      opened_at=NOW - timedelta(hours=1), source="platform")
    fills = [mk("1", "110", "2", NOW - timedelta(minutes=10), 1, "10"),
             # missing: 1 -> 0.5 at 120 (pnl 10)
             mk("0.5", "130", "0.5", NOW - timedelta(minutes=5), 3, "15")]
    plan = plan_account(ACCOUNT, AccountSnapshot(address=ADDRESS, positions={}), [row], NOW, PlanSettings(),
                        fills=fills)
    close, = [a for a in plan.actions if a.type == planner.CLOSE]
    assert (close.exit_price, close.realized_pnl, close.fees) == (None, None, None)
    assert close.metadata["unexplained"] is True and close.metadata["fills_gap"] is True
