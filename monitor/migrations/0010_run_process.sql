-- Which process a run is (its kernel start time) and on which machine, beside host and pid: a run row left
-- unfinished by a process that is provably gone (same host and machine, pid dead or reused) is marked
-- crashed by the next run, and `status` never shows it running. NULL (rows from before this migration):
-- never provably gone.
ALTER TABLE monitor_runs ADD COLUMN process_start bigint, ADD COLUMN machine text;
