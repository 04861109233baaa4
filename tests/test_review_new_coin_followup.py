"""meta is cached (1 h) by a close; a coin listed after that is traded, its position closes externally and
leaves a stop order: the follow-up's cancel builds the Trader without the coin (no meta refresh) and
name_to_asset raises KeyError, which nothing catches: the whole run crashes (later accounts unapplied)."""

import psycopg

from tests.conftest import ALICE, cli, run_json


def test_followup_cancel_for_a_coin_listed_after_meta_was_cached(keyed, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE positions SET stop_loss_price = 29000 WHERE coin = 'BTC'")
    sim.set_mid("BTC", "28000")
    first = run_json(keyed)  # the stop loss closes BTC: meta is read and cached
    assert first["close_orders_sent"] == 1
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM exchange_meta WHERE dex = ''").fetchone()[0] == 1
    sim.add_coin("NEWC", mid="5")  # listed after meta was cached
    sim.open_position(ALICE, "NEWC", "10", "5")
    run_json(keyed)  # discovered
    sim.add_trigger_order(ALICE, "NEWC", "A", "10", "4", "sl")
    sim.close_external(ALICE, "NEWC", "5.5")
    result = cli(keyed, "run", "--json")
    print(result.returncode, result.stdout[-800:], result.stderr[-1500:])
    assert result.returncode == 0, result.stderr[-600:]
    assert sim.orders(ALICE, open_only=True) == []
