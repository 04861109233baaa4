-- Which machine (kernel boot and PID namespace) the lease holder runs on, beside its host name.
-- A holder is judged dead from the local /proc only when host AND machine match the contender's;
-- two machines configured with the same MONITOR_HOST_ID no longer take each other's lease at once.
-- NULL (a holder from before this migration, or a machine without an identity): never provably dead.
ALTER TABLE monitor_lease ADD COLUMN holder_machine text;
