"""scripts/bench.py at toy sizes: it runs the real CLI end to end, prints its table and targets, exits 0."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_script_smoke(pg_server_url, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--accounts", "2,3", "--positions", "2",
         "--sql-check-positions", "1", "--runs", "1", "--latency-ms", "0", "--database-url", pg_server_url,
         "--json-out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "== Targets" in result.stdout and "wall s (median)" in result.stdout, result.stdout[-2000:]
    figures = json.loads(out.read_text())
    by_name = {(s["accounts"], s["positions"], s["scenario"]): s for s in figures["scenarios"]}
    assert {(2, 2, "cold start"), (3, 2, "steady"), (3, 2, "naive steady"), (3, 1, "steady"),
            (0, 0, "no-op")} <= set(by_name)
    assert by_name[(3, 2, "cold start")]["runs"][0]["cli_report"]["discovered"] == 6
    assert by_name[(3, 2, "steady")]["requests"] == 3  # one clearinghouseState per account, from the simulator log
    assert by_name[(3, 2, "naive steady")]["requests"] == 5  # + meta and spotMeta
    # The HIP-3 scenario (at the size nearest --hip3-at): two HIP-3 dexes listed, a position on one for every
    # other account; all dexes fit the budget, so each account's three dexes are read (2 weight each).
    hip3 = by_name[(3, 2, "steady +HIP-3 dex")]
    assert by_name[(3, 2, "cold start +HIP-3 dex")]["runs"][0]["cli_report"]["discovered"] == 6 + 2
    assert hip3["requests"] == 9 and hip3["api_weight"] == 18 and hip3["weight_per_account_read"] == 6
    assert "with a HIP-3 dex in use 6.00 weight per account read (+4.00)" in result.stdout
    assert all(s["peak_rss_mb"] and s["peak_rss_mb"] > 5 for s in figures["scenarios"])
    assert {t["result"] for t in figures["targets"]} <= {"PASS", "FAIL", "n/a"}
