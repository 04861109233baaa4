-- Funding and net P&L of a closed position (issue 12): written at the close with its other figures, in the
-- same guarded UPDATE, so exactly once. NULL when the close has no figures, or when the account's
-- userFunding could not be read at the close (metadata.funding_unread says why): never a zero not read.
--   funding: the sum of the account's userFunding payments for the coin within the row's cycle, as the
--            exchange signs them (+ received, - paid)
--   net_pnl: realized_pnl - fees + funding (realized_pnl stays the gross closedPnl)
-- Columns of positions: covered by the table-level grants in deploy/grants.sql; no new grant needed.
ALTER TABLE positions
    ADD COLUMN funding numeric,
    ADD COLUMN net_pnl numeric;
