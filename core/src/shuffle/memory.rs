//! Small shuffle outputs held in the executor's memory instead of files.
//!
//! Creating a file costs a file system inode (on ext4 with many recently deleted files, a
//! scan of the inode bitmap) and a directory entry, and reading it back opens it again: for a
//! task that writes a few kilobytes that is most of its cost. A map task whose whole output
//! stays under a budget hands its Arrow IPC stream bytes to this store under the path the file
//! would have had; readers on the same executor take them from here and other readers fetch
//! them over Flight like files. The store is bounded: output that does not fit is written to
//! a file as before. Entries go with their job (`RemoveJobData`) or with the process.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::ipc::reader::StreamDecoder;
use parking_lot::Mutex;

use crate::Result;

/// Shuffle outputs held in memory, by path, with a cap on their total size.
#[derive(Debug, Default)]
pub struct MemoryShuffle {
    capacity: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    bytes: usize,
    outputs: HashMap<String, Bytes>,
}

impl MemoryShuffle {
    /// A store that holds at most `capacity` bytes (0 holds nothing).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            held: Mutex::new(Held::default()),
        })
    }

    /// Keep `bytes` as the output at `path`; gives them back when the store is full.
    pub fn try_insert(&self, path: &Path, bytes: Vec<u8>) -> std::result::Result<(), Vec<u8>> {
        let mut held = self.held.lock();
        if held.bytes + bytes.len() > self.capacity {
            return Err(bytes);
        }
        held.bytes += bytes.len();
        let old = held
            .outputs
            .insert(path.display().to_string(), Bytes::from(bytes));
        if let Some(old) = old {
            held.bytes -= old.len();
        }
        Ok(())
    }

    /// The output held at `path`.
    pub fn get(&self, path: &str) -> Option<Bytes> {
        self.held.lock().outputs.get(path).cloned()
    }

    /// Drop every output under `dir` (a job's folder); returns how many went.
    pub fn remove_under(&self, dir: &Path) -> usize {
        let mut held = self.held.lock();
        let before = held.outputs.len();
        let mut freed = 0;
        held.outputs.retain(|path, bytes| {
            let keep = !Path::new(path).starts_with(dir);
            if !keep {
                freed += bytes.len();
            }
            keep
        });
        held.bytes -= freed;
        before - held.outputs.len()
    }

    /// Paths of the outputs held now.
    pub fn paths(&self) -> Vec<String> {
        self.held.lock().outputs.keys().cloned().collect()
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held.lock().bytes
    }

    /// Outputs held now.
    pub fn len(&self) -> usize {
        self.held.lock().outputs.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The batches of an Arrow IPC stream held in memory (they share its buffers).
pub fn decode_stream(bytes: Bytes) -> Result<Vec<RecordBatch>> {
    let mut decoder = StreamDecoder::new();
    let mut buffer = Buffer::from(bytes);
    let mut batches = Vec::new();
    while !buffer.is_empty() {
        if let Some(batch) = decoder.decode(&mut buffer)? {
            batches.push(batch);
        }
    }
    decoder.finish()?;
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_bounded_and_emptied_by_job() {
        let store = MemoryShuffle::new(10);
        assert!(
            store
                .try_insert(Path::new("/w/j1/1/0-0/part-0.arrow"), vec![0; 6])
                .is_ok()
        );
        let refused = store.try_insert(Path::new("/w/j2/1/0-0/part-0.arrow"), vec![0; 6]);
        assert_eq!(refused.err().map(|b| b.len()), Some(6), "over the cap");
        assert!(
            store
                .try_insert(Path::new("/w/j2/1/0-0/part-0.arrow"), vec![0; 4])
                .is_ok()
        );
        assert_eq!(store.held_bytes(), 10);
        assert_eq!(store.remove_under(Path::new("/w/j1")), 1);
        assert_eq!(store.held_bytes(), 4);
        assert!(store.get("/w/j1/1/0-0/part-0.arrow").is_none());
        assert_eq!(
            store.get("/w/j2/1/0-0/part-0.arrow").map(|b| b.len()),
            Some(4)
        );
    }
}
