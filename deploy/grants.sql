-- Least-privilege grants for the PostgreSQL role that `position-monitor run` connects as.
--
-- A run reads the accounts and the schema version; inserts and updates positions; appends
-- position_events (the audit trail); takes, heartbeats and releases the lease row in monitor_lease
-- (its fenced writes hold that row FOR SHARE, which PostgreSQL allows only with UPDATE); and records
-- run history, per-account read health and alert state. `accounts add|disable` insert and update
-- accounts. The role owns nothing and gets no CREATE, ALTER, DROP, TRUNCATE or DELETE anywhere
-- (nothing is ever deleted: idle alert rows are marked, not removed): migrations (`position-monitor db migrate`) run as the schema owner,
-- never as this role.
--
-- Run it as the owner of the monitor's tables (or a superuser), in the monitor's database, after
-- `db migrate`, with the role created first:
--
--   CREATE ROLE position_monitor LOGIN PASSWORD '...';
--   psql "$OWNER_URL" -v ON_ERROR_STOP=1 -v monitor_role=position_monitor -f deploy/grants.sql
--
-- The role needs CONNECT on the database, which PUBLIC has by default; if you revoked it, also run
--   GRANT CONNECT ON DATABASE <your database> TO position_monitor;
-- Re-run this file after a release whose migrations add tables. tests/test_security.py executes this
-- very file (with :"monitor_role" replaced by a fresh role), runs the monitor as that role, and checks
-- that every table of the migrated schema is named here.

GRANT USAGE ON SCHEMA public TO :"monitor_role";

-- Read-only: the schema version the monitor checks before every run.
GRANT SELECT ON TABLE schema_migrations TO :"monitor_role";

-- Read and write, never delete.
GRANT SELECT, INSERT, UPDATE ON TABLE
    accounts,
    positions,
    position_events,
    monitor_lease,
    monitor_runs,
    account_health,
    monitor_alerts
TO :"monitor_role";

-- Per-account claims (migration 0006): claimed, checked and released by every run. A write holds its
-- account's claim row FOR SHARE, which PostgreSQL allows only with UPDATE. Released, never deleted.
GRANT SELECT, INSERT, UPDATE ON TABLE account_claims TO :"monitor_role";
-- positions gained funding and net_pnl in migration 0009: columns are covered by the table grant above.
-- The exchange cache (migration 0008): userRole answers and meta, with an expiry; dropped by UPDATE.
GRANT SELECT, INSERT, UPDATE ON TABLE key_roles, exchange_meta TO :"monitor_role";

-- nextval() for the bigserial ids the monitor inserts.
GRANT USAGE ON SEQUENCE
    accounts_id_seq,
    positions_id_seq,
    position_events_id_seq
TO :"monitor_role";

-- Durable follow-ups (migration 0007): read, recorded with a close, marked done or moot; never deleted.
GRANT SELECT, INSERT, UPDATE ON TABLE followups TO :"monitor_role";
GRANT USAGE ON SEQUENCE followups_id_seq TO :"monitor_role";

-- Hedge groups (migration 0011): `hedge` commands create, change and disable groups, legs and external legs
-- (removed legs are marked, never deleted); each run appends its verdicts to hedge_results.
GRANT SELECT, INSERT, UPDATE ON TABLE hedge_groups, hedge_legs, hedge_external_legs, hedge_results
TO :"monitor_role";
GRANT USAGE ON SEQUENCE hedge_groups_id_seq, hedge_legs_id_seq, hedge_external_legs_id_seq, hedge_results_id_seq
TO :"monitor_role";
-- The accounts' audit trail (migration 0012): appended by `accounts add|disable|set`, read by
-- `accounts history`; never updated or deleted.
GRANT SELECT, INSERT ON TABLE account_events TO :"monitor_role";
GRANT USAGE ON SEQUENCE account_events_id_seq TO :"monitor_role";
