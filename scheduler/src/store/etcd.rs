//! L1: the etcd backend of [`super::StateStore`] (`volley scheduler --state
//! etcd://host:2379[,host2:2379][/name]`) and the leader election of the schedulers sharing it.
//!
//! Keys live under `/volley/<name>/` (name `default` unless the URL gives one): `leader`,
//! `meta/format_version`, `history/`, `sessions/`, `running/` and `steps/<job>/<seq>`. Schedulers
//! campaign for `leader` with a lease ([`LEASE_TTL_SECS`]): the one that creates the key leads
//! and keeps its lease alive; the others wait and campaign again when it is gone. Every write
//! of the leader is a transaction that holds only while `leader` is still attached to its
//! lease (fencing): a deposed leader's write is refused, and it learns it was deposed.
//!
//! etcd-client is async while the store trait is synchronous: the store runs its own small
//! runtime and callers wait for the answer (a local etcd answers in about a millisecond).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use parking_lot::Mutex;
use tokio::sync::watch;
use volley_core::{Result, VolleyError};

use super::etcd_url::{Target, parse};
use super::{FORMAT_VERSION, HISTORY_LIMIT, StateStore, StoredSession, decode, encode, key};
use crate::job::journal::{JournalWrite, RunningJob, Step};
use crate::views::JobSummary;

pub use super::lease::LEASE_TTL_SECS;
use super::lease::keep_alive;

/// Tries to reach etcd at start before giving up.
const CONNECT_TRIES: u32 = 5;

/// Most operations in one etcd transaction (etcd's `--max-txn-ops` defaults to 128).
const TXN_OPS: usize = 100;

/// Most bytes of keys and values in one etcd transaction (etcd's `--max-request-bytes`
/// defaults to 1.5 MiB).
const TXN_BYTES: usize = 1024 * 1024;

/// State in etcd, shared by the schedulers of one cluster.
pub struct EtcdStore {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    endpoints: String,
    prefix: String,
    /// The lease of this scheduler's leadership (None: not the leader).
    fence: Arc<Mutex<Option<i64>>>,
    /// Fired when the leadership is lost (the lease, or a write refused as deposed).
    lost: Mutex<Option<watch::Sender<bool>>>,
    next_step: AtomicU64,
}

fn etcd_err(endpoints: &str, e: etcd_client::Error) -> VolleyError {
    VolleyError::Internal(format!("etcd {endpoints}: {e}"))
}

impl EtcdStore {
    /// Connect to the etcd of `url`, trying [`CONNECT_TRIES`] times with backoff; an error
    /// naming it when it cannot be reached or holds state of a newer format.
    pub fn connect(url: &str) -> Result<Self> {
        let Target {
            endpoints,
            name,
            user,
        } = parse(url)?;
        let shown = endpoints.join(",");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("volley-etcd")
            .enable_all()
            .build()?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3));
        if let Some((user, password)) = user {
            options = options.with_user(user, password);
        }
        let prefix = format!("/volley/{name}/");
        let version_key = format!("{prefix}meta/format_version");
        let (tx, rx) = std::sync::mpsc::channel();
        let (eps, probe) = (endpoints.clone(), version_key.clone());
        runtime.spawn(async move {
            let mut last = String::new();
            for attempt in 0..CONNECT_TRIES {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                }
                match Client::connect(&eps, Some(options.clone())).await {
                    Ok(mut client) => match client.get(probe.as_str(), None).await {
                        Ok(answer) => {
                            let version = answer
                                .kvs()
                                .first()
                                .and_then(|kv| kv.value_str().ok()?.parse::<u32>().ok());
                            let _ = tx.send(Ok((client, version)));
                            return;
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e.to_string(),
                }
                // Trying again does not fix a wrong user or password.
                if last.contains("authentication failed") {
                    break;
                }
            }
            let _ = tx.send(Err(last));
        });
        let (client, version) = rx
            .recv()
            .map_err(|_| VolleyError::Internal("the etcd runtime stopped".into()))?
            .map_err(|e| {
                VolleyError::Config(format!(
                    "cannot reach etcd at {shown} after {CONNECT_TRIES} tries: {e}"
                ))
            })?;
        if let Some(version) = version.filter(|v| *v > FORMAT_VERSION) {
            return Err(VolleyError::Config(format!(
                "state in etcd {shown} ({version_key}) has format version {version}, newer than this scheduler's {FORMAT_VERSION}: run a newer volley"
            )));
        }
        Ok(Self {
            runtime: Some(runtime),
            client,
            endpoints: shown,
            prefix,
            fence: Arc::new(Mutex::new(None)),
            lost: Mutex::new(None),
            next_step: AtomicU64::new(0),
        })
    }

    /// Run `work` on the store's runtime and wait for it.
    fn block<T: Send + 'static>(
        &self,
        work: impl Future<Output = std::result::Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| VolleyError::Internal("the etcd store is closed".into()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = tx.send(work.await);
        });
        // On a worker of a multi-threaded runtime, let its other tasks move to other threads
        // while this one waits for etcd.
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let answer = if multi_threaded {
            tokio::task::block_in_place(|| rx.recv())
        } else {
            rx.recv()
        };
        answer
            .map_err(|_| VolleyError::Internal("the etcd runtime stopped".into()))?
            .map_err(|e| etcd_err(&self.endpoints, e))
    }

    fn leader_key(&self) -> String {
        format!("{}leader", self.prefix)
    }

    /// The URL of the scheduler leading now (None: no leader).
    pub fn leader(&self) -> Result<Option<String>> {
        let mut client = self.client.clone();
        let key = self.leader_key();
        let answer = self.block(async move { client.get(key, None).await })?;
        Ok(answer
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok().map(str::to_string)))
    }

    /// Try once to become the leader as `me` (this scheduler's URL). Ok(None) when it leads
    /// now (its writes are fenced by its lease, kept alive until `lost` fires); otherwise the
    /// current leader's URL.
    pub fn campaign(&self, me: &str) -> Result<Campaign> {
        let mut client = self.client.clone();
        let (key, me) = (self.leader_key(), me.to_string());
        let version_key = format!("{}meta/format_version", self.prefix);
        let (lease, won, leader) = self.block(async move {
            let lease = client.lease_grant(LEASE_TTL_SECS, None).await?.id();
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(
                        key.as_str(),
                        me.as_str(),
                        Some(etcd_client::PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::put(version_key.as_str(), FORMAT_VERSION.to_string(), None),
                ])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let answer = client.txn(txn).await?;
            let mut leader = None;
            for response in answer.op_responses() {
                if let etcd_client::TxnOpResponse::Get(get) = response {
                    leader = get
                        .kvs()
                        .first()
                        .and_then(|kv| kv.value_str().ok().map(str::to_string));
                }
            }
            if !answer.succeeded() {
                client.lease_revoke(lease).await?;
            }
            Ok((lease, answer.succeeded(), leader))
        })?;
        if !won {
            return Ok(Campaign::Standby(leader));
        }
        *self.fence.lock() = Some(lease);
        let (lost_tx, lost) = watch::channel(false);
        *self.lost.lock() = Some(lost_tx.clone());
        let mut client = self.client.clone();
        let fence = Arc::clone(&self.fence);
        let key = self.leader_key();
        if let Some(runtime) = &self.runtime {
            runtime.spawn(async move {
                let why = keep_alive(&mut client, lease, &key).await;
                tracing::error!(error = %why, "the scheduler lost its leadership");
                *fence.lock() = None;
                let _ = lost_tx.send(true);
            });
        }
        let ready = self.last_step().and_then(|last| {
            self.next_step.store(last + 1, Ordering::SeqCst);
            self.drop_orphan_steps()
        });
        if let Err(e) = ready {
            self.resign();
            return Err(e);
        }
        Ok(Campaign::Leader(lost))
    }

    /// Remove the steps of jobs not saved as running (the leader died between writing a job's
    /// first steps and the job itself).
    fn drop_orphan_steps(&self) -> Result<()> {
        let running: std::collections::HashSet<String> = self
            .keys("running/")?
            .into_iter()
            .filter_map(|k| k.rsplit('/').next().map(str::to_string))
            .collect();
        let steps = format!("{}steps/", self.prefix);
        let mut orphans: Vec<String> = self
            .keys("steps/")?
            .iter()
            .filter_map(|k| {
                k.strip_prefix(&steps)?
                    .split('/')
                    .next()
                    .map(str::to_string)
            })
            .filter(|job| !running.contains(job))
            .collect();
        orphans.dedup();
        let ops = orphans
            .into_iter()
            .map(|job| self.delete(format!("{steps}{job}/"), true))
            .collect();
        self.fenced(ops)
    }

    /// This scheduler was deposed: it writes nothing more and tells whoever waits on
    /// [`Campaign::Leader`].
    fn deposed(&self) {
        *self.fence.lock() = None;
        if let Some(lost) = self.lost.lock().take() {
            let _ = lost.send(true);
        }
    }

    /// The highest journal sequence number stored (0 when none).
    fn last_step(&self) -> Result<u64> {
        Ok(self
            .keys("steps/")?
            .iter()
            .filter_map(|k| k.rsplit('/').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0))
    }

    /// Every key under `dir` (full keys), in key order.
    fn keys(&self, dir: &str) -> Result<Vec<String>> {
        Ok(self.range(dir, true)?.into_iter().map(|(k, _)| k).collect())
    }

    /// Every (full key, value) under `dir` in key order, read in pages (a whole history in
    /// one answer could pass gRPC's message limit).
    fn range(&self, dir: &str, keys_only: bool) -> Result<Vec<(String, Vec<u8>)>> {
        const PAGE: i64 = 200;
        let prefix = format!("{}{dir}", self.prefix);
        // The first key after every key starting with `prefix` (which ends in '/').
        let mut end = prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let mut from = prefix.into_bytes();
        let mut all = Vec::new();
        loop {
            let mut client = self.client.clone();
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if keys_only {
                options = options.with_keys_only();
            }
            let start = from.clone();
            let answer = self.block(async move { client.get(start, Some(options)).await })?;
            for kv in answer.kvs() {
                all.push((
                    String::from_utf8_lossy(kv.key()).to_string(),
                    kv.value().to_vec(),
                ));
            }
            match answer.kvs().last() {
                Some(last) if answer.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// Apply `ops` (key, operation) as fenced transactions of at most [`TXN_OPS`] operations,
    /// a new one wherever a key repeats (etcd refuses one transaction touching a key twice).
    fn fenced(&self, ops: Vec<(String, TxnOp, usize)>) -> Result<()> {
        let lease = self.fence.lock().ok_or_else(|| {
            VolleyError::Grpc(tonic::Status::unavailable(format!(
                "this scheduler is not the leader of the cluster in etcd {}",
                self.endpoints
            )))
        })?;
        let mut chunks: Vec<Vec<TxnOp>> = Vec::new();
        let mut keys: Vec<String> = Vec::new();
        let mut bytes = 0;
        for (key, op, size) in ops {
            if size > TXN_BYTES {
                // etcd refuses requests over 1.5 MiB: such a record is not kept (a job step:
                // that stage runs again after a takeover).
                tracing::warn!(key, size, "a state record too big for etcd is not saved");
                continue;
            }
            let clash = keys
                .iter()
                .any(|k| k.starts_with(&key) || key.starts_with(k.as_str()));
            let full = chunks
                .last()
                .is_none_or(|c| c.len() >= TXN_OPS || bytes + size > TXN_BYTES);
            if full || clash {
                chunks.push(Vec::new());
                keys.clear();
                bytes = 0;
            }
            bytes += size;
            keys.push(key);
            if let Some(chunk) = chunks.last_mut() {
                chunk.push(op);
            }
        }
        for chunk in chunks {
            let mut client = self.client.clone();
            let leader = self.leader_key();
            let txn = Txn::new()
                .when([Compare::lease(leader.as_str(), CompareOp::Equal, lease)])
                .and_then(chunk);
            let answer = self.block(async move { client.txn(txn).await })?;
            if !answer.succeeded() {
                self.deposed();
                return Err(VolleyError::Grpc(tonic::Status::unavailable(format!(
                    "this scheduler was deposed: another one leads the cluster in etcd {} now; its write was refused",
                    self.endpoints
                ))));
            }
        }
        Ok(())
    }

    /// Values of every key under `dir` (keys relative to it), in key order.
    fn values(&self, dir: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let skip = self.prefix.len() + dir.len();
        Ok(self
            .range(dir, false)?
            .into_iter()
            .map(|(key, value)| (key.get(skip..).unwrap_or("").to_string(), value))
            .collect())
    }

    fn put(&self, key: String, bytes: Vec<u8>) -> (String, TxnOp, usize) {
        let size = key.len() + bytes.len();
        let op = TxnOp::put(key.as_str(), bytes, None);
        (key, op, size)
    }

    fn delete(&self, key: String, prefix: bool) -> (String, TxnOp, usize) {
        let options = prefix.then(|| etcd_client::DeleteOptions::new().with_prefix());
        let op = TxnOp::delete(key.as_str(), options);
        let size = key.len();
        (key, op, size)
    }
}

/// Outcome of one campaign.
pub enum Campaign {
    /// This scheduler leads; the receiver turns true when the leadership is lost.
    Leader(watch::Receiver<bool>),
    /// Another scheduler (at this URL, when known) leads.
    Standby(Option<String>),
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl StateStore for EtcdStore {
    fn record_finished(&self, jobs: &[JobSummary]) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::new();
        for job in jobs {
            let bytes = encode(job, &format!("job {}", job.id))?;
            ops.push(self.put(format!("{}history/{}", self.prefix, key(job)), bytes));
        }
        self.fenced(ops)?;
        let stored = self.keys("history/")?;
        let excess = stored.len().saturating_sub(HISTORY_LIMIT);
        let old = stored
            .into_iter()
            .take(excess)
            .map(|k| self.delete(k, false))
            .collect();
        self.fenced(old)
    }

    fn finished_jobs(&self) -> Result<Vec<JobSummary>> {
        let location = self.location();
        self.values("history/")?
            .iter()
            .map(|(_, v)| decode(v, &location))
            .collect()
    }

    fn save_session(&self, id: &str, session: &StoredSession) -> Result<()> {
        let bytes = encode(session, &format!("session {id}"))?;
        self.fenced(vec![
            self.put(format!("{}sessions/{id}", self.prefix), bytes),
        ])
    }

    fn forget_sessions(&self, ids: &[String]) -> Result<()> {
        let ops = ids
            .iter()
            .map(|id| self.delete(format!("{}sessions/{id}", self.prefix), false))
            .collect();
        self.fenced(ops)
    }

    fn sessions(&self) -> Result<Vec<(String, StoredSession)>> {
        let location = self.location();
        self.values("sessions/")?
            .into_iter()
            .map(|(id, v)| Ok((id, decode(&v, &location)?)))
            .collect()
    }

    fn journal(&self, writes: &[JournalWrite]) -> Result<()> {
        let mut ops = Vec::new();
        for write in writes {
            match write {
                JournalWrite::Save(id, job) => {
                    let bytes = encode(job, &format!("job {id}"))?;
                    ops.push(self.put(format!("{}running/{id}", self.prefix), bytes));
                }
                JournalWrite::Step(id, step) => {
                    let bytes = encode(step, &format!("a step of job {id}"))?;
                    let seq = self.next_step.fetch_add(1, Ordering::SeqCst);
                    ops.push(self.put(format!("{}steps/{id}/{seq:020}", self.prefix), bytes));
                }
                JournalWrite::Forget(ids) => {
                    for id in ids {
                        ops.push(self.delete(format!("{}running/{id}", self.prefix), false));
                        ops.push(self.delete(format!("{}steps/{id}/", self.prefix), true));
                    }
                }
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.fenced(ops)
    }

    fn running_jobs(&self) -> Result<Vec<(String, RunningJob)>> {
        let location = self.location();
        let mut jobs: std::collections::BTreeMap<String, RunningJob> = self
            .values("running/")?
            .into_iter()
            .map(|(id, v)| Ok((id, decode(&v, &location)?)))
            .collect::<Result<_>>()?;
        for (key, value) in self.values("steps/")? {
            let Some((id, _)) = key.split_once('/') else {
                continue;
            };
            if let Some(job) = jobs.get_mut(id) {
                job.steps.push(decode::<Step>(&value, &location)?);
            }
        }
        Ok(jobs.into_iter().collect())
    }

    fn durable(&self) -> bool {
        true
    }

    fn location(&self) -> String {
        format!("etcd {}", self.endpoints)
    }

    fn resign(&self) {
        let Some(lease) = self.fence.lock().take() else {
            return;
        };
        let mut client = self.client.clone();
        if let Err(e) = self.block(async move { client.lease_revoke(lease).await }) {
            tracing::warn!(error = %e, "cannot give up the leadership; a standby takes over when the lease expires");
        }
    }
}
