"""The deployment recipes under deploy/: they parse, and they agree with the monitor's settings.

* the systemd unit and timer: read as INI, checked key by key, and by ``systemd-analyze verify``
  where that exists;
* the Kubernetes CronJob: read by a small parser for the plain YAML subset the file keeps to,
  which is checked against a real YAML parser wherever one can be found;
* the env file example: plain KEY=VALUE lines that sh and systemd read alike, naming every
  variable the monitor reads, with values the monitor accepts.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from monitor.config import ENVIRONMENT_VARIABLES, Settings, load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVICE = DEPLOY / "position-monitor.service"
TIMER = DEPLOY / "position-monitor.timer"
CRONJOB = DEPLOY / "k8s-cronjob.yaml"
ENV_EXAMPLE = DEPLOY / "position-monitor.env.example"

DEFAULTS = Settings(host_id="test")
# Documented in the env example, including settings newer than some versions of monitor.config.
DOCUMENTED = {
    "MONITOR_DATABASE_URL", "MONITOR_HL_API_URL", "MONITOR_LOCK_FILE", "MONITOR_LOCK_STALE_AFTER",
    "MONITOR_LOCK_BACKEND", "MONITOR_DATA_DIR", "MONITOR_LOG_LEVEL", "MONITOR_LOG_FORMAT", "MONITOR_CLOSE_GRACE",
    "MONITOR_REOPEN_GUARD", "MONITOR_HTTP_TIMEOUT", "MONITOR_MAX_CLOSE_FAILURES", "MONITOR_CLOSE_SLIPPAGE",
    "MONITOR_HOST_ID", "MONITOR_HL_SECRET_KEY", "MONITOR_HL_SECRET_KEY_FILE", "MONITOR_METRICS_FILE",
    "MONITOR_PING_URL", "MONITOR_ALERT_WEBHOOK", "MONITOR_ALERT_AFTER_RUNS", "MONITOR_WEIGHT_BUDGET",
    "MONITOR_READ_PARALLELISM", "MONITOR_HEDGE_EXTERNAL_STALE",
}
KNOWN = DOCUMENTED | set(ENVIRONMENT_VARIABLES)


# -- systemd --------------------------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def unit_values(path: Path, section: str, key: str) -> list[str]:
    """Every value of a key in a section, in order (systemd keys such as Environment= repeat)."""
    values, current = [], None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and line.startswith(key + "="):
            values.append(line[len(key) + 1:])
    return values


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"expected plain seconds, got {value!r}"
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_service_unit_keys() -> None:
    unit = read_unit(SERVICE)
    assert set(unit.sections()) == {"Unit", "Service"}
    service = unit["Service"]
    assert service["Type"] == "oneshot"
    assert service["ExecStart"] == "/opt/position-monitor/.venv/bin/position-monitor run"
    assert service["EnvironmentFile"] == "/etc/position-monitor/env"
    assert service["User"] == "position-monitor"
    assert service["StateDirectory"] == "position-monitor"
    assert "/var/lib/position-monitor" in service["ReadWritePaths"].split()
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes"}.items():
        assert service[key] == value, key
    assert service["SuccessExitStatus"] == "75"  # lock busy: a skipped run, not a failed unit
    environment = dict(v.split("=", 1) for v in unit_values(SERVICE, "Service", "Environment"))
    assert environment["MONITOR_DATA_DIR"] == "/var/lib/position-monitor"
    assert set(environment) <= KNOWN


def test_service_is_killed_before_the_lock_goes_stale() -> None:
    service = read_unit(SERVICE)["Service"]
    # RuntimeMaxSec= does nothing for Type=oneshot (systemd.service(5)); TimeoutStartSec= is the limit.
    assert "RuntimeMaxSec" not in service
    start, stop = seconds(service["TimeoutStartSec"]), seconds(service["TimeoutStopSec"])
    # SIGTERM at TimeoutStartSec, SIGKILL TimeoutStopSec later: dead before the stale limit...
    assert start + stop < DEFAULTS.lock_stale_after
    # ...but not before the run's own deadline, when it stops starting new accounts.
    assert start > DEFAULTS.deadline_seconds
    assert env_example()[0]["MONITOR_LOCK_STALE_AFTER"] == str(int(DEFAULTS.lock_stale_after))


def test_timer_unit_keys() -> None:
    unit = read_unit(TIMER)
    timer = unit["Timer"]
    assert timer["OnCalendar"] == "minutely"
    assert timer["Persistent"] == "true"
    assert timer["AccuracySec"] == "1s"
    assert timer["Unit"] == SERVICE.name
    assert unit["Install"]["WantedBy"] == "timers.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(SERVICE), str(TIMER)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    # The one complaint allowed: the program is not installed on this machine.
    missing = "Command /opt/position-monitor/.venv/bin/position-monitor is not executable"
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and missing not in line]
    assert not problems, "\n".join(problems)
    if result.returncode != 0:
        assert missing in result.stderr, result.stderr
    calendar = subprocess.run(["systemd-analyze", "calendar", "minutely"], capture_output=True, text=True,
                              timeout=30)
    assert calendar.returncode == 0 and "*-*-* *:*:00" in calendar.stdout, calendar.stdout + calendar.stderr


# -- Kubernetes CronJob ---------------------------------------------------------------------------

_KEY = re.compile(r"^([A-Za-z0-9_./-]+):(?: (.*))?$")


def _scalar(text: str) -> Any:
    text = text.strip()
    if text[:1] in '"[{':
        return json.loads(text)  # double-quoted strings and flow collections of them: JSON syntax
    if text[:1] == "'":
        assert text.endswith("'") and len(text) >= 2, text
        return text[1:-1].replace("''", "'")
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    assert not re.search(r"(: | #|^[&*!|>%@`])", text), f"outside the plain subset: {text!r}"
    return text


def parse_plain_yaml(text: str) -> Any:
    """Parse the block-style YAML subset the recipes keep to (no anchors, tags, multi-line scalars
    or inline comments), failing loudly on anything else, including inconsistent indentation."""
    lines: list[tuple[int, str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        assert "\t" not in raw, f"line {number}: tab"
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assert stripped != "---", f"line {number}: one document only"
        lines.append((len(raw) - len(raw.lstrip(" ")), stripped, number))
    position = 0

    def block(indent: int) -> Any:
        nonlocal position
        if lines[position][1].startswith("- ") or lines[position][1] == "-":
            return sequence(indent)
        return mapping(indent)

    def mapping(indent: int, first: str | None = None) -> dict[str, Any]:
        nonlocal position
        result: dict[str, Any] = {}
        while position < len(lines):
            level, content, number = lines[position]
            if first is not None:
                content, first = first, None
            elif level < indent:
                break
            else:
                assert level == indent, f"line {number}: indented {level}, expected {indent}"
            if content.startswith("- "):
                break
            match = _KEY.match(content)
            assert match, f"line {number}: expected `key: value`, got {content!r}"
            key, rest = match.group(1), match.group(2)
            assert key not in result, f"line {number}: duplicate key {key}"
            position += 1
            if rest is None or rest.strip() == "":
                assert position < len(lines), f"line {number}: {key} has no value"
                child_level, child, _ = lines[position]
                if child_level > indent:
                    result[key] = block(child_level)
                else:
                    assert child_level == indent and child.startswith("- "), f"line {number}: {key} has no value"
                    result[key] = sequence(indent)
            else:
                result[key] = _scalar(rest)
        return result

    def sequence(indent: int) -> list[Any]:
        nonlocal position
        result: list[Any] = []
        while position < len(lines):
            level, content, number = lines[position]
            if level < indent or not content.startswith("- "):
                break
            assert level == indent, f"line {number}: indented {level}, expected {indent}"
            item = content[2:].strip()
            if _KEY.match(item):
                result.append(mapping(indent + 2, first=item))
            else:
                position += 1
                result.append(_scalar(item))
        return result

    document = block(lines[0][0])
    assert position == len(lines), f"line {lines[position][2]}: unexpected indentation"
    return document


def cronjob() -> dict[str, Any]:
    return parse_plain_yaml(CRONJOB.read_text())


def container_env(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def check_cronjob(doc: dict[str, Any]) -> None:
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    spec = doc["spec"]
    assert spec["schedule"] == "* * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 30
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    env = container_env(doc)
    stale = float(env.get("MONITOR_LOCK_STALE_AFTER", DEFAULTS.lock_stale_after))
    # The job is killed (SIGTERM, then SIGKILL after the grace period) before the lock goes stale.
    assert job["activeDeadlineSeconds"] + pod.get("terminationGracePeriodSeconds", 30) < stale
    assert job["activeDeadlineSeconds"] > DEFAULTS.deadline_seconds
    assert env["MONITOR_LOCK_BACKEND"] == "postgres"
    for name in ("MONITOR_DATABASE_URL", "MONITOR_HL_SECRET_KEY"):
        ref = env[name]["secretKeyRef"]
        assert ref["name"] and ref["key"], name
    assert set(env) <= KNOWN, set(env) - KNOWN
    (container,) = pod["containers"]
    assert container["command"] == ["position-monitor", "run"]


def test_cronjob_subset_parser_reads_the_recipe() -> None:
    check_cronjob(cronjob())


def test_cronjob_structure_by_lines() -> None:
    """A check that needs no parser at all: even indentation, and the keys where they belong."""
    text = CRONJOB.read_text()
    for number, line in enumerate(text.splitlines(), 1):
        assert "\t" not in line and line == line.rstrip(), f"line {number}: tab or trailing space"
        if line.strip() and not line.lstrip().startswith("#"):
            assert (len(line) - len(line.lstrip(" "))) % 2 == 0, f"line {number}: odd indentation"
    for needle in ("apiVersion: batch/v1", "kind: CronJob", '  schedule: "* * * * *"', "  concurrencyPolicy: Forbid",
                   "  startingDeadlineSeconds: 30", "      backoffLimit: 0", "          restartPolicy: Never",
                   "                      key: database-url", "                      key: hl-secret-key"):
        assert re.search("^" + re.escape(needle) + "$", text, re.M), needle


def test_subset_parser_rejects_what_it_does_not_understand() -> None:
    for bad in ("a: 1\n   b: 2\n", "a:\n  - x\n   - y\n", "a: &anchor 1\n", "a: b: c\n", "a: 1\na: 2\n",
                "a: x # comment\n"):
        with pytest.raises(AssertionError):
            parse_plain_yaml(bad)
    assert parse_plain_yaml("a:\n- 1\n- b: 'x'\n  c: \"y\"\nd: {}\n") == {"a": [1, {"b": "x", "c": "y"}], "d": {}}


def test_cronjob_with_pyyaml() -> None:
    import yaml  # the test extra has it: this test runs on a fresh clone

    doc = yaml.safe_load(CRONJOB.read_text())
    check_cronjob(doc)
    assert doc == cronjob()


def test_cronjob_subset_parser_agrees_with_a_real_yaml_parser() -> None:
    """PyYAML is in the test extra (the interpreter running the tests has it); any other Python is a fallback."""
    script = "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin.read())))"
    candidates = [sys.executable, shutil.which("python3"), "/usr/bin/python3"]
    for python in dict.fromkeys(c for c in candidates if c):
        try:
            result = subprocess.run([python, "-c", script], input=CRONJOB.read_text(), capture_output=True,
                                    text=True, timeout=30)
        except OSError:
            continue
        if result.returncode == 0:
            assert json.loads(result.stdout) == cronjob()
            return
    pytest.skip("no Python with PyYAML on this machine")


# -- env file example -----------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^(#)?([A-Z][A-Z0-9_]*)=(.*)$")
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_@%+=:,./~-]*$")  # the same under sh and systemd


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active settings, commented-out example settings)."""
    active: dict[str, str] = {}
    examples: dict[str, str] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = _ASSIGNMENT.match(line)
        if match is None:
            assert line.startswith("#"), f"line {number}: neither a comment, blank, nor KEY=VALUE: {line!r}"
            continue
        commented, name, value = match.groups()
        assert _SAFE_VALUE.match(value), f"line {number}: {name} needs quoting; keep values plain"
        target = examples if commented else active
        assert name not in active and name not in examples, f"line {number}: {name} twice"
        target[name] = value
    return active, examples


def test_env_example_lines_are_comments_blank_or_assignments() -> None:
    active, examples = env_example()
    assert set(active) | set(examples) <= KNOWN
    assert "MONITOR_HL_SECRET_KEY" not in active  # the file is recommended over the key


def test_env_example_names_every_variable_the_monitor_reads() -> None:
    active, examples = env_example()
    named = set(active) | set(examples)
    assert set(ENVIRONMENT_VARIABLES) <= named, set(ENVIRONMENT_VARIABLES) - named
    assert named >= DOCUMENTED, DOCUMENTED - named
    text = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(text):  # each setting has a comment just above it
        if _ASSIGNMENT.match(line):
            assert index and text[index - 1].startswith("#"), f"line {index + 1}: no comment above"


def test_env_example_values_are_accepted_by_the_monitor() -> None:
    active, examples = env_example()
    environ = {**examples, **active}
    environ.pop("MONITOR_HL_SECRET_KEY_FILE")  # names a file on the target machine
    settings = load_settings(environ=environ)
    assert settings.lock_stale_after == 300 and settings.data_dir == Path("/var/lib/position-monitor")
    assert settings.database_url and settings.database_url.startswith("postgresql://")
    defaults = Settings(host_id=settings.host_id, data_dir=settings.data_dir)
    # The commented-out settings show the defaults they claim to.
    for name, field in (("MONITOR_LOG_LEVEL", "log_level"), ("MONITOR_LOCK_BACKEND", "lock_backend"),
                        ("MONITOR_CLOSE_GRACE", "close_grace_seconds"), ("MONITOR_HTTP_TIMEOUT", "http_timeout"),
                        ("MONITOR_MAX_CLOSE_FAILURES", "max_close_failures"),
                        ("MONITOR_ALERT_AFTER_RUNS", "alert_after_runs"), ("MONITOR_HL_API_URL", "hl_api_url"),
                        ("MONITOR_CLOSE_SLIPPAGE", "close_slippage"), ("MONITOR_LOG_FORMAT", "log_format"),
                        ("MONITOR_REOPEN_GUARD", "reopen_guard_seconds")):
        assert getattr(settings, field) == getattr(defaults, field), name


def test_env_example_reads_the_same_with_env_file() -> None:
    """The cron recipe passes the file to `--env-file`: it must see what systemd's EnvironmentFile sees."""
    from monitor.config import read_env_file

    seen = {k: v for k, v in read_env_file(str(ENV_EXAMPLE)).items() if k.startswith("MONITOR_")}
    assert seen == env_example()[0]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_env_example_reads_the_same_under_sh() -> None:
    """Operators who still `set -a; . /etc/position-monitor/env` in a shell must see the same values."""
    result = subprocess.run(["sh", "-c", 'set -a; . "$1"; env -0', "sh", str(ENV_EXAMPLE)], capture_output=True,
                            text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    seen = dict(item.split("=", 1) for item in result.stdout.split("\0") if item.startswith("MONITOR_"))
    assert seen == env_example()[0]
