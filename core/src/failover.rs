//! L1: the schedulers a client or an executor talks to — a leader and its standbys, given as
//! one comma-separated `--scheduler` list — and which one it uses now; every caller picks its
//! client by [`SchedulerUrls::current`] at each call. A scheduler that cannot be reached means
//! "try the next one"; a standby refuses every call with "not the leader", naming the leader
//! ([`standby_refusal`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Result, VolleyError};

/// Metadata key of the leader's URL in a standby's refusals.
pub const LEADER_METADATA: &str = "volley-leader";

/// How a standby's refusal begins.
const NOT_THE_LEADER: &str = "not the leader";

/// A standby's refusal of every call, naming the leader (`None`: not elected yet).
pub fn standby_refusal(leader: Option<&str>) -> tonic::Status {
    let mut status = tonic::Status::unavailable(format!(
        "{NOT_THE_LEADER}; the leader is {}",
        leader.unwrap_or("not elected yet")
    ));
    if let Some(value) = leader.and_then(|l| l.parse().ok()) {
        status.metadata_mut().insert(LEADER_METADATA, value);
    }
    status
}

/// True when `status` is a standby's refusal (the call ran nothing).
pub fn refused_by_standby(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message().starts_with(NOT_THE_LEADER)
}

/// The leader a standby's refusal names.
pub fn leader_named(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(LEADER_METADATA)?.to_str().ok()
}

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

    /// Index of `url` in the list.
    pub fn index_of(&self, url: &str) -> Option<usize> {
        let url = url.trim_end_matches('/');
        self.urls
            .iter()
            .position(|u| u.trim_end_matches('/') == url)
    }

    /// Use the scheduler at `index`.
    pub fn set_current(&self, index: usize) {
        self.current
            .store(index % self.urls.len(), Ordering::SeqCst);
    }

    /// Use the scheduler at `url` (named by a standby as the leader); false when it is not
    /// in the list.
    pub fn point_to(&self, url: &str) -> bool {
        match self.index_of(url) {
            Some(index) => {
                self.set_current(index);
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
        let refusal = standby_refusal(Some("http://c:3"));
        assert!(refused_by_standby(&refusal));
        assert_eq!(leader_named(&refusal), Some("http://c:3"));
        assert!(!refused_by_standby(&tonic::Status::unavailable(
            "connection refused"
        )));
        let one = SchedulerUrls::parse("http://a:1").unwrap();
        assert!(!one.advance(0));
        assert!(SchedulerUrls::parse(" , ").is_err());
    }
}
