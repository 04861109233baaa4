-- The audit trail of account-level changes, beside position_events (which names a position): each change
-- `accounts set` makes (the account-wide max hold; `account_rules_set`, details {"column": {"old", "new"}}
-- as `positions set` writes exit_rules_set), and `accounts add` (`account_added`, `account_reactivated`)
-- and `accounts disable` (`account_disabled`), written in the same transaction as the change. From the
-- CLI, so run_id and epoch are NULL; rows are never deleted.
CREATE TABLE account_events (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    run_id      text,
    epoch       bigint,
    event       text NOT NULL,
    reason      text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX account_events_account ON account_events (account_id, id);
