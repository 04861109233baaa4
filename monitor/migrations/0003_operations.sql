-- Run history, audit trail, alert state and per-account read health.
CREATE TABLE monitor_runs (
    run_id          text PRIMARY KEY,
    host            text NOT NULL,
    pid             integer NOT NULL,
    epoch           bigint,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    dry_run         boolean NOT NULL DEFAULT false,
    counts          jsonb NOT NULL DEFAULT '{}'::jsonb,
    accounts_failed integer NOT NULL DEFAULT 0,
    exit_code       integer,
    error_summary   text
);
CREATE INDEX monitor_runs_started ON monitor_runs (started_at DESC);

CREATE TABLE position_events (
    id           bigserial PRIMARY KEY,
    position_id  bigint NOT NULL REFERENCES positions (id),
    run_id       text,
    epoch        bigint,
    event        text NOT NULL,
    from_status  text,
    to_status    text,
    reason       text,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX position_events_position ON position_events (position_id, id);

CREATE TABLE account_health (
    account_id            bigint PRIMARY KEY REFERENCES accounts (id),
    last_good_read_at     timestamptz,
    last_failure_at       timestamptz,
    last_error            text,
    consecutive_failures  integer NOT NULL DEFAULT 0
);

CREATE TABLE monitor_alerts (
    key            text PRIMARY KEY,
    kind           text NOT NULL,
    streak         integer NOT NULL DEFAULT 0,
    active         boolean NOT NULL DEFAULT false,
    message        text,
    first_seen_at  timestamptz,
    last_seen_at   timestamptz,
    last_sent_at   timestamptz,
    resolved_at    timestamptz
);
