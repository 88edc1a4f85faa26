//! L1: the schedulers an executor talks to — a leader and its standbys, given as one
//! comma-separated `--scheduler` list — and which one it uses now. Standbys sharing state in
//! etcd listen only once they lead, so a scheduler that cannot be reached means "try the
//! next one"; every caller picks its client by [`SchedulerUrls::current`] at each call.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Result, VolleyError};

/// Scheduler URLs and the index of the one in use.
#[derive(Debug)]
pub struct SchedulerUrls {
    urls: Vec<String>,
    current: AtomicUsize,
}

impl SchedulerUrls {
    /// Parse `http://a:50050,http://b:50050`.
    pub fn parse(list: &str) -> Result<Self> {
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if urls.is_empty() {
            return Err(VolleyError::Config(format!("no scheduler URL in {list:?}")));
        }
        Ok(Self {
            urls,
            current: AtomicUsize::new(0),
        })
    }

    /// Every URL, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Index of the scheduler in use.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::SeqCst) % self.urls.len()
    }

    /// URL of the scheduler in use.
    pub fn current_url(&self) -> &str {
        &self.urls[self.current()]
    }

    /// Use the scheduler at `url` (named by a standby as the leader); false when it is not
    /// in the list.
    pub fn point_to(&self, url: &str) -> bool {
        let url = url.trim_end_matches('/');
        match self
            .urls
            .iter()
            .position(|u| u.trim_end_matches('/') == url)
        {
            Some(index) => {
                self.current.store(index, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// The scheduler at `failed` could not be reached: move on to the next one (unless another
    /// caller already did). False when there is no other.
    pub fn advance(&self, failed: usize) -> bool {
        if self.urls.len() < 2 {
            return false;
        }
        let next = (failed + 1) % self.urls.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::SeqCst, Ordering::SeqCst);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_on_round_the_list_once_per_failure() {
        let urls = SchedulerUrls::parse("http://a:1, http://b:2,,http://c:3").unwrap();
        assert_eq!(urls.urls().len(), 3);
        assert_eq!(urls.current_url(), "http://a:1");
        assert!(urls.advance(0));
        // A second caller that saw the same failure does not skip a scheduler.
        assert!(urls.advance(0));
        assert_eq!(urls.current_url(), "http://b:2");
        urls.advance(1);
        urls.advance(2);
        assert_eq!(urls.current_url(), "http://a:1");
        assert!(urls.point_to("http://c:3/"));
        assert_eq!(urls.current_url(), "http://c:3");
        assert!(!urls.point_to("http://elsewhere:1"));
        let one = SchedulerUrls::parse("http://a:1").unwrap();
        assert!(!one.advance(0));
        assert!(SchedulerUrls::parse(" , ").is_err());
    }
}
