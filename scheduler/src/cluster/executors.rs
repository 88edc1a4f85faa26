//! Executors as the scheduler sees them, each with a circuit breaker guarding task placement.

use std::time::{Duration, Instant};

/// A registered executor.
#[derive(Debug, Clone)]
pub struct ExecutorInfo {
    /// Executor id (new on every registration).
    pub id: String,
    /// Host its gRPC and Flight services listen on.
    pub host: String,
    /// Port of its gRPC + Flight server.
    pub port: u16,
    /// Task slots.
    pub slots: u32,
    /// Cores its tasks share (as many as its slots unless it said more).
    pub cores: u32,
    /// Slots not taken by tasks this scheduler launched.
    pub free_slots: u32,
    /// Last heartbeat or registration.
    pub last_seen: Instant,
    /// False once declared lost.
    pub alive: bool,
    /// Tasks that finished on it.
    pub completed_tasks: u64,
    /// Tasks that failed on it.
    pub failed_tasks: u64,
    /// Tasks running on it, as its last heartbeat said.
    pub reported_running: u32,
    /// Circuit breaker guarding task placement on this executor.
    pub breaker: Breaker,
    /// Shutting down gracefully: running tasks finish, no new ones come.
    pub draining: bool,
    /// Secret of its registration: only the executor itself knows it.
    pub secret: String,
}

impl ExecutorInfo {
    /// A live executor registered now.
    pub fn new(id: String, host: String, port: u16, slots: u32, secret: String) -> Self {
        ExecutorInfo {
            id,
            host,
            port,
            slots,
            cores: slots,
            free_slots: slots,
            last_seen: Instant::now(),
            alive: true,
            completed_tasks: 0,
            failed_tasks: 0,
            reported_running: 0,
            breaker: Breaker::default(),
            draining: false,
            secret,
        }
    }

    /// May tasks be placed here now?
    pub fn accepts_tasks(&self) -> bool {
        self.alive && !self.draining && self.free_slots > 0 && self.breaker.allows()
    }

    /// A slot taken by a task of this scheduler is free again.
    pub fn free_slot(&mut self) {
        self.free_slots = (self.free_slots + 1).min(self.slots);
    }

    /// What users see: alive, draining, circuit open or lost.
    pub fn status(&self) -> &'static str {
        if !self.alive {
            "lost"
        } else if self.draining {
            "draining"
        } else if !self.breaker.allows() {
            "circuit open"
        } else {
            "alive"
        }
    }
}

/// A per-executor circuit breaker: after [`Breaker::THRESHOLD`] consecutive failures (failed
/// launches, retryable task failures) no tasks go to the executor for [`Breaker::COOL_DOWN`];
/// then one probe task may go (half-open); its success closes the breaker, its failure
/// opens it again.
///
/// ```text
/// Closed{n} ──failure, n+1 = THRESHOLD──▶ Open{until} ──COOL_DOWN passes──▶ (half-open)
///    ▲                                       ▲                                │ probe placed
///    └────────────── success ────────────────┴───────── probe failed ─────────┘
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Breaker {
    /// Tasks go there; `failures` in a row so far.
    Closed {
        /// Consecutive failures since the last success.
        failures: u32,
    },
    /// No tasks until `until`; after it, half-open: one probe task (`probing` once it is out).
    Open {
        /// End of the cool-down.
        until: Instant,
        /// The probe task is out.
        probing: bool,
    },
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::Closed { failures: 0 }
    }
}

impl Breaker {
    /// Consecutive failures that open the breaker.
    pub const THRESHOLD: u32 = 3;
    /// How long it stays open before a probe.
    pub const COOL_DOWN: Duration = Duration::from_secs(5);

    /// "closed", "open" or "half-open".
    pub fn state(&self) -> &'static str {
        match self {
            Breaker::Closed { .. } => "closed",
            Breaker::Open { until, .. } if Instant::now() < *until => "open",
            Breaker::Open { .. } => "half-open",
        }
    }

    /// May a task be placed now?
    pub fn allows(&self) -> bool {
        match (self, self.state()) {
            (Breaker::Closed { .. }, _) => true,
            (Breaker::Open { probing, .. }, "half-open") => !probing,
            _ => false,
        }
    }

    /// A task was placed: in the half-open state, that is the probe.
    pub fn placed(&mut self) {
        if let Breaker::Open { probing, .. } = self {
            *probing = true;
        }
    }

    /// Record a success: closes the breaker.
    pub fn success(&mut self) {
        *self = Breaker::default();
    }

    /// Record a failure; returns true when this opened the breaker (again).
    pub fn failure(&mut self) -> bool {
        let open = match self {
            Breaker::Closed { failures } => {
                *failures += 1;
                *failures >= Self::THRESHOLD
            }
            Breaker::Open { .. } => true,
        };
        if open {
            *self = Breaker::Open {
                until: Instant::now() + Self::COOL_DOWN,
                probing: false,
            };
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_repeated_failures_half_opens_and_closes() {
        let mut breaker = Breaker::default();
        for _ in 1..Breaker::THRESHOLD {
            assert!(!breaker.failure());
        }
        assert!(breaker.failure(), "the threshold opens it");
        assert_eq!(breaker.state(), "open");
        assert!(!breaker.allows());
        // Cool-down over: one probe may go.
        breaker = Breaker::Open {
            until: Instant::now() - Duration::from_millis(1),
            probing: false,
        };
        assert_eq!(breaker.state(), "half-open");
        assert!(breaker.allows());
        breaker.placed();
        assert!(!breaker.allows(), "one probe at a time");
        breaker.success();
        assert_eq!(breaker, Breaker::default());
        assert!(breaker.allows());
        // A failed probe opens it again at once.
        breaker = Breaker::Open {
            until: Instant::now() - Duration::from_millis(1),
            probing: true,
        };
        assert!(breaker.failure());
        assert_eq!(breaker.state(), "open");
    }
}
