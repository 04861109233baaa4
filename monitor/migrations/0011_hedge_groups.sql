-- Hedge groups (issue 14): legs across accounts and venues that must net to zero. Public like the rest of the
-- schema: the trading app may write these tables too (above all hedge_external_legs).
--   hedge_groups: one coin; |net| above tolerance is an imbalance. Disabled, never deleted.
--   hedge_legs: the group's coin on a watched account, counted as signed size x ratio. A removed leg keeps its
--               row (removed_at set): the run's role has no DELETE.
--   hedge_external_legs: a venue the monitor does not read, its signed size as the writer last set it, and when
--               (updated_at; older than MONITOR_HEDGE_EXTERNAL_STALE makes the group unknown).
--   hedge_results: each run's (not a dry run's) verdict per group: status, net (NULL when unknown), the legs.
CREATE TABLE hedge_groups (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    coin        text NOT NULL CHECK (length(coin) BETWEEN 1 AND 64),
    tolerance   numeric NOT NULL DEFAULT 0 CHECK (tolerance >= 0),
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE hedge_legs (
    id          bigserial PRIMARY KEY,
    group_id    bigint NOT NULL REFERENCES hedge_groups (id),
    account_id  bigint NOT NULL REFERENCES accounts (id),
    ratio       numeric NOT NULL DEFAULT 1 CHECK (ratio <> 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    removed_at  timestamptz
);
CREATE UNIQUE INDEX hedge_legs_one_per_account ON hedge_legs (group_id, account_id) WHERE removed_at IS NULL;

CREATE TABLE hedge_external_legs (
    id          bigserial PRIMARY KEY,
    group_id    bigint NOT NULL REFERENCES hedge_groups (id),
    venue       text NOT NULL CHECK (length(venue) BETWEEN 1 AND 64),
    size        numeric NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    removed_at  timestamptz
);
CREATE UNIQUE INDEX hedge_external_legs_one_per_venue ON hedge_external_legs (group_id, venue)
    WHERE removed_at IS NULL;

CREATE TABLE hedge_results (
    id           bigserial PRIMARY KEY,
    run_id       text NOT NULL,
    epoch        bigint,
    group_id     bigint NOT NULL REFERENCES hedge_groups (id),
    computed_at  timestamptz NOT NULL,
    status       text NOT NULL CHECK (status IN ('balanced', 'imbalanced', 'unknown')),
    net          numeric,
    tolerance    numeric NOT NULL,
    legs         jsonb NOT NULL DEFAULT '[]'::jsonb,
    reason       text,
    CONSTRAINT hedge_results_net_known CHECK ((status = 'unknown') = (net IS NULL))
);
CREATE INDEX hedge_results_by_group ON hedge_results (group_id, id DESC);
