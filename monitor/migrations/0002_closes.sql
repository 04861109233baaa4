-- Exit rules and exactly-once closes on the exchange.
ALTER TABLE accounts ADD COLUMN max_hold_seconds integer CHECK (max_hold_seconds > 0);

ALTER TABLE positions
    ADD COLUMN trailing_stop_pct   numeric CHECK (trailing_stop_pct > 0 AND trailing_stop_pct < 100),
    ADD COLUMN best_price          numeric,
    ADD COLUMN max_hold_seconds    integer CHECK (max_hold_seconds > 0),
    ADD COLUMN close_attempts      integer NOT NULL DEFAULT 0,
    ADD COLUMN close_cloid         text,
    ADD COLUMN close_started_at    timestamptz,
    ADD COLUMN close_error         text,
    ADD COLUMN close_rule          text;

-- A cloid names one close attempt of one row; it is never reused.
CREATE UNIQUE INDEX positions_close_cloid ON positions (close_cloid) WHERE close_cloid IS NOT NULL;
