-- Core schema: watched accounts, positions, and the run lease used for locking and fencing.
CREATE TABLE accounts (
    id          bigserial PRIMARY KEY,
    address     text NOT NULL UNIQUE CHECK (address ~ '^0x[0-9a-f]{40}$'),
    label       text,
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE positions (
    id                  bigserial PRIMARY KEY,
    account_id          bigint NOT NULL REFERENCES accounts (id),
    coin                text NOT NULL,
    side                text NOT NULL CHECK (side IN ('long', 'short')),
    size                numeric NOT NULL CHECK (size > 0),
    entry_price         numeric,
    status              text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closing', 'closed')),
    opened_at           timestamptz NOT NULL DEFAULT now(),
    closed_at           timestamptz,
    exit_price          numeric,
    realized_pnl        numeric,
    fees                numeric,
    close_reason        text,
    source              text NOT NULL DEFAULT 'platform',
    stop_loss_price     numeric,
    take_profit_price   numeric,
    close_requested_at  timestamptz,
    last_seen_at        timestamptz,
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT positions_closed_has_time CHECK ((status = 'closed') = (closed_at IS NOT NULL))
);

-- At most one row per (account, coin) that is not closed: covers 'open' and 'closing' alike.
CREATE UNIQUE INDEX positions_one_open_per_coin ON positions (account_id, coin) WHERE closed_at IS NULL;
CREATE INDEX positions_account_status ON positions (account_id, status);

-- One row per lock name. epoch only ever grows; each new holder advances it, and every write
-- transaction of a run checks that the epoch is still its own (fencing).
CREATE TABLE monitor_lease (
    name            text PRIMARY KEY,
    epoch           bigint NOT NULL DEFAULT 0,
    holder_run_id   text,
    holder_host     text,
    holder_pid      integer,
    holder_start    text,
    acquired_at     timestamptz,
    heartbeat_at    timestamptz,
    expires_at      timestamptz,
    released_at     timestamptz
);
