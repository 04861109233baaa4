-- Exchange answers that do not change from run to run, cached with an expiry so a close costs about
-- one order instead of meta (20) + userRole (60 each) every run. See README, "Scale and speed".

-- userRole answers about the configured key (address = signer) and about the accounts it acts for.
-- Answers that let the key act (agent/user for the key, subAccount of its master for an account) are
-- trusted an hour, others (refusals) ten minutes (monitor.exit_budget.REFUSAL_CACHE_TTL; comment updated
-- after release, the table is unchanged); an order or cancel refused as "not authorized" (a revoked
-- agent...) sets dropped_at.
CREATE TABLE key_roles (
    signer      text NOT NULL,
    address     text NOT NULL,
    role        text NOT NULL,
    linked      text,
    checked_at  timestamptz NOT NULL DEFAULT now(),
    dropped_at  timestamptz,
    drop_reason text,
    PRIMARY KEY (signer, address)
);

-- meta (the asset list and szDecimals) per perp dex ('' = the main dex).
CREATE TABLE exchange_meta (
    dex         text PRIMARY KEY,
    meta        jsonb NOT NULL,
    fetched_at  timestamptz NOT NULL DEFAULT now(),
    dropped_at  timestamptz
);
