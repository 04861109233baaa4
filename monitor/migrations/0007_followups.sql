-- Durable follow-up work: what a close leaves to do on the exchange (cancel the reduce-only and
-- TP/SL orders the closed position left behind), recorded in the same transaction as the close and
-- retried by every later run until done (or moot), so a failed read, a failed cancel or a crash
-- between the close and the cancel cannot lose it.
CREATE TABLE followups (
    id            bigserial PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts (id),
    coin          text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('cancel_orphans')),
    -- cancel_orphans: only orders placed at or before this time (ms, the close) are cancelled; a
    -- position opened since keeps its orders.
    not_after_ms  bigint NOT NULL,
    position_id   bigint REFERENCES positions (id),
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'moot')),
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    done_at       timestamptz,
    run_id        text,
    CONSTRAINT followups_done_has_time CHECK ((status = 'pending') = (done_at IS NULL))
);

-- One pending follow-up per (account, coin, kind); a later close widens it (ON CONFLICT).
CREATE UNIQUE INDEX followups_one_pending ON followups (account_id, coin, kind) WHERE status = 'pending';
