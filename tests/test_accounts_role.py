"""Issue 12, item 3: ``accounts add`` asks the exchange who the address is (userRole, reference §2.11) before
watching it: an agent (API) wallet is refused naming its master, a sub-account or vault is labelled as such, and an
exchange that cannot answer does not stop the add (a one-line warning). Real CLI, real PostgreSQL, the simulator."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
from eth_account import Account as EthAccount

from tests.conftest import ALICE, cli

SUB = "0x" + "5b" * 20
VAULT = "0x31ca8395cf837de08b24da3f660e77761dfb974b"  # the HLP child of the recording userRole_vault.json
VAULT_RECORDED = {"role": "vault"}  # that recording's answer (hyperliquid-python-sdk cassette test_user_role)


def listed(env):
    result = cli(env, "accounts", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {a["address"]: a for a in json.loads(result.stdout)}


def user_roles(sim):
    return [r for r in sim.requests_log() if r.get("type") == "userRole"]


def test_an_agent_wallet_is_refused_naming_its_master(env, sim):
    agent = EthAccount.create().address
    sim.approve_agent(ALICE, agent)
    result = cli(env, "accounts", "add", agent)
    assert result.returncode == 2, (result.stdout, result.stderr)
    [line] = result.stderr.strip().splitlines()
    assert agent.lower() in line and ALICE in line and "agent" in line and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert listed(env) == {}  # nothing written


def test_a_vault_is_added_and_labelled_as_such(env, sim):
    sim.add_vault(VAULT)
    sim.reset_log()
    result = cli(env, "accounts", "add", VAULT)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "(vault)" in result.stdout
    assert listed(env)[VAULT]["label"] == "vault"
    assert len(user_roles(sim)) == 1 and user_roles(sim)[0]["user"] == VAULT
    # the simulator answers as the recording did
    request = urllib.request.Request(sim.url + "/info", data=json.dumps({"type": "userRole", "user": VAULT}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read()) == VAULT_RECORDED
    # a label of one's own keeps the role beside it
    other = "0x" + "7a" * 20
    sim.add_vault(other)
    assert cli(env, "accounts", "add", other, "--label", "hlp child").returncode == 0
    assert listed(env)[other]["label"] == "hlp child (vault)"


def test_a_sub_account_is_added_and_labelled_with_its_master(env, sim):
    sim.add_sub_account(ALICE, SUB)
    result = cli(env, "accounts", "add", SUB)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert listed(env)[SUB]["label"] == f"sub-account of {ALICE}"
    # re-adding without a label keeps the label it has
    assert cli(env, "accounts", "add", SUB).returncode == 0
    assert listed(env)[SUB]["label"] == f"sub-account of {ALICE}"


def test_an_ordinary_account_is_added_as_before(env, sim):
    sim.add_account(ALICE)
    result = cli(env, "accounts", "add", ALICE, "--label", "main")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip() == f"added: {ALICE} (main)"
    assert listed(env)[ALICE]["label"] == "main"


@pytest.mark.parametrize("fault", [{"kind": "500"}, {"kind": "429"}, {"kind": "hang", "seconds": 5}])
def test_an_exchange_that_cannot_answer_does_not_stop_the_add(env, sim, fault):
    kind = fault.pop("kind")
    sim.add_fault(kind, path="info", type="userRole", count=None, **fault)
    result = cli(dict(env, MONITOR_HTTP_TIMEOUT="1"), "accounts", "add", ALICE)
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("position-monitor: warning:") and ALICE in line and "Traceback" not in line
    assert result.stdout.strip() == f"added: {ALICE}"
    assert ALICE in listed(env)


def test_an_unreachable_exchange_does_not_stop_the_add(env):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = cli(dict(env, MONITOR_HL_API_URL=f"http://127.0.0.1:{port}"), "accounts", "add", ALICE)
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "warning" in line and "connection failed" in line
    assert ALICE in listed(env)
