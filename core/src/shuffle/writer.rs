//! Writes one map task's output as compressed Arrow IPC stream files, one per output bucket.
//!
//! Partitioning and IPC encoding are CPU-bound, so they run on rayon's pool and the tokio
//! threads only pull batches from the input stream. A task whose whole output stays under its
//! memory budget writes no file: its buckets go to the executor's [`MemoryShuffle`].

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::BatchCoalescer;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use datafusion::physical_plan::metrics;
use datafusion::physical_plan::repartition::BatchPartitioner;
use datafusion::physical_plan::{Partitioning, SendableRecordBatchStream};
use futures::StreamExt;

use super::memory::MemoryShuffle;
use crate::{Result, VolleyError};

/// One file written by a map task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenPartition {
    /// Output bucket the file belongs to.
    pub output_partition: u32,
    /// Where it is.
    pub path: PathBuf,
    /// Rows written.
    pub num_rows: u64,
    /// Bytes on disk (or in memory).
    pub num_bytes: u64,
    /// Held in the executor's memory, not in a file.
    pub in_memory: bool,
}

/// Where a bucket's IPC stream goes: memory until the task's budget is spent, then its file.
enum Sink {
    Memory(Vec<u8>),
    File(BufWriter<File>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Memory(bytes) => bytes.write(buf),
            Sink::File(file) => file.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Memory(_) => Ok(()),
            Sink::File(file) => file.flush(),
        }
    }
}

impl Sink {
    fn buffered(&self) -> usize {
        match self {
            Sink::Memory(bytes) => bytes.len(),
            Sink::File(_) => 0,
        }
    }
}

/// Open the file at `path` (creating its folder) with `head` already written to it.
fn spill(path: &Path, head: &[u8]) -> Result<BufWriter<File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = BufWriter::with_capacity(256 * 1024, private_file(path)?);
    file.write_all(head)?;
    Ok(file)
}

struct Bucket {
    path: PathBuf,
    coalescer: BatchCoalescer,
    writer: StreamWriter<Sink>,
    num_rows: u64,
}

impl Bucket {
    fn push(&mut self, batch: RecordBatch) -> Result<()> {
        self.num_rows += batch.num_rows() as u64;
        self.coalescer.push_batch(batch)?;
        while let Some(done) = self.coalescer.next_completed_batch() {
            self.writer.write(&done)?;
        }
        Ok(())
    }

    /// Move what is buffered in memory to the bucket's file.
    fn spill(&mut self) -> Result<()> {
        let sink = self.writer.get_mut();
        if let Sink::Memory(bytes) = sink {
            *sink = Sink::File(spill(&self.path, bytes)?);
        }
        Ok(())
    }

    fn finish(
        mut self,
        output_partition: u32,
        memory: Option<&MemoryShuffle>,
    ) -> Result<WrittenPartition> {
        self.coalescer.finish_buffered_batch()?;
        while let Some(done) = self.coalescer.next_completed_batch() {
            self.writer.write(&done)?;
        }
        self.writer.finish()?;
        let file = match self.writer.into_inner()? {
            Sink::Memory(bytes) => {
                let num_bytes = bytes.len() as u64;
                let refused = match memory {
                    Some(store) => store.try_insert(&self.path, bytes),
                    None => Err(bytes),
                };
                match refused {
                    Ok(()) => {
                        return Ok(WrittenPartition {
                            output_partition,
                            path: self.path,
                            num_rows: self.num_rows,
                            num_bytes,
                            in_memory: true,
                        });
                    }
                    // The store is full: the bytes go to the file after all.
                    Err(bytes) => spill(&self.path, &bytes)?,
                }
            }
            Sink::File(file) => file,
        };
        // No fsync: shuffle files only need to outlive this executor process, and a crashed
        // machine loses its executor (and its output) anyway.
        let mut file = file;
        file.flush()?;
        let num_bytes = std::fs::metadata(&self.path)?.len();
        Ok(WrittenPartition {
            output_partition,
            path: self.path,
            num_rows: self.num_rows,
            num_bytes,
            in_memory: false,
        })
    }
}

/// A task's memory budget for its output and the store it goes to.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    /// The executor's store.
    pub store: Arc<MemoryShuffle>,
    /// Most bytes of IPC output (all buckets together) a task keeps in memory.
    pub task_bytes: usize,
}

/// Splits a map task's batches into buckets and writes each bucket to its own file.
pub struct ShuffleFileWriter {
    dir: PathBuf,
    schema: SchemaRef,
    partitioner: Option<BatchPartitioner>,
    buckets: Vec<Option<Bucket>>,
    batch_size: usize,
    compression: Option<CompressionType>,
    /// Where output under budget goes; None (or spent) writes files.
    memory: Option<MemoryBudget>,
}

impl ShuffleFileWriter {
    /// A writer into `dir` (created when the first file is). `partitioning` None writes
    /// everything to bucket 0.
    pub fn try_new(
        dir: PathBuf,
        schema: SchemaRef,
        partitioning: Option<Partitioning>,
        input_partition: usize,
        num_input_partitions: usize,
        batch_size: usize,
        compression: Option<CompressionType>,
    ) -> Result<Self> {
        let (partitioner, count) = match partitioning {
            Some(p) => {
                let count = p.partition_count();
                let partitioner = BatchPartitioner::try_new(
                    p,
                    metrics::Time::new(),
                    input_partition,
                    num_input_partitions,
                )?;
                (Some(partitioner), count)
            }
            None => (None, 1),
        };
        Ok(Self {
            dir,
            schema,
            partitioner,
            buckets: (0..count).map(|_| None).collect(),
            batch_size: batch_size.max(1),
            compression,
            memory: None,
        })
    }

    /// Keep output in `budget.store` while all buckets together stay under its budget.
    pub fn with_memory(mut self, budget: Option<MemoryBudget>) -> Self {
        self.memory = budget.filter(|b| b.task_bytes > 0);
        self
    }

    /// Once the buckets buffered in memory pass the budget, all of them go to files.
    fn check_budget(&mut self) -> Result<()> {
        let Some(budget) = &self.memory else {
            return Ok(());
        };
        let buffered: usize = self
            .buckets
            .iter()
            .flatten()
            .map(|b| b.writer.get_ref().buffered())
            .sum();
        if buffered > budget.task_bytes {
            self.memory = None;
            for bucket in self.buckets.iter_mut().flatten() {
                bucket.spill()?;
            }
        }
        Ok(())
    }

    fn bucket(&mut self, index: usize) -> Result<&mut Bucket> {
        let slot = self
            .buckets
            .get_mut(index)
            .ok_or_else(|| VolleyError::Internal(format!("bucket {index} out of range")))?;
        if slot.is_none() {
            let path = self.dir.join(format!("part-{index}.arrow"));
            let options = IpcWriteOptions::default().try_with_compression(self.compression)?;
            let sink = match self.memory {
                Some(_) => Sink::Memory(Vec::new()),
                None => Sink::File(spill(&path, &[])?),
            };
            let writer = StreamWriter::try_new_with_options(sink, &self.schema, options)?;
            *slot = Some(Bucket {
                path,
                coalescer: BatchCoalescer::new(
                    std::sync::Arc::clone(&self.schema),
                    self.batch_size,
                ),
                writer,
                num_rows: 0,
            });
        }
        slot.as_mut()
            .ok_or_else(|| VolleyError::Internal("bucket vanished".to_string()))
    }

    /// Partition and write one batch.
    pub fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        match self.partitioner.take() {
            None => self.bucket(0)?.push(batch)?,
            Some(mut partitioner) => {
                let mut pieces = Vec::new();
                let result = partitioner.partition(batch, |index, piece| {
                    pieces.push((index, piece));
                    Ok(())
                });
                self.partitioner = Some(partitioner);
                result?;
                for (index, piece) in pieces {
                    if piece.num_rows() > 0 {
                        self.bucket(index)?.push(piece)?;
                    }
                }
            }
        }
        self.check_budget()
    }

    /// Flush every bucket; returns the files written (buckets with no rows write no file).
    pub fn finish(self) -> Result<Vec<WrittenPartition>> {
        let mut written = Vec::new();
        let memory = self.memory.as_ref().map(|b| b.store.as_ref());
        for (index, bucket) in self.buckets.into_iter().enumerate() {
            if let Some(bucket) = bucket {
                let index = u32::try_from(index)
                    .map_err(|_| VolleyError::Internal("too many buckets".to_string()))?;
                written.push(bucket.finish(index, memory)?);
            }
        }
        Ok(written)
    }

    /// The directory the files go to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Drain `stream` into this writer, doing the CPU work on rayon's pool.
    pub async fn write_stream(
        self,
        mut stream: SendableRecordBatchStream,
    ) -> Result<Vec<WrittenPartition>> {
        let mut writer = self;
        let mut rows = 0;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            rows += batch.num_rows();
            if batch.num_rows() < INLINE_ROWS {
                // Handing a few rows to rayon costs more (a worker woken, spinning, a task
                // switch back) than partitioning and encoding them here.
                writer.write(batch)?;
            } else {
                writer = run_on_rayon(move || writer.write(batch).map(|()| writer)).await??;
            }
        }
        if rows < INLINE_ROWS {
            return writer.finish();
        }
        run_on_rayon(move || writer.finish()).await?
    }
}

/// Batches (and whole outputs) of fewer rows are written on the calling thread.
const INLINE_ROWS: usize = 1024;

/// Run CPU-bound work on rayon's pool and await its result from async code.
pub async fn run_on_rayon<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        // The receiver only goes away when the task was cancelled; nothing to report then.
        let _ = tx.send(work());
    });
    rx.await
        .map_err(|_| VolleyError::Internal("rayon worker dropped its result".to_string()))
}

/// Create a shuffle file readable by its owner only (0600 on Unix).
fn private_file(path: &std::path::Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Encode batches as one Arrow IPC stream in memory (small results: DDL, EXPLAIN, inline jobs).
pub fn ipc_bytes(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut writer = StreamWriter::try_new(Vec::new(), schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    Ok(writer.into_inner()?)
}
