-- The WAL's on-disk schema, applied at every open (idempotent). The one
-- copy: engine.rs loads it with include_str! and the module doc of
-- actors/src/wal/mod.rs includes it.
--
-- records: every stored record. seq is assigned by the writer, strictly
--   increasing, never reused (meta.seq_floor keeps it above compacted ones);
--   idem_key is "{device_id}:{msg_id}" or a payload hash (dedup);
--   receive_ms is the gateway receive time (epoch ms); body is the canonical
--   record JSON without "v" and "seq" (spliced in on read); class is its
--   priority class (0 high, 1 normal, 2 low) and sinks the set of sinks it
--   goes to (bit sinks.bit per sink; NULL every sink), both decided once
--   when it was stored. records_prio finds high and low records in seq order
--   without reading the normal ones.
-- idem: the dedup index. An idempotency key's latest seq, for the records
--   up to meta.idem_upto. The keys of newer records live in the writer's
--   memory (as hashes) and are merged here in sorted bulk, every 57,344
--   records or when appends pause: one page write per leaf page a merge
--   touches, not one per record (an index on records.idem_key wrote ~1 page
--   per record). At open they are read back from records. A deleted
--   record's row stays until a sweep (idem.rs) passes over the table in key
--   order and deletes the rows whose record is gone, once meta.idem_stale
--   records were deleted since the last one; a lookup checks the record.
-- sinks: every seq <= cursor is finished (acked or dead) for the sink; bit
--   is the sink's bit in records.sinks (0..62, kept for the sink's life).
-- sink_done: finished ranges above the cursor (out-of-order completions).
-- sink_forced: ranges reopened by requeue or replay, delivered to the sink
--   whatever its route says (rows at or below the cursor are stale).
-- sink_reduce: a sink's report-by-exception state (actors/src/reduce.rs), one
--   JSON row per device (device '' holds the settings it was kept under),
--   written in the same transaction as the acknowledgements it goes with.
-- dead: dead letters, kept until requeued or purged.
-- meta: schema_version, seq_floor (highest compacted seq), idem_upto (idem
--   holds the keys of every record up to this seq), idem_stale (records
--   deleted since the last sweep of idem started), and per sink
--   and class the TTL mark 'ttl/SINK/CLASS' (records at or below it were
--   judged by the TTL already: requeued expired records do not expire again).
CREATE TABLE IF NOT EXISTS records(
    seq INTEGER PRIMARY KEY,
    idem_key TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    receive_ms INTEGER NOT NULL,
    body TEXT NOT NULL,
    class INTEGER NOT NULL DEFAULT 1,
    sinks INTEGER
);
CREATE INDEX IF NOT EXISTS records_prio ON records(class, seq) WHERE class <> 1;
CREATE TABLE IF NOT EXISTS idem(key TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
-- Schema 3 deleted a record's key with the record (a random leaf each).
DROP TRIGGER IF EXISTS records_forget_idem;
CREATE TABLE IF NOT EXISTS sinks(name TEXT PRIMARY KEY, cursor INTEGER NOT NULL, bit INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_done(
    sink TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY(sink, first)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_forced(
    sink TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY(sink, first)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_reduce(
    sink TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY(sink, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead(
    sink TEXT NOT NULL, seq INTEGER NOT NULL, attempts INTEGER NOT NULL,
    error TEXT NOT NULL, dead_ms INTEGER NOT NULL,
    PRIMARY KEY(sink, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dead_seq ON dead(seq);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
