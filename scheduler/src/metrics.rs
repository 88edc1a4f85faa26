//! L5: Prometheus metrics of one scheduler (its own registry, so several schedulers can share a
//! process). Counters and the task-duration histogram are updated as events happen; gauges
//! are refreshed from the cluster state at scrape time.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::cluster::ClusterState;
use crate::job::{JobState, TaskState};
use crate::result_cache::CacheCounters;

/// The scheduler's metrics.
#[derive(Clone)]
pub struct SchedulerMetrics {
    registry: Registry,
    /// Task attempt durations in seconds.
    pub task_seconds: Histogram,
    /// Finished task attempts by outcome.
    pub tasks_finished: IntCounterVec,
    /// Shuffle bytes written by map tasks.
    pub shuffle_bytes_written: IntCounter,
    /// Shuffle bytes read by consumer stages.
    pub shuffle_bytes_fetched: IntCounter,
    /// Failed RPCs by method.
    pub rpc_errors: IntCounterVec,
    /// Task attempts launched, by how they reached their executor: a LaunchTasks request
    /// (`launch_request`) or the answer to the executor's status report (`status_answer`).
    pub tasks_launched: IntCounterVec,
    /// Result cache hits, misses and evictions.
    pub result_cache: CacheCounters,
    /// Bytes of the answers the result cache holds (set before each scrape).
    pub result_cache_bytes: IntGauge,
    jobs: IntGaugeVec,
    running_tasks: IntGauge,
    executors_alive: IntGauge,
}

fn err(e: prometheus::Error) -> volley_core::VolleyError {
    volley_core::VolleyError::Internal(format!("metrics: {e}"))
}

impl SchedulerMetrics {
    /// Register all metrics in a fresh registry.
    pub fn new() -> volley_core::Result<Self> {
        let registry = Registry::new();
        let task_seconds = Histogram::with_opts(
            HistogramOpts::new("volley_task_duration_seconds", "Task attempt durations").buckets(
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
            ),
        )
        .map_err(err)?;
        let tasks_finished = IntCounterVec::new(
            Opts::new("volley_tasks_finished_total", "Task attempts by outcome"),
            &["outcome"],
        )
        .map_err(err)?;
        let shuffle_bytes_written = IntCounter::new(
            "volley_shuffle_bytes_written_total",
            "Shuffle bytes written by map tasks",
        )
        .map_err(err)?;
        let shuffle_bytes_fetched = IntCounter::new(
            "volley_shuffle_bytes_fetched_total",
            "Shuffle bytes read by consumer stages",
        )
        .map_err(err)?;
        let rpc_errors = IntCounterVec::new(
            Opts::new("volley_rpc_errors_total", "Failed scheduler RPCs by method"),
            &["method"],
        )
        .map_err(err)?;
        let tasks_launched = IntCounterVec::new(
            Opts::new(
                "volley_tasks_launched_total",
                "Task attempts launched, by the message that carried them",
            ),
            &["via"],
        )
        .map_err(err)?;
        let counter = |name: &str, help: &str| IntCounter::new(name, help).map_err(err);
        let result_cache = CacheCounters {
            hits: counter(
                "volley_result_cache_hits_total",
                "Queries answered from the result cache",
            )?,
            misses: counter(
                "volley_result_cache_misses_total",
                "Cacheable queries the result cache could not answer",
            )?,
            unplanned_hits: counter(
                "volley_result_cache_unplanned_hits_total",
                "Of the hits, those found by the statement shortcut, without planning the query",
            )?,
            evictions: counter(
                "volley_result_cache_evictions_total",
                "Result cache entries dropped (expired, inputs changed, no room)",
            )?,
        };
        let result_cache_bytes = IntGauge::new(
            "volley_result_cache_bytes",
            "Bytes of the answers in the result cache",
        )
        .map_err(err)?;
        let jobs =
            IntGaugeVec::new(Opts::new("volley_jobs", "Jobs by state"), &["state"]).map_err(err)?;
        let running_tasks =
            IntGauge::new("volley_running_tasks", "Tasks running now").map_err(err)?;
        let executors_alive =
            IntGauge::new("volley_executors_alive", "Executors alive").map_err(err)?;
        for c in [
            Box::new(task_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tasks_finished.clone()),
            Box::new(shuffle_bytes_written.clone()),
            Box::new(shuffle_bytes_fetched.clone()),
            Box::new(rpc_errors.clone()),
            Box::new(tasks_launched.clone()),
            Box::new(result_cache.hits.clone()),
            Box::new(result_cache.unplanned_hits.clone()),
            Box::new(result_cache.misses.clone()),
            Box::new(result_cache.evictions.clone()),
            Box::new(result_cache_bytes.clone()),
            Box::new(jobs.clone()),
            Box::new(running_tasks.clone()),
            Box::new(executors_alive.clone()),
        ] {
            registry.register(c).map_err(err)?;
        }
        Ok(Self {
            registry,
            task_seconds,
            tasks_finished,
            shuffle_bytes_written,
            shuffle_bytes_fetched,
            rpc_errors,
            tasks_launched,
            result_cache,
            result_cache_bytes,
            jobs,
            running_tasks,
            executors_alive,
        })
    }

    /// Prometheus text exposition, gauges refreshed from `state`.
    pub fn render(&self, state: &ClusterState) -> String {
        for name in ["queued", "running", "succeeded", "failed", "cancelled"] {
            self.jobs.with_label_values(&[name]).set(0);
        }
        for job in state.jobs().values() {
            self.jobs.with_label_values(&[job.state.as_str()]).inc();
        }
        let running = state
            .jobs()
            .values()
            .filter(|j| j.state == JobState::Running)
            .flat_map(|j| j.stages.values())
            .flat_map(|s| &s.tasks)
            .filter(|t| matches!(t.state, TaskState::Running { .. }))
            .count();
        self.running_tasks
            .set(i64::try_from(running).unwrap_or(i64::MAX));
        self.executors_alive.set(
            i64::try_from(state.executors().values().filter(|e| e.alive).count())
                .unwrap_or(i64::MAX),
        );
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
