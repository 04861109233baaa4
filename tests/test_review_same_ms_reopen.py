"""A close and a re-open with its own stop order in the same millisecond (one block): the close's
follow-up cancels every reduce-only/trigger order placed at or before the close's time, so the NEW
position's stop loss is cancelled."""
import psycopg

from tests.conftest import ALICE, cli, run_json


def test_new_positions_stop_placed_in_the_closing_block_survives(keyed, sim, database_url):
    sim.open_position(ALICE, "ETH", "1", "2000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    sim.advance_time(5000)
    import time as _time

    import hlsim.state as simmod
    frozen = _time.time()
    real = simmod.time.time
    simmod.time.time = lambda: frozen  # one block: the close, the re-open and its stop share a millisecond
    try:
        sim.close_external(ALICE, "ETH", "2100")
        sim.open_position(ALICE, "ETH", "2", "2100")
        new_stop = sim.add_trigger_order(ALICE, "ETH", "A", "2", "2000", "sl")
    finally:
        simmod.time.time = real
    times = {f["time"] for f in sim.fills(ALICE) if f["coin"] == "ETH"}
    placed = [o for o in sim.orders(ALICE) if o["oid"] == new_stop]
    print("fill times", times, "stop", placed)
    sim.advance_time(2000)
    report = run_json(keyed)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT id, status, metadata FROM positions ORDER BY id").fetchall()
    print(rows)
    print([a for a in report["actions"] if a["type"] == "cancel_order"])
    assert new_stop in {o["oid"] for o in sim.orders(ALICE, open_only=True)}, "the new position's stop was cancelled"
