//! RocksDB storage: one database with four column families.
//!
//! - `logs`: Raft entries by big-endian index (JSON), written with sync; the
//!   last ones also kept in memory (`Recent`).
//! - `meta`: vote, committed, last purged log id, the current snapshot's meta
//!   (its data is the object store itself, encoded when a snapshot is sent).
//! - `objects`: the API objects, `resource/namespace/name` -> JSON, and the
//!   state machine's applied log id, revision and membership under keys that
//!   start with a NUL byte (no object's key does).
//! - `sm`: where those three lived before (read once, on open, and moved).
//!
//! Log appends and votes are fsynced before they are acknowledged. Appends use
//! group commit: `append` writes the batch and hands openraft's callback to the
//! syncer thread, which fsyncs the write-ahead log once for every append queued
//! meanwhile and only then acknowledges them, so concurrent writes share fsyncs.
//! State-machine writes skip the write-ahead log: the log holds every entry
//! they come from. Each apply batch (objects + applied index) is one atomic
//! RocksDB batch into the one column family, and a memtable flush persists a
//! prefix of a column family's writes, so after a crash the state machine is
//! whatever its last flush held: consistent at some index, from which Raft
//! re-applies the rest of the log. Before a snapshot is recorded the objects
//! are flushed, so the log is never purged behind state that could still be
//! lost. (A snapshot installed from the leader is written through the WAL.)
use crate::hub::{Hub, StoredEvent};
use crate::{NodeId, Response, TypeConfig};
use foldhash::{HashMap, HashMapExt};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use orc_api::mutation::{self, Change};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const CF_SM: &str = "sm";
const CF_OBJECTS: &str = "objects";

/// The state machine's own records, in `objects` beside the objects (see the
/// module doc), and their names in the `sm` column family of earlier versions.
const SM_APPLIED: (&str, &str) = ("\0sm/applied", "applied");
const SM_REVISION: (&str, &str) = ("\0sm/revision", "revision");
const SM_MEMBERSHIP: (&str, &str) = ("\0sm/membership", "membership");

/// Whether a key in `objects` is one of the state machine's records, not an object.
fn is_sm_key(k: &[u8]) -> bool {
    k.first() == Some(&0)
}

/// Move the state machine's records from the `sm` column family (versions
/// before they lived in `objects`), synced, before anything reads them.
fn move_sm_records(db: &DB) -> Result<(), StoreError> {
    let (sm, objects) = (
        db.cf_handle(CF_SM).expect("cf"),
        db.cf_handle(CF_OBJECTS).expect("cf"),
    );
    if db.get_cf(objects, SM_APPLIED.0)?.is_some() {
        return Ok(());
    }
    let mut batch = WriteBatch::default();
    for (new, old) in [SM_APPLIED, SM_REVISION, SM_MEMBERSHIP] {
        if let Some(v) = db.get_cf(sm, old)? {
            batch.put_cf(objects, new, v);
            batch.delete_cf(sm, old);
        }
    }
    if !batch.is_empty() {
        db.write_opt(batch, &sync_opts())?;
    }
    Ok(())
}

/// Apply batches skip the WAL (see the module doc).
fn apply_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.disable_wal(true);
    o
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record {what}: {why}")]
    Corrupt { what: String, why: String },
}

type SResult<T> = Result<T, StorageError<NodeId>>;

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn idx_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn sync_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

/// Open (or create) the store in `dir`, returning its two halves sharing one DB.
pub fn open(dir: &Path, hub: Arc<Hub>) -> Result<(LogStore, StateMachine), StoreError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Objects: every create looks its key up first and mostly finds
    // nothing; bloom filters (in the memtable and in each table file) answer
    // that without searching.
    let mut objects = Options::default();
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    objects.set_block_based_table_factory(&table);
    objects.set_memtable_prefix_bloom_ratio(0.05);
    objects.set_memtable_whole_key_filtering(true);
    // Compression costs CPU at every flush and compaction: objects are
    // compressed only once they reach the deeper levels, where they stay;
    // log entries, deleted once a snapshot covers them, never.
    use rocksdb::DBCompressionType::{None as Plain, Snappy};
    objects.set_compression_per_level(&[Plain, Plain, Snappy, Snappy, Snappy, Snappy, Snappy]);
    let mut logs = Options::default();
    logs.set_compression_type(Plain);
    let cfs = [CF_META, CF_SM]
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()))
        .into_iter()
        .chain([
            ColumnFamilyDescriptor::new(CF_LOGS, logs),
            ColumnFamilyDescriptor::new(CF_OBJECTS, objects),
        ]);
    let db = Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?);
    move_sm_records(&db)?;
    let started = std::time::Instant::now();
    let keys = KeyFilter::of(&db)?;
    tracing::info!(
        keys = keys.counts.len(),
        ms = started.elapsed().as_millis() as u64,
        "key filter built"
    );
    let sm = StateMachine {
        db: db.clone(),
        hub,
        cache: Arc::new(RwLock::new(ObjectCache {
            keys,
            ..Default::default()
        })),
    };
    // Fail early on a corrupt applied record.
    sm.read_applied().map_err(|e| StoreError::Corrupt {
        what: "applied".into(),
        why: e.to_string(),
    })?;
    sm.hub.reset(sm.revision());
    let syncer = start_syncer(&db);
    Ok((
        LogStore {
            db,
            syncer,
            recent: Recent::default(),
            committed: None,
            committed_written: None,
        },
        sm,
    ))
}

fn get_json<T: DeserializeOwned>(
    db: &DB,
    cf: &str,
    key: &str,
    subject: ErrorSubject<NodeId>,
) -> SResult<Option<T>> {
    let h = db.cf_handle(cf).expect("column family");
    match db
        .get_cf(h, key)
        .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?
    {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io_err(subject, ErrorVerb::Read, e)),
    }
}

fn put_json<T: Serialize>(
    db: &DB,
    cf: &str,
    key: &str,
    v: &T,
    subject: ErrorSubject<NodeId>,
    sync: bool,
) -> SResult<()> {
    let h = db.cf_handle(cf).expect("column family");
    let b = serde_json::to_vec(v).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
    let opts = if sync {
        sync_opts()
    } else {
        WriteOptions::default()
    };
    db.put_cf_opt(h, key, b, &opts)
        .map_err(|e| io_err(subject, ErrorVerb::Write, e))
}

// ---------------------------------------------------------------- the log

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
    recent: Recent,
    /// The last committed log id openraft reported, and the one last written.
    /// It is written with the next append rather than on its own: a write per
    /// commit on every master (at 1 client, one per client write) cost about
    /// 5 % of their CPU. What is on disk may lag; it only lets a restarted
    /// master apply entries before it hears from a leader.
    committed: Option<LogId<NodeId>>,
    committed_written: Option<LogId<NodeId>>,
}

/// How many of the last entries the log keeps in memory.
const RECENT_ENTRIES: usize = 256;

/// The last entries of the log, in memory, shared by the store and its
/// readers. openraft reads each entry back soon after it is appended: to
/// apply it, and on the leader to send it to each follower. From here that
/// costs an `Arc` clone of the command instead of a RocksDB read and a JSON
/// parse. It holds consecutive indexes ending at the last entry of the log
/// (or nothing): appends push at the back, a truncation pops the back, a
/// purge the front; anything else is read from RocksDB.
#[derive(Clone, Default)]
struct Recent(Arc<std::sync::Mutex<std::collections::VecDeque<Entry<TypeConfig>>>>);

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Entry<TypeConfig>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, entries: &[Entry<TypeConfig>]) {
        let mut q = self.lock();
        for ent in entries {
            if q.back()
                .is_some_and(|b| b.log_id.index + 1 != ent.log_id.index)
            {
                q.clear();
            }
            q.push_back(ent.clone());
            if q.len() > RECENT_ENTRIES {
                q.pop_front();
            }
        }
    }

    /// Forget entries from `index` on.
    fn truncate(&self, index: u64) {
        let mut q = self.lock();
        while q.back().is_some_and(|b| b.log_id.index >= index) {
            q.pop_back();
        }
    }

    /// Forget entries up to `index`.
    fn purge(&self, index: u64) {
        let mut q = self.lock();
        while q.front().is_some_and(|f| f.log_id.index <= index) {
            q.pop_front();
        }
    }

    /// Entries `start..end` (`end` None: to the last), if all are here.
    fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry<TypeConfig>>> {
        let q = self.lock();
        let first = q.front()?.log_id.index;
        let last = q.back()?.log_id.index;
        let end = end.unwrap_or(last + 1);
        if start < first || end > last + 1 {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let (a, b) = ((start - first) as usize, (end - first) as usize);
        Some(q.range(a..b).cloned().collect())
    }
}

/// Group commit: wait for appends, fsync the WAL once for all of them, acknowledge.
/// The thread ends when every `LogStore` clone (every sender) is gone.
/// It holds the DB weakly: the DB is closed by whoever drops the store, never by
/// this thread (RocksDB must not be closing while the process tears down).
fn start_syncer(db: &Arc<DB>) -> std::sync::mpsc::Sender<LogFlushed<TypeConfig>> {
    let db = Arc::downgrade(db);
    let (tx, rx) = std::sync::mpsc::channel::<LogFlushed<TypeConfig>>();
    std::thread::Builder::new()
        .name("orc-log-sync".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                // Everything in `batch` was written before this call: one sync covers it.
                let res = match db.upgrade() {
                    Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
                    None => Err("the store is closed".to_string()),
                };
                for cb in batch {
                    cb.log_io_completed(res.clone().map_err(std::io::Error::other));
                }
            }
        })
        .expect("spawn log sync thread");
    tx
}

impl LogStore {
    fn last_purged(&self) -> SResult<Option<LogId<NodeId>>> {
        get_json(&self.db, CF_META, "last_purged", ErrorSubject::Store)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Some(*x + 1),
            Bound::Excluded(x) => Some(*x),
            Bound::Unbounded => None,
        };
        if let Some(v) = self.recent.get(start, end) {
            return Ok(v);
        }
        let h = self.db.cf_handle(CF_LOGS).expect("cf");
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(h, IteratorMode::From(&idx_key(start), Direction::Forward))
        {
            let (k, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let idx = u64::from_be_bytes(k[..8].try_into().expect("8-byte key"));
            if !range.contains(&idx) {
                break;
            }
            let ent: Entry<TypeConfig> = serde_json::from_slice(&v)
                .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            out.push(ent);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let h = self.db.cf_handle(CF_LOGS).expect("cf");
        let last = match self.db.iterator_cf(h, IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                let ent: Entry<TypeConfig> = serde_json::from_slice(&v)
                    .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Some(ent.log_id)
            }
        };
        let last_purged_log_id = self.last_purged()?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        put_json(&self.db, CF_META, "vote", vote, ErrorSubject::Vote, true)
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        get_json(&self.db, CF_META, "vote", ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> SResult<()> {
        self.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<NodeId>>> {
        if self.committed.is_some() {
            return Ok(self.committed);
        }
        Ok(
            get_json::<Option<LogId<NodeId>>>(&self.db, CF_META, "committed", ErrorSubject::Store)?
                .flatten(),
        )
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let h = self.db.cf_handle(CF_LOGS).expect("cf");
        let mut batch = WriteBatch::default();
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        for ent in &entries {
            let b = serde_json::to_vec(ent)
                .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.put_cf(h, idx_key(ent.log_id.index), b);
        }
        if self.committed != self.committed_written {
            let b = serde_json::to_vec(&self.committed)
                .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
            batch.put_cf(self.db.cf_handle(CF_META).expect("cf"), "committed", b);
        }
        self.db
            .write(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        self.committed_written = self.committed;
        self.recent.push(&entries);
        // Acknowledged by the syncer once the WAL is fsynced.
        self.syncer.send(callback).map_err(|e| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::other(format!("log sync thread gone: {e}")),
            )
        })
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.recent.truncate(log_id.index);
        let h = self.db.cf_handle(CF_LOGS).expect("cf");
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(h, idx_key(log_id.index), idx_key(u64::MAX));
        self.db
            .write_opt(batch, &sync_opts())
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        put_json(
            &self.db,
            CF_META,
            "last_purged",
            &log_id,
            ErrorSubject::Store,
            true,
        )?;
        self.recent.purge(log_id.index);
        let h = self.db.cf_handle(CF_LOGS).expect("cf");
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(h, idx_key(0), idx_key(log_id.index + 1));
        self.db
            .write(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

// ---------------------------------------------------------------- the state machine

#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    hub: Arc<Hub>,
    cache: Arc<RwLock<ObjectCache>>,
}

/// The stored objects most recently read or written, parsed, so that applying
/// a change and answering a get do not read and parse them from RocksDB again.
/// Written through by `apply` after each batch reaches RocksDB (before the
/// batch's results are returned); emptied when a snapshot is installed.
/// Bounded: past `OBJECT_CACHE_MAX` entries it starts over.
#[derive(Default)]
struct ObjectCache {
    objects: HashMap<String, Arc<Value>>,
    /// Bumped by every write: a reader that missed inserts what it read from
    /// RocksDB only if no write came between (it could be older).
    generation: u64,
    /// The store revision as of the last applied batch or installed snapshot
    /// (None until the first), so an apply does not read it back from RocksDB.
    revision: Option<u64>,
    /// Which keys may exist (built when the store is opened).
    keys: KeyFilter,
}

const OBJECT_CACHE_MAX: usize = 200_000;

/// Which keys of `objects` may exist, so that applying a create (its key
/// looked up first, and almost never found) costs a hash instead of a RocksDB
/// lookup through the memtable and every table file's filter. Kept as a count
/// per 64-bit hash of the keys present: zero means absent for certain; any
/// other count is checked in RocksDB. A count can only be too high (a key
/// counted twice), which costs a lookup, never a wrong answer. About 20 bytes
/// per object in memory, built by one pass over the keys when the store opens.
#[derive(Default)]
struct KeyFilter {
    hasher: foldhash::quality::RandomState,
    counts: HashMap<u64, u32>,
}

impl KeyFilter {
    fn hash(&self, key: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }
    fn may_exist(&self, key: &str) -> bool {
        self.counts.contains_key(&self.hash(key.as_bytes()))
    }
    fn add(&mut self, key: &[u8]) {
        *self.counts.entry(self.hash(key)).or_default() += 1;
    }
    fn remove(&mut self, key: &[u8]) {
        let h = self.hash(key);
        if let Some(n) = self.counts.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&h);
            }
        }
    }
    /// The filter of every object key in `db` (not the state machine's records).
    fn of(db: &DB) -> Result<KeyFilter, rocksdb::Error> {
        let mut f = KeyFilter::default();
        let mut it = db.raw_iterator_cf(db.cf_handle(CF_OBJECTS).expect("cf"));
        it.seek_to_first();
        while let Some(k) = it.key() {
            if !is_sm_key(k) {
                f.add(k);
            }
            it.next();
        }
        it.status()?;
        Ok(f)
    }
}

impl ObjectCache {
    fn insert(&mut self, key: &str, v: Arc<Value>) {
        if self.objects.len() >= OBJECT_CACHE_MAX && !self.objects.contains_key(key) {
            // Freeing this many objects takes a good part of a second (they
            // are cold, and often the cache held them last): a thread of its
            // own does it, not the apply path under the cache's lock.
            let full = std::mem::take(&mut self.objects);
            let _ = std::thread::Builder::new()
                .name("orc-cache-free".into())
                .spawn(move || drop(full));
        }
        self.objects.insert(key.to_string(), v);
    }
}

/// The applied log id and membership.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

/// Applied log id, membership and encoded objects, read from one RocksDB snapshot.
type SnapshotContents = (
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, BasicNode>,
    Vec<u8>,
);

const REVISION_KEY: &[u8] = b"\0revision";

/// The store revision, from the DB or from one of its snapshots.
fn read_revision(db: &DB, snap: Option<&rocksdb::Snapshot<'_>>) -> u64 {
    let h = db.cf_handle(CF_OBJECTS).expect("cf");
    let v = match snap {
        Some(s) => s.get_cf(h, SM_REVISION.0),
        None => db.get_cf(h, SM_REVISION.0),
    };
    v.ok()
        .flatten()
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Record that a snapshot at `meta` was built or installed (synced). Only the
/// meta is kept: the snapshot's data is the object store itself, encoded when
/// a snapshot is asked for (`get_current_snapshot`). The data blob of earlier
/// builds, which kept a copy of every object here, is deleted.
fn save_snapshot_meta(db: &DB, meta: &SnapshotMeta<NodeId, BasicNode>) -> SResult<()> {
    let subject = ErrorSubject::Snapshot(Some(meta.signature()));
    let h = db.cf_handle(CF_META).expect("cf");
    let m = serde_json::to_vec(meta).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
    let mut batch = WriteBatch::default();
    batch.put_cf(h, "snapshot_meta", m);
    batch.delete_cf(h, "snapshot_data");
    db.write_opt(batch, &sync_opts())
        .map_err(|e| io_err(subject, ErrorVerb::Write, e))
}

/// The meta of a snapshot of the state at `applied`.
fn snapshot_meta(
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
) -> SnapshotMeta<NodeId, BasicNode> {
    let snapshot_id = match applied {
        Some(l) => format!("{}-{}", l.leader_id, l.index),
        None => "empty".to_string(),
    };
    SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
        snapshot_id,
    }
}

/// Snapshot data: a sequence of (u32 key length, key, u32 value length, value).
fn encode_pair(out: &mut Vec<u8>, k: &[u8], v: &[u8]) {
    out.extend_from_slice(&(k.len() as u32).to_be_bytes());
    out.extend_from_slice(k);
    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
    out.extend_from_slice(v);
}

type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

fn decode_pairs(mut data: &[u8]) -> Result<Pairs<'_>, String> {
    let mut out = Vec::new();
    let take = |d: &mut &[u8]| -> Result<usize, String> {
        if d.len() < 4 {
            return Err("truncated length".into());
        }
        let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        *d = &d[4..];
        if d.len() < n {
            return Err("truncated record".into());
        }
        Ok(n)
    };
    while !data.is_empty() {
        let n = take(&mut data)?;
        let k = &data[..n];
        data = &data[n..];
        let m = take(&mut data)?;
        let v = &data[..m];
        data = &data[m..];
        out.push((k, v));
    }
    Ok(out)
}

impl StateMachine {
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    fn read_applied(&self) -> SResult<Option<LogId<NodeId>>> {
        Ok(get_json::<Option<LogId<NodeId>>>(
            &self.db,
            CF_OBJECTS,
            SM_APPLIED.0,
            ErrorSubject::StateMachine,
        )?
        .flatten())
    }

    /// Write everything applied so far to table files (apply batches skip
    /// the WAL), waiting until it is done.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut wait = rocksdb::FlushOptions::default();
        wait.set_wait(true);
        self.db
            .flush_cf_opt(self.db.cf_handle(CF_OBJECTS).expect("cf"), &wait)?;
        Ok(())
    }

    /// The store revision: one more for every command applied. It is what
    /// `metadata.resourceVersion` holds (like etcd's revision; a log entry may carry
    /// a batch of commands, so the log index alone does not name one write).
    pub fn revision(&self) -> u64 {
        read_revision(&self.db, None)
    }

    /// One object, as stored, shared with the cache.
    pub fn get_shared(&self, key: &str) -> Result<Option<Arc<Value>>, StoreError> {
        let generation = {
            let c = self.cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(o) = c.objects.get(key) {
                return Ok(Some(o.clone()));
            }
            c.generation
        };
        let Some(o) = self.read_object(key)? else {
            return Ok(None);
        };
        let o = Arc::new(o);
        let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if c.generation == generation {
            c.insert(key, o.clone());
        }
        Ok(Some(o))
    }

    fn read_object(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let h = self.db.cf_handle(CF_OBJECTS).expect("cf");
        match self.db.get_cf(h, key)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what: key.into(),
                    why: e.to_string(),
                }),
        }
    }

    /// Every object under `prefix`, and the store revision they are consistent with.
    pub fn list(&self, prefix: &str) -> Result<(u64, Vec<(String, Value)>), StoreError> {
        let snap = self.db.snapshot();
        let revision = read_revision(&self.db, Some(&snap));
        let h = self.db.cf_handle(CF_OBJECTS).expect("cf");
        let mut out = Vec::new();
        for item in snap.iterator_cf(h, IteratorMode::From(prefix.as_bytes(), Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            if is_sm_key(&k) {
                continue;
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            let obj = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                what: key.clone(),
                why: e.to_string(),
            })?;
            out.push((key, obj));
        }
        Ok((revision, out))
    }

    /// Check the store's invariants: every object parses, sits at the key its
    /// metadata names, and carries a resourceVersion no later than the store revision.
    /// The allocation index must match the Services.
    pub fn check_consistency(&self) -> Result<usize, String> {
        let (applied, objs) = self.list("").map_err(|e| e.to_string())?;
        let by_key: HashMap<&str, &Value> = objs.iter().map(|(k, o)| (k.as_str(), o)).collect();
        for (k, o) in &objs {
            // The allocation index: each entry names a Service that holds it.
            if k.starts_with(mutation::INDEX_PREFIX) {
                let owner = o.as_str().ok_or(format!("{k}: does not name a Service"))?;
                let svc = by_key
                    .get(owner)
                    .ok_or(format!("{k}: held by {owner}, which does not exist"))?;
                if !mutation::allocation_keys(svc).contains(k) {
                    return Err(format!("{k}: {owner} does not hold it"));
                }
                continue;
            }
            let key = orc_api::ObjectKey::decode(k).ok_or(format!("bad key {k}"))?;
            let name = o
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            let ns = o
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            if key.name != name || key.namespace != ns {
                return Err(format!("{k}: metadata names {ns}/{name}"));
            }
            let rv: u64 = o
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .ok_or(format!("{k}: no resourceVersion"))?;
            if rv > applied {
                return Err(format!(
                    "{k}: resourceVersion {rv} beyond the store revision {applied}"
                ));
            }
        }
        Ok(objs.len())
    }

    fn snapshot_bytes(&self) -> SResult<SnapshotContents> {
        let snap = self.db.snapshot();
        let (applied, membership) = self.applied_at(&snap)?;
        let mut data = Vec::new();
        let revision = read_revision(&self.db, Some(&snap));
        encode_pair(&mut data, REVISION_KEY, &revision.to_be_bytes());
        let h = self.db.cf_handle(CF_OBJECTS).expect("cf");
        for item in snap.iterator_cf(h, IteratorMode::Start) {
            let (k, v) =
                item.map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            if !is_sm_key(&k) {
                encode_pair(&mut data, &k, &v);
            }
        }
        Ok((applied, membership, data))
    }

    /// The applied log id and membership as of the RocksDB snapshot `snap`.
    fn applied_at(&self, snap: &rocksdb::Snapshot<'_>) -> SResult<AppliedState> {
        let read = |key: &str| -> SResult<Option<Vec<u8>>> {
            snap.get_cf(self.db.cf_handle(CF_OBJECTS).expect("cf"), key)
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))
        };
        let de = |b: Option<Vec<u8>>| -> SResult<Option<serde_json::Value>> {
            b.map(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))
            })
            .transpose()
        };
        let applied: Option<LogId<NodeId>> = de(read(SM_APPLIED.0)?)?
            .and_then(|v| serde_json::from_value(v).ok())
            .flatten();
        let membership: StoredMembership<NodeId, BasicNode> = de(read(SM_MEMBERSHIP.0)?)?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        Ok((applied, membership))
    }

    /// A consistent copy of every object: (store revision, encoded pairs).
    pub fn export(&self) -> Result<(u64, Vec<u8>), String> {
        let (_, _, data) = self.snapshot_bytes().map_err(|e| e.to_string())?;
        let revision = decode_pairs(&data)?
            .first()
            .filter(|(k, _)| *k == REVISION_KEY)
            .and_then(|(_, v)| (*v).try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        Ok((revision, data))
    }
}

/// Decode exported snapshot data into (key, object JSON) pairs.
pub fn decode_export(data: &[u8]) -> Result<Vec<(String, Value)>, String> {
    decode_pairs(data)?
        .into_iter()
        .filter(|(k, _)| *k != REVISION_KEY)
        .map(|(k, v)| {
            Ok((
                String::from_utf8_lossy(k).into_owned(),
                serde_json::from_slice(v).map_err(|e| e.to_string())?,
            ))
        })
        .collect()
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Records the applied state as the current snapshot, without copying the
    /// objects: they are encoded only when a snapshot is sent
    /// (`get_current_snapshot`), so building one under a write load costs a
    /// memtable flush rather than a copy of the whole store. openraft uses
    /// only the meta of what this returns; the data returned here is empty.
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        // The state as of now; then make it durable (apply batches skip the
        // WAL: flush them to table files) before Raft may purge logs behind it.
        let snap = self.db.snapshot();
        let (applied, membership) = self.applied_at(&snap)?;
        drop(snap);
        let this = self.clone();
        blocking("flush", move || this.flush())
            .await?
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        let meta = snapshot_meta(applied, membership);
        save_snapshot_meta(&self.db, &meta)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

/// Run `f` on tokio's blocking pool (RocksDB work too long for a runtime thread).
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> SResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        io_err(
            ErrorSubject::StateMachine,
            ErrorVerb::Write,
            std::io::Error::other(format!("{what} task: {e}")),
        )
    })
}

/// Entries totalling fewer JSON bytes than this are applied on the runtime
/// thread that got them; larger batches go to the blocking pool.
const INLINE_APPLY_BYTES: usize = 64 * 1024;

impl StateMachine {
    /// Apply `entries` in order, as one RocksDB batch; then the object cache
    /// and the watch hub follow.
    fn apply_entries(&self, entries: Vec<Entry<TypeConfig>>) -> SResult<Vec<Response>> {
        let objects = self.db.cf_handle(CF_OBJECTS).expect("cf");
        // Writes of this batch not yet in RocksDB: later entries must see
        // earlier ones. They go to the object cache once the batch is written.
        let mut overlay: HashMap<String, Option<Arc<Value>>> = HashMap::new();
        // Keys this batch creates (true) and removes (false), in order, for
        // the key filter once the batch is written.
        let mut present: Vec<(String, bool)> = Vec::new();
        // Objects read from RocksDB during the batch (not written by it).
        let fetched: std::cell::RefCell<Vec<(String, Arc<Value>)>> = Default::default();
        let mut batch = WriteBatch::default();
        // The objects' writes, the last per key (what the atomic batch would
        // leave), put into the batch in key order: RocksDB inserts each key
        // into its memtable starting from where the previous one went, so
        // sorted keys search less of the skip list than keys in arrival order.
        let mut writes: std::collections::BTreeMap<String, Option<Vec<u8>>> = Default::default();
        let mut replies = Vec::new();
        let mut events = Vec::new();
        let mut last = None;
        let cached = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .revision;
        let mut revision = cached.unwrap_or_else(|| read_revision(&self.db, None));
        for ent in entries {
            last = Some(ent.log_id);
            match ent.payload {
                EntryPayload::Blank => replies.push(Vec::new()),
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(ent.log_id), m);
                    let b = serde_json::to_vec(&stored)
                        .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
                    batch.put_cf(objects, SM_MEMBERSHIP.0, b);
                    replies.push(Vec::new());
                }
                EntryPayload::Normal(logged) => {
                    let mut results = Vec::new();
                    let cmd = logged.take_command().map_err(|e| {
                        io_err(
                            ErrorSubject::Log(ent.log_id),
                            ErrorVerb::Read,
                            std::io::Error::other(format!("entry {}: {e}", ent.log_id)),
                        )
                    })?;
                    for cmd in cmd.into_commands() {
                        revision += 1;
                        let get = |k: &str| -> Option<Arc<Value>> {
                            if let Some(o) = overlay.get(k) {
                                return o.clone();
                            }
                            {
                                let c = self.cache.read().unwrap_or_else(|e| e.into_inner());
                                if let Some(o) = c.objects.get(k) {
                                    return Some(o.clone());
                                }
                                if !c.keys.may_exist(k) {
                                    drop(c);
                                    debug_assert!(
                                        self.read_object(k).ok().flatten().is_none(),
                                        "the key filter says {k} is absent, but it is stored"
                                    );
                                    return None;
                                }
                            }
                            let o = Arc::new(self.read_object(k).ok().flatten()?);
                            fetched.borrow_mut().push((k.to_string(), o.clone()));
                            Some(o)
                        };
                        let res = mutation::apply(cmd, revision, &get);
                        // The allocation index follows the Services (see
                        // `mutation::allocation_keys`), in the same write.
                        if let Ok(
                            Change::Put { key, object, .. } | Change::Remove { key, object },
                        ) = &res
                        {
                            if key.starts_with("services/") {
                                let before = get(key)
                                    .map(|o| mutation::allocation_keys(&o))
                                    .unwrap_or_default();
                                let after = match &res {
                                    Ok(Change::Put { .. }) => mutation::allocation_keys(object),
                                    _ => Vec::new(),
                                };
                                for k in before.iter().filter(|k| !after.contains(k)) {
                                    writes.insert(k.clone(), None);
                                    overlay.insert(k.clone(), None);
                                    present.push((k.clone(), false));
                                }
                                for k in after.iter().filter(|k| !before.contains(k)) {
                                    let v = Value::String(key.clone());
                                    let b = serde_json::to_vec(&v).unwrap_or_default();
                                    writes.insert(k.clone(), Some(b));
                                    overlay.insert(k.clone(), Some(Arc::new(v)));
                                    present.push((k.clone(), true));
                                }
                            }
                        }
                        if let Ok(ch) = &res {
                            let (key, event_type, object, previous, size) = match ch {
                                Change::Put {
                                    key,
                                    object,
                                    event,
                                    previous,
                                } => {
                                    let b = serde_json::to_vec(&**object).map_err(|e| {
                                        io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e)
                                    })?;
                                    let size = b.len();
                                    writes.insert(key.clone(), Some(b));
                                    overlay.insert(key.clone(), Some(object.clone()));
                                    if *event == orc_api::EventType::Added {
                                        present.push((key.clone(), true));
                                    }
                                    (key, *event, object, previous.clone(), size)
                                }
                                Change::Remove { key, object } => {
                                    writes.insert(key.clone(), None);
                                    overlay.insert(key.clone(), None);
                                    present.push((key.clone(), false));
                                    let size = object.to_string().len();
                                    (key, orc_api::EventType::Deleted, object, None, size)
                                }
                                Change::Unchanged { .. } => {
                                    results.push(res);
                                    continue;
                                }
                            };
                            events.push(StoredEvent {
                                index: revision,
                                key: key.clone(),
                                event_type,
                                object: object.clone(),
                                previous,
                                size,
                            });
                        }
                        results.push(res);
                    }
                    replies.push(results);
                }
            }
        }
        for (k, v) in &writes {
            match v {
                Some(b) => batch.put_cf(objects, k, b),
                None => batch.delete_cf(objects, k),
            }
        }
        if let Some(l) = last {
            let b = serde_json::to_vec(&Some(l))
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
            batch.put_cf(objects, SM_APPLIED.0, b);
            batch.put_cf(objects, SM_REVISION.0, revision.to_be_bytes());
            self.db
                .write_opt(batch, &apply_opts())
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
            let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
            c.generation += 1;
            c.revision = Some(revision);
            for (k, added) in present {
                if added {
                    c.keys.add(k.as_bytes());
                } else {
                    c.keys.remove(k.as_bytes());
                }
            }
            for (k, o) in fetched.into_inner() {
                if !overlay.contains_key(&k) {
                    c.insert(&k, o);
                }
            }
            for (k, o) in overlay {
                match o {
                    Some(o) => c.insert(&k, o),
                    None => {
                        c.objects.remove(&k);
                    }
                }
            }
            drop(c);
            self.hub.publish(events, revision);
        }
        Ok(replies)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> SResult<AppliedState> {
        let applied = self.read_applied()?;
        let membership = get_json(
            &self.db,
            CF_OBJECTS,
            SM_MEMBERSHIP.0,
            ErrorSubject::StateMachine,
        )?
        .unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // A large batch (a thousand pods is tens of milliseconds of parsing and
        // writing) runs on the blocking pool: it must not hold one of the few
        // runtime threads that also answer AppendEntries and heartbeats, which
        // openraft gives one heartbeat interval.
        let bytes: usize = entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(l) => l.json().get().len(),
                _ => 0,
            })
            .sum();
        if bytes < INLINE_APPLY_BYTES {
            return self.apply_entries(entries);
        }
        let this = self.clone();
        blocking("apply", move || this.apply_entries(entries)).await?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let data = snapshot.into_inner();
        let pairs = decode_pairs(&data)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, std::io::Error::other(e)))?;
        let objects = self.db.cf_handle(CF_OBJECTS).expect("cf");
        let mut batch = WriteBatch::default();
        // Remove every existing object: the snapshot replaces the whole store.
        let h = self.db.cf_handle(CF_OBJECTS).expect("cf");
        for item in self.db.iterator_cf(h, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?;
            batch.delete_cf(objects, k);
        }
        let mut revision = 0;
        let mut keys = KeyFilter::default();
        for (k, v) in &pairs {
            if *k == REVISION_KEY {
                revision = (*v).try_into().map(u64::from_be_bytes).unwrap_or(0);
            } else {
                batch.put_cf(objects, k, v);
                if !is_sm_key(k) {
                    keys.add(k);
                }
            }
        }
        batch.put_cf(objects, SM_REVISION.0, revision.to_be_bytes());
        let ser = |v: &dyn erased::Ser| {
            v.to_vec()
                .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))
        };
        batch.put_cf(objects, SM_APPLIED.0, ser(&meta.last_log_id)?);
        batch.put_cf(objects, SM_MEMBERSHIP.0, ser(&meta.last_membership)?);
        self.db
            .write_opt(batch, &sync_opts())
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        {
            let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
            c.generation += 1;
            c.objects.clear();
            c.revision = Some(revision);
            c.keys = keys;
        }
        save_snapshot_meta(&self.db, meta)?;
        self.hub.reset(revision);
        Ok(())
    }

    /// The store as it is now, once a snapshot has been built or installed
    /// (none before). Its meta is that of the applied state now, at or after
    /// the last snapshot built: every log entry it covers is committed, and the
    /// log is purged only behind the last one built.
    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        let built: Option<SnapshotMeta<NodeId, BasicNode>> = get_json(
            &self.db,
            CF_META,
            "snapshot_meta",
            ErrorSubject::Snapshot(None),
        )?;
        if built.is_none() {
            return Ok(None);
        }
        let (applied, membership, data) = self.snapshot_bytes()?;
        Ok(Some(Snapshot {
            meta: snapshot_meta(applied, membership),
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

mod erased {
    /// JSON-encode through a trait object (lets one closure serve several types).
    pub trait Ser {
        fn to_vec(&self) -> Result<Vec<u8>, serde_json::Error>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_vec(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> SResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().expect("tempdir");
            let (log, sm) = open(dir.path(), Hub::new(1000, usize::MAX)).expect("open store");
            Ok((dir, log, sm))
        }
    }

    /// openraft's storage conformance suite, against the real RocksDB store.
    #[test]
    fn openraft_suite() -> Result<(), StorageError<NodeId>> {
        Suite::test_all(Builder)
    }

    fn entry(index: u64, cmd: orc_api::Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Arc::new(crate::Logged::new(cmd))),
        }
    }

    fn create(resource: &str, ns: &str, name: &str) -> orc_api::Command {
        let kind = if resource == "namespaces" {
            "Namespace"
        } else {
            "ConfigMap"
        };
        orc_api::Command::Create {
            key: orc_api::ObjectKey::new(resource, ns, name),
            object: serde_json::json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": ns}}),
        }
    }

    /// Build a snapshot of `from` and install it into `to`.
    async fn install_from(from: &mut StateMachine, to: &mut StateMachine) {
        from.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let snap = from
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        to.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
    }

    /// A batch entry applies its commands in order, each with its own revision and
    /// event; a snapshot carries objects and revision to another store.
    #[tokio::test]
    async fn batches_get_one_revision_per_command() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = open(dir.path(), Hub::new(100, usize::MAX)).unwrap();
        let mut live = sm.hub().subscribe(0).unwrap();
        let batch = orc_api::Command::Batch(vec![
            create("namespaces", "", "a"),
            create("configmaps", "a", "x"),
            create("configmaps", "a", "x"),
            create("configmaps", "a", "y"),
        ]);
        let replies = sm
            .apply([entry(1, create("namespaces", "", "b")), entry(2, batch)])
            .await
            .unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[1].len(), 4);
        assert!(replies[1][2]
            .as_ref()
            .is_err_and(|e| e.reason == orc_api::Reason::AlreadyExists));
        assert_eq!(
            replies[1][3].as_ref().unwrap().object()["metadata"]["resourceVersion"],
            "5"
        );
        assert_eq!(sm.revision(), 5);
        let (rev, objs) = sm.list("configmaps/a/").unwrap();
        assert_eq!((rev, objs.len()), (5, 2));
        match live.rx.try_recv().unwrap() {
            crate::hub::HubMessage::Events(evs) => {
                assert_eq!(
                    evs.iter().map(|e| e.index).collect::<Vec<_>>(),
                    vec![1, 2, 3, 5]
                );
            }
            other => panic!("{other:?}"),
        }
        sm.check_consistency().unwrap();

        // A build records the applied state; the data is the store, encoded
        // when the snapshot is asked for.
        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let snap = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(snap.meta, built.meta);
        let dir2 = tempfile::tempdir().unwrap();
        let (_, mut other) = open(dir2.path(), Hub::new(100, usize::MAX)).unwrap();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(other.revision(), 5);
        assert_eq!(other.list("").unwrap().1, sm.list("").unwrap().1);
        assert_eq!(other.hub().floor(), 5);
    }

    /// Entries as they arrive from the leader (JSON, parsed only when applied),
    /// in a batch large enough to be applied off the runtime's threads, give
    /// the same results as small ones; an entry whose JSON is not a command is
    /// refused as a storage error and changes nothing.
    #[tokio::test]
    async fn large_batches_from_the_wire_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = open(dir.path(), Hub::new(100_000, usize::MAX)).unwrap();
        let wire = |e: Entry<TypeConfig>| -> Entry<TypeConfig> {
            serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap()
        };
        let fat = "v".repeat(1000);
        let cms: Vec<orc_api::Command> = (0..200)
            .map(|i| {
                let mut c = create("configmaps", "a", &format!("c{i}"));
                if let orc_api::Command::Create { object, .. } = &mut c {
                    object["data"] = serde_json::json!({ "v": fat });
                }
                c
            })
            .collect();
        let entries = vec![
            wire(entry(1, create("namespaces", "", "a"))),
            wire(entry(2, orc_api::Command::Batch(cms[..100].to_vec()))),
            wire(entry(3, orc_api::Command::Batch(cms[100..].to_vec()))),
        ];
        let bytes: usize = entries
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap().len())
            .sum();
        assert!(bytes > INLINE_APPLY_BYTES, "{bytes}");
        let replies = sm.apply(entries).await.unwrap();
        assert_eq!(
            replies.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1, 100, 100]
        );
        let last = replies[2][99].as_ref().unwrap().object();
        assert_eq!(last["metadata"]["resourceVersion"], "201");
        assert_eq!(last["data"]["v"], fat.as_str());
        let (rev, objs) = sm.list("configmaps/a/").unwrap();
        assert_eq!((rev, objs.len()), (201, 200));

        let bad: Entry<TypeConfig> = serde_json::from_value(serde_json::json!({
            "log_id": {"leader_id": {"term": 1, "node_id": 1}, "index": 4},
            "payload": {"Normal": {"Nonsense": 1}}
        }))
        .unwrap();
        let err = sm
            .apply([wire(entry(4, create("configmaps", "a", "late"))), bad])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Nonsense"), "{err}");
        assert_eq!(sm.revision(), 201);
        assert!(sm.get_shared("configmaps/a/late").unwrap().is_none());
        sm.check_consistency().unwrap();
    }

    /// The consistency check accepts the allocation index the Services keep
    /// and refuses an entry no Service holds.
    #[tokio::test]
    async fn consistency_covers_the_allocation_index() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = open(dir.path(), Hub::new(100, usize::MAX)).unwrap();
        let svc = orc_api::Command::Create {
            key: orc_api::ObjectKey::new("services", "a", "web"),
            object: serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "a"},
                "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80, "nodePort": 30080}]}}),
        };
        sm.apply([entry(1, create("namespaces", "", "a")), entry(2, svc)])
            .await
            .unwrap();
        let h = sm.db.cf_handle(CF_OBJECTS).unwrap();
        assert!(sm.db.get_cf(h, "~clusterip/198.19.0.10").unwrap().is_some());
        sm.check_consistency().unwrap();
        sm.db
            .put_cf(h, "~clusterip/198.19.0.11", br#""services/a/web""#)
            .unwrap();
        let e = sm.check_consistency().unwrap_err();
        assert!(e.contains("~clusterip/198.19.0.11"), "{e}");
    }

    /// The key filter counts what applies create and remove (objects and the
    /// allocation index), agrees with one built from the store, never calls a
    /// stored key absent, and is replaced by an installed snapshot's keys.
    #[tokio::test]
    async fn the_key_filter_follows_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = open(dir.path(), Hub::new(100, usize::MAX)).unwrap();
        let svc = |name: &str| orc_api::Command::Create {
            key: orc_api::ObjectKey::new("services", "a", name),
            object: serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "a"},
                "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80}]}}),
        };
        let delete = |resource: &str, name: &str| orc_api::Command::Delete {
            key: orc_api::ObjectKey::new(resource, "a", name),
            preconditions: Default::default(),
            propagation: None,
            now: "2026-12-07T00:00:00Z".into(),
            grace: None,
        };
        use orc_api::Command::Batch;
        let replies = sm
            .apply([
                entry(1, create("namespaces", "", "a")),
                entry(2, Batch(vec![create("configmaps", "a", "x"), svc("web")])),
                // Created and removed in one batch; removed, then created again.
                entry(
                    3,
                    Batch(vec![
                        create("configmaps", "a", "z"),
                        delete("configmaps", "z"),
                    ]),
                ),
                entry(
                    4,
                    Batch(vec![
                        delete("configmaps", "x"),
                        create("configmaps", "a", "x"),
                    ]),
                ),
                // Taken: the name, and the ClusterIP (its index key).
                entry(5, Batch(vec![create("configmaps", "a", "x"), svc("other")])),
            ])
            .await
            .unwrap();
        let ok = |r: &Result<Change, orc_api::ApiError>| r.is_ok();
        assert!(replies[2].iter().all(ok) && replies[3].iter().all(ok));
        let taken: Vec<_> = replies[4]
            .iter()
            .map(|r| r.as_ref().unwrap_err().reason)
            .collect();
        assert_eq!(
            taken,
            [orc_api::Reason::AlreadyExists, orc_api::Reason::Invalid]
        );
        let probes = [
            "namespaces//a",
            "configmaps/a/x",
            "configmaps/a/z",
            "services/a/web",
            "services/a/other",
            "~clusterip/198.19.0.10",
        ];
        let stored = |sm: &StateMachine| -> Vec<bool> {
            probes
                .iter()
                .map(|k| sm.read_object(k).unwrap().is_some())
                .collect()
        };
        let filtered =
            |f: &KeyFilter| -> Vec<bool> { probes.iter().map(|k| f.may_exist(k)).collect() };
        let expected = [true, true, false, true, false, true];
        assert_eq!(stored(&sm), expected);
        let kept = filtered(&sm.cache.read().unwrap().keys);
        assert_eq!(kept, expected);
        assert_eq!(filtered(&KeyFilter::of(&sm.db).unwrap()), expected);
        // Deleting the Service frees its index key too.
        sm.apply([entry(6, delete("services", "web"))])
            .await
            .unwrap();
        assert!(!sm
            .cache
            .read()
            .unwrap()
            .keys
            .may_exist("~clusterip/198.19.0.10"));
        // A count is per hash: a key counted twice stays until removed twice.
        let mut f = KeyFilter::default();
        f.add(b"k");
        f.add(b"k");
        f.remove(b"k");
        assert!(f.may_exist("k"));
        f.remove(b"k");
        f.remove(b"k");
        assert!(!f.may_exist("k") && f.counts.is_empty());
        // An installed snapshot brings its own keys.
        let dir2 = tempfile::tempdir().unwrap();
        let (_, mut other) = open(dir2.path(), Hub::new(100, usize::MAX)).unwrap();
        other
            .apply([entry(1, create("namespaces", "", "b"))])
            .await
            .unwrap();
        install_from(&mut other, &mut sm).await;
        let c = sm.cache.read().unwrap();
        let f = &c.keys;
        assert!(f.may_exist("namespaces//b") && !f.may_exist("namespaces//a"));
        assert!(!f.may_exist("configmaps/a/x"));
    }

    /// Data dirs of earlier versions keep the state machine's records in the
    /// `sm` column family: opening one moves them beside the objects.
    #[tokio::test]
    async fn records_of_earlier_versions_move_into_objects() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_, mut sm) = open(dir.path(), Hub::new(100, usize::MAX)).unwrap();
            sm.apply([
                entry(1, create("namespaces", "", "a")),
                entry(2, create("configmaps", "a", "x")),
            ])
            .await
            .unwrap();
            // Back where earlier versions kept them, synced.
            let (o, old) = (
                sm.db.cf_handle(CF_OBJECTS).unwrap(),
                sm.db.cf_handle(CF_SM).unwrap(),
            );
            let mut batch = WriteBatch::default();
            for (new, name) in [SM_APPLIED, SM_REVISION] {
                let v = sm.db.get_cf(o, new).unwrap().expect(new);
                batch.put_cf(old, name, v);
                batch.delete_cf(o, new);
            }
            sm.db.write_opt(batch, &sync_opts()).unwrap();
            sm.flush().unwrap();
        }
        let (_, sm) = open(dir.path(), Hub::new(100, usize::MAX)).unwrap();
        assert_eq!(sm.revision(), 2);
        assert_eq!(sm.read_applied().unwrap().map(|l| l.index), Some(2));
        let old = sm.db.cf_handle(CF_SM).unwrap();
        assert!(sm.db.get_cf(old, "applied").unwrap().is_none());
        assert_eq!(sm.check_consistency().unwrap(), 2);
        // The records are not objects: not listed, not in a snapshot.
        assert_eq!(sm.list("").unwrap().1.len(), 2);
        let (_, data) = sm.export().unwrap();
        assert_eq!(decode_export(&data).unwrap().len(), 2);
    }

    /// The object cache answers as RocksDB does: after creates, updates and
    /// deletes (also of objects it never held), and after a snapshot install
    /// replaces the store.
    #[tokio::test]
    async fn cached_objects_follow_writes_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = open(dir.path(), Hub::new(100, usize::MAX)).unwrap();
        let key = "configmaps/a/x";
        let same = |sm: &StateMachine| {
            for k in [key, "configmaps/a/y", "namespaces//a"] {
                assert_eq!(
                    sm.get_shared(k).unwrap().as_deref(),
                    sm.read_object(k).unwrap().as_ref(),
                    "{k}"
                );
            }
        };
        sm.apply([
            entry(1, create("namespaces", "", "a")),
            entry(2, create("configmaps", "a", "x")),
        ])
        .await
        .unwrap();
        same(&sm);
        let read = sm.get_shared(key).unwrap().unwrap();
        assert_eq!(read["metadata"]["resourceVersion"], "2");
        let mut changed = (*read).clone();
        changed["data"] = serde_json::json!({"k": "v"});
        let update = orc_api::Command::Update {
            key: orc_api::ObjectKey::new("configmaps", "a", "x"),
            object: changed,
            status: false,
        };
        sm.apply([entry(3, update)]).await.unwrap();
        assert_eq!(sm.get_shared(key).unwrap().unwrap()["data"]["k"], "v");
        same(&sm);
        // Stored but never cached (as after a restart: written behind the
        // cache's back, the key filter then built from the store as `open`
        // builds it), then deleted through the log: neither read is stale.
        let h = sm.db.cf_handle(CF_OBJECTS).unwrap();
        let y = serde_json::json!({"kind": "ConfigMap", "metadata": {"name": "y", "namespace": "a", "resourceVersion": "3"}});
        sm.db
            .put_cf(h, "configmaps/a/y", serde_json::to_vec(&y).unwrap())
            .unwrap();
        sm.cache.write().unwrap().keys = KeyFilter::of(&sm.db).unwrap();
        let delete = orc_api::Command::Delete {
            key: orc_api::ObjectKey::new("configmaps", "a", "y"),
            preconditions: Default::default(),
            propagation: None,
            now: "2026-11-27T00:00:00Z".into(),
            grace: None,
        };
        sm.apply([entry(4, delete)]).await.unwrap();
        assert_eq!(sm.get_shared("configmaps/a/y").unwrap(), None);
        same(&sm);
        // A snapshot of an empty store replaces everything cached.
        let dir2 = tempfile::tempdir().unwrap();
        let (_, mut empty) = open(dir2.path(), Hub::new(100, usize::MAX)).unwrap();
        install_from(&mut empty, &mut sm).await;
        assert_eq!(sm.get_shared(key).unwrap(), None);
        same(&sm);
    }

    /// The in-memory tail of the log answers only for what it holds in
    /// full, follows truncations and purges, and stays bounded.
    #[test]
    fn recent_entries_follow_the_log() {
        let r = Recent::default();
        let ents: Vec<_> = (1..=5).map(|i| entry(i, orc_api::Command::Noop)).collect();
        r.push(&ents);
        let idx = |v: Vec<Entry<TypeConfig>>| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
        assert_eq!(r.get(2, Some(4)).map(idx), Some(vec![2, 3]));
        assert_eq!(r.get(3, None).map(idx), Some(vec![3, 4, 5]));
        assert!(r.get(0, Some(3)).is_none(), "1 is the first held");
        assert!(r.get(4, Some(7)).is_none(), "5 is the last");
        r.truncate(4);
        assert_eq!(r.get(1, None).map(idx), Some(vec![1, 2, 3]));
        r.push(&[entry(4, orc_api::Command::Noop)]);
        r.purge(2);
        assert_eq!(r.get(3, None).map(idx), Some(vec![3, 4]));
        assert!(r.get(2, None).is_none());
        // A gap (after a snapshot) starts over.
        r.push(&[entry(9, orc_api::Command::Noop)]);
        assert_eq!(r.get(9, None).map(idx), Some(vec![9]));
        assert!(r.get(4, None).is_none());
        let many: Vec<_> = (10..10 + RECENT_ENTRIES as u64 + 5)
            .map(|i| entry(i, orc_api::Command::Noop))
            .collect();
        r.push(&many);
        assert_eq!(r.lock().len(), RECENT_ENTRIES);
    }

    #[test]
    fn snapshot_pairs_round_trip() {
        let mut d = Vec::new();
        encode_pair(&mut d, b"a", b"{}");
        encode_pair(&mut d, b"configmaps/x/y", b"[1]");
        let p = decode_pairs(&d).unwrap();
        assert_eq!(
            p,
            vec![
                (&b"a"[..], &b"{}"[..]),
                (&b"configmaps/x/y"[..], &b"[1]"[..])
            ]
        );
        assert!(decode_pairs(&d[..d.len() - 1]).is_err());
    }
}
