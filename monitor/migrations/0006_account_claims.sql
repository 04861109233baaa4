-- Per-account claims: no two runs touch one account at once, whatever lock (lease name) each holds.
-- A run claims its whole account list in one statement before reading anything; a claim can be taken
-- from another run only once it is released, expired (the lock's stale limit), or its lease's epoch has
-- moved on (that run is fenced). Every write transaction for an account holds its claim row FOR SHARE
-- and checks it is still the run's own. Rows are released (released_at), never deleted.
CREATE TABLE account_claims (
    account_id   bigint PRIMARY KEY REFERENCES accounts (id),
    lease_name   text NOT NULL,
    epoch        bigint NOT NULL,
    run_id       text NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    released_at  timestamptz
);
