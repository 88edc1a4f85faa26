//! Reading shuffle partitions: local files directly, remote ones over Arrow Flight `do_get`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use arrow_flight::Ticket;
use arrow_flight::flight_service_client::FlightServiceClient;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::ipc::reader::StreamDecoder;
use datafusion::error::DataFusionError;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::transport::Channel;

use super::PartitionLocation;
use super::memory::MemoryShuffle;
use crate::security::Security;
use crate::{Result, VolleyError};

/// Deadline for a shuffle fetch to start and for each of its messages.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A process-wide cache of gRPC channels to executors' Flight services.
pub struct FlightChannels;

static CHANNELS: LazyLock<Mutex<HashMap<String, Channel>>> = LazyLock::new(Default::default);

impl FlightChannels {
    /// A (shared, lazily connected) channel to `host:port`, with TLS when `security` has it.
    pub fn get(security: &Security, host: &str, port: u16) -> Result<Channel> {
        let address = security.url(host, port);
        let mut map = CHANNELS
            .lock()
            .map_err(|_| VolleyError::Internal("flight channel cache poisoned".to_string()))?;
        if let Some(channel) = map.get(&address) {
            return Ok(channel.clone());
        }
        let channel = security.endpoint(&address)?.connect_lazy();
        map.insert(address, channel.clone());
        Ok(channel)
    }

    /// Forget a channel after a failure so the next call dials again.
    pub fn forget(security: &Security, host: &str, port: u16) {
        if let Ok(mut map) = CHANNELS.lock() {
            map.remove(&security.url(host, port));
        }
    }
}

/// Read buffer of local shuffle files (messages larger than it are read directly).
const LOCAL_READ_BUFFER: usize = 256 * 1024;

/// Read up to `limit` bytes into a fresh buffer (not zero-filled first).
pub fn read_chunk(file: &mut File, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut chunk = Vec::with_capacity(usize::try_from(limit).unwrap_or(usize::MAX));
    file.take(limit).read_to_end(&mut chunk)?;
    Ok(chunk)
}

/// Next IPC message of a stream (continuation marker, metadata, body) in a buffer of its own,
/// or None at the end of the file. One buffer per message keeps each decoded batch's memory
/// its own: batches sliced from one big chunk would each be charged for the whole chunk by
/// memory pools (sorts, joins under `--memory-limit`). No message is larger than `file_len`,
/// the whole file: a corrupt length is an error, never a huge allocation.
fn read_message(file: &mut impl Read, file_len: u64) -> Result<Option<Vec<u8>>> {
    let corrupt = |what: &str, len: u64| {
        VolleyError::Internal(format!(
            "corrupt shuffle file: {what} of {len} bytes in a file of {file_len} bytes"
        ))
    };
    let mut prefix = [0u8; 8];
    match file.read_exact(&mut prefix[..4]) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (prefix_len, metadata_len) = if prefix[..4] == [0xff; 4] {
        file.read_exact(&mut prefix[4..])?;
        (
            8,
            i32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]),
        )
    } else {
        (
            4,
            i32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]),
        )
    };
    let metadata_len = usize::try_from(metadata_len)
        .map_err(|_| VolleyError::Internal("negative IPC metadata length".to_string()))?;
    if metadata_len as u64 > file_len {
        return Err(corrupt("IPC metadata", metadata_len as u64));
    }
    if metadata_len == 0 {
        return Ok(Some(prefix[..prefix_len].to_vec()));
    }
    let mut message = Vec::with_capacity(prefix_len + metadata_len);
    message.extend_from_slice(&prefix[..prefix_len]);
    message.resize(prefix_len + metadata_len, 0);
    file.read_exact(&mut message[prefix_len..])?;
    let header = datafusion::arrow::ipc::root_as_message(&message[prefix_len..])
        .map_err(|e| VolleyError::Internal(format!("bad IPC message in shuffle file: {e}")))?;
    let body_len = header.bodyLength();
    let batch = header
        .header_as_record_batch()
        .or_else(|| header.header_as_dictionary_batch().and_then(|d| d.data()));
    let compressed = batch.is_some_and(|b| b.compression().is_some());
    let buffers: Vec<(i64, i64)> = batch
        .and_then(|b| b.buffers())
        .map(|buffers| buffers.iter().map(|b| (b.offset(), b.length())).collect())
        .unwrap_or_default();
    let body_len = u64::try_from(body_len)
        .map_err(|_| VolleyError::Internal("negative IPC body length".to_string()))?;
    if body_len > file_len {
        return Err(corrupt("an IPC message body", body_len));
    }
    let body_len = usize::try_from(body_len).map_err(|_| corrupt("an IPC body", body_len))?;
    let start = message.len();
    message.reserve_exact(body_len);
    message.resize(start + body_len, 0);
    file.read_exact(&mut message[start..])?;
    check_buffers(&message[start..], &buffers, compressed)?;
    Ok(Some(message))
}

/// Largest buffer a compressed shuffle message may inflate to. Arrow allocates what a
/// compressed buffer's 8-byte prefix declares before decompressing it; a corrupt prefix would
/// ask for terabytes and abort the process.
pub const MAX_INFLATED_BUFFER: u64 = 1 << 30;

/// Every buffer of a message lies inside its body (arrow panics on one that does not), and
/// when `compressed`, declares at most [`MAX_INFLATED_BUFFER`] bytes (or -1: stored as is).
fn check_buffers(body: &[u8], buffers: &[(i64, i64)], compressed: bool) -> Result<()> {
    for &(offset, length) in buffers {
        let (Ok(offset), Ok(length)) = (usize::try_from(offset), usize::try_from(length)) else {
            return Err(VolleyError::Internal(
                "corrupt shuffle file: negative buffer offset or length".to_string(),
            ));
        };
        if offset.saturating_add(length) > body.len() {
            return Err(VolleyError::Internal(
                "corrupt shuffle file: buffer outside its message".to_string(),
            ));
        }
        if length == 0 || !compressed {
            continue;
        }
        let prefix = offset
            .checked_add(8)
            .and_then(|end| body.get(offset..end))
            .ok_or_else(|| {
                VolleyError::Internal(
                    "corrupt shuffle file: buffer outside its message".to_string(),
                )
            })?;
        let mut declared = [0u8; 8];
        declared.copy_from_slice(prefix);
        let declared = i64::from_le_bytes(declared);
        let max = i64::try_from(MAX_INFLATED_BUFFER).unwrap_or(i64::MAX);
        if declared != -1 && !(0..=max).contains(&declared) {
            return Err(VolleyError::Internal(format!(
                "corrupt shuffle file: a compressed buffer declares {declared} bytes (at most {MAX_INFLATED_BUFFER})"
            )));
        }
    }
    Ok(())
}

/// Stream the batches of a local shuffle file, decoding it message by message with an IPC
/// stream decoder on a blocking thread (batches share their message's memory).
pub fn read_local_file(path: PathBuf) -> BoxStream<'static, Result<RecordBatch>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<RecordBatch>>(2);
    tokio::task::spawn_blocking(move || {
        // A panic while decoding (a bug on corrupt input) ends the stream with an error, not
        // silently early.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
            let file = File::open(&path)?;
            let file_len = file.metadata()?.len();
            let mut file = std::io::BufReader::with_capacity(LOCAL_READ_BUFFER, file);
            let mut decoder = StreamDecoder::new();
            while let Some(message) = read_message(&mut file, file_len)? {
                let mut buffer = Buffer::from_vec(message);
                while !buffer.is_empty() {
                    if let Some(batch) = decoder.decode(&mut buffer)?
                        && tx.blocking_send(Ok(batch)).is_err()
                    {
                        return Ok(());
                    }
                }
            }
            decoder.finish()?;
            Ok(())
        }))
        .unwrap_or_else(|panic| {
            Err(VolleyError::Internal(format!(
                "reading shuffle file {} panicked: {}",
                path.display(),
                crate::stack::panic_message(panic.as_ref())
            )))
        });
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

async fn fetch_remote(
    location: &PartitionLocation,
    security: &Security,
) -> Result<BoxStream<'static, Result<RecordBatch>>> {
    // A cached channel may point at a previous process on the same port (an executor that
    // restarted): on failure dial once more on a fresh channel before giving up.
    let mut attempt = 0;
    let stream = loop {
        let channel = FlightChannels::get(security, &location.host, location.flight_port)?;
        let mut client =
            FlightServiceClient::with_interceptor(channel, security.client_interceptor()?)
                .max_decoding_message_size(64 * 1024 * 1024);
        let ticket = Ticket::new(crate::grant::ticket(&location.path, &location.grant));
        match tokio::time::timeout(FETCH_TIMEOUT, client.do_get(ticket)).await {
            Ok(Ok(response)) => break response.into_inner(),
            Ok(Err(status)) => {
                FlightChannels::forget(security, &location.host, location.flight_port);
                let unauthenticated = status.code() == tonic::Code::Unauthenticated;
                if attempt >= 1 || unauthenticated {
                    return Err(VolleyError::Grpc(status));
                }
                attempt += 1;
            }
            Err(_) => {
                return Err(VolleyError::Internal(format!(
                    "no answer within {} s",
                    FETCH_TIMEOUT.as_secs()
                )));
            }
        }
    };
    // The messages carry the shuffle file's Arrow IPC stream bytes; decode them as they come.
    // A stalled peer (stopped process, dead link) must not hold the task forever.
    let chunks = tokio_stream::StreamExt::timeout(stream, FETCH_TIMEOUT);
    let batches = futures::stream::unfold(
        (
            Box::pin(chunks),
            StreamDecoder::new(),
            Vec::<RecordBatch>::new(),
            false,
        ),
        |(mut chunks, mut decoder, mut ready, mut done)| async move {
            loop {
                if !ready.is_empty() {
                    let batch = ready.remove(0);
                    return Some((Ok(batch), (chunks, decoder, ready, done)));
                }
                if done {
                    return None;
                }
                let data = match chunks.next().await {
                    None => {
                        done = true;
                        if let Err(e) = decoder.finish() {
                            return Some((
                                Err(VolleyError::from(e)),
                                (chunks, decoder, ready, done),
                            ));
                        }
                        continue;
                    }
                    Some(Err(_)) => {
                        done = true;
                        let e = VolleyError::Internal(format!(
                            "shuffle stream stalled for {} s",
                            FETCH_TIMEOUT.as_secs()
                        ));
                        return Some((Err(e), (chunks, decoder, ready, done)));
                    }
                    Some(Ok(Err(status))) => {
                        done = true;
                        return Some((
                            Err(VolleyError::Grpc(status)),
                            (chunks, decoder, ready, done),
                        ));
                    }
                    Some(Ok(Ok(data))) => data,
                };
                let mut buffer = Buffer::from(data.data_body);
                while !buffer.is_empty() {
                    match decoder.decode(&mut buffer) {
                        Ok(Some(batch)) => ready.push(batch),
                        Ok(None) => {}
                        Err(e) => {
                            done = true;
                            return Some((
                                Err(VolleyError::from(e)),
                                (chunks, decoder, ready, done),
                            ));
                        }
                    }
                }
            }
        },
    );
    Ok(batches.boxed())
}

/// Who is reading: decides which shuffle files are read from disk instead of over Flight.
#[derive(Debug, Clone)]
pub struct LocalReads {
    /// The reading executor: its own files are always read from disk.
    pub executor_id: String,
    /// Its advertised host: files of executors advertising the same host are read from disk
    /// when this process provably shares the producer's file system (the producer's marker
    /// is in the file's work dir), over Flight otherwise.
    pub host: String,
    /// Its in-memory shuffle outputs: its own ones are read from there.
    pub memory: Option<Arc<MemoryShuffle>>,
}

impl LocalReads {
    /// The reads of a task running with `context` (its executor's [`crate::config::TaskEnv`]),
    /// and the credentials of its fetches from other executors.
    pub fn of_task(
        context: &datafusion::execution::TaskContext,
    ) -> (Option<LocalReads>, crate::security::Security) {
        let env = context
            .session_config()
            .get_extension::<crate::config::TaskEnv>();
        let local = env.as_ref().map(|env| LocalReads {
            executor_id: env.executor_id.clone(),
            host: env.host.clone(),
            memory: env.memory.clone(),
        });
        (
            local,
            env.map(|env| env.security.clone()).unwrap_or_default(),
        )
    }

    /// True when `location` is read from disk rather than fetched over Flight.
    pub fn reads_from_disk(&self, location: &PartitionLocation) -> bool {
        !location.in_memory
            && (self.executor_id == location.executor_id
                || (self.host == location.host && super::location::written_here(location)))
    }

    /// True when `location` is this executor's own output held in its memory.
    pub fn reads_from_memory(&self, location: &PartitionLocation) -> bool {
        location.in_memory && self.executor_id == location.executor_id && self.memory.is_some()
    }
}

/// The batches of an output held in `store`; one that is gone (its job's data was removed)
/// is an error like a missing file.
fn read_memory(
    store: &MemoryShuffle,
    path: &str,
) -> Result<BoxStream<'static, Result<RecordBatch>>> {
    let bytes = store
        .get(path)
        .ok_or_else(|| VolleyError::Internal(format!("shuffle output {path} is not held here")))?;
    let batches = super::memory::decode_stream(bytes)?;
    Ok(futures::stream::iter(batches.into_iter().map(Ok)).boxed())
}

/// Batches of one shuffle file; files on this host are read without the network.
/// Any failure becomes a typed [`VolleyError::FetchFailed`] naming the producer.
pub fn read_partition_location(
    location: PartitionLocation,
    local: Option<LocalReads>,
    stage_id: u32,
    security: Security,
) -> BoxStream<'static, datafusion::error::Result<RecordBatch>> {
    let fetch_failed = {
        let location = location.clone();
        move |e: VolleyError| {
            DataFusionError::External(Box::new(VolleyError::FetchFailed {
                executor_id: location.executor_id.clone(),
                stage_id,
                map_partition: location.map_partition,
                message: e.to_string(),
            }))
        }
    };
    let is_local = local.as_ref().is_some_and(|l| l.reads_from_disk(&location));
    let memory = local
        .filter(|l| l.reads_from_memory(&location))
        .and_then(|l| l.memory);
    let stream = async move {
        if let Some(store) = memory {
            read_memory(&store, &location.path)
        } else if is_local {
            Ok(read_local_file(PathBuf::from(&location.path)))
        } else {
            fetch_remote(&location, &security).await
        }
    };
    let on_error = fetch_failed.clone();
    futures::stream::once(stream)
        .map(move |opened| match opened {
            Ok(s) => s.map_err(fetch_failed.clone()).boxed(),
            Err(e) => futures::stream::once(futures::future::ready(Err(on_error(e)))).boxed(),
        })
        .flatten()
        .boxed()
}
