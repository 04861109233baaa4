"""Found in review: the row's own close is beyond the 10,000-fill history and a new same-side position opened
since: the old row's take profit closed the NEW position on the exchange. Now the row is closed (no figures
to be had), the new position adopted, and nothing is sent."""

import psycopg

from tests.conftest import ALICE, cli, run_json


def test_old_rule_closes_new_position_past_history(keyed, sim, database_url):
    sim.open_position(ALICE, "ETH", "1", "2000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE positions SET take_profit_price = 2100 WHERE coin = 'ETH' AND closed_at IS NULL")
    sim.close_external(ALICE, "ETH", "2000")          # the row's own position ends ...
    sim.open_position(ALICE, "SOL", "1", "20")
    for n in range(10_500):                           # ... and drops out of the 10,000-fill history
        sim.resize(ALICE, "SOL", "2" if n % 2 == 0 else "1", "20")
    sim.open_position(ALICE, "ETH", "1", "2000")      # a NEW position, same size and entry
    sim.set_mid("ETH", "2150")                        # the old row's take profit would fire
    report = run_json(keyed)
    sent = [a for a in report["actions"] if a["type"] == "close_sent"]
    assert sent == [], sent
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT status, metadata, take_profit_price FROM positions WHERE coin = 'ETH'"
                            " ORDER BY id").fetchall()
    (old_status, old_meta, _), (new_status, new_meta, new_tp) = rows
    assert old_status == "closed" and old_meta["unexplained"] is True and old_meta["fills_truncated"] is True
    assert new_status == "open" and new_tp is None and "reopened_after" in new_meta
