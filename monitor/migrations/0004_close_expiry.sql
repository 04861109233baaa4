-- The expiresAfter of the close order a row's claim is for: a settler never looks the cloid up before
-- the order can no longer land (close_started_at is taken before the claim commits, so it cannot say).
ALTER TABLE positions ADD COLUMN close_expires_at timestamptz;
