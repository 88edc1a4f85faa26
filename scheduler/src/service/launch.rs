//! Launching tasks on executors (batched under the message size limit, one stage per
//! request), and ending jobs there: cancelling their tasks and removing their files.

use std::sync::Arc;

use volley_core::VolleyError;
use volley_core::protobuf as pb;

use crate::cluster::executors::ExecutorInfo;
use crate::job::{JobState, TaskLaunch};
use crate::service::{MESSAGE_OVERHEAD, SchedulerService};

/// A table write's temporary folder and the store options it is reached with.
type Leftovers = (
    String,
    Arc<Vec<(String, volley_core::stores::StoreOptions)>>,
);

impl SchedulerService {
    /// Hand pending tasks to executors with free slots.
    pub fn schedule(&self) {
        self.schedule_answering(None);
    }

    /// [`Self::schedule`], answering a status report of executor `reporter` (which takes
    /// tasks in its answer): its own tasks are returned for the answer, up to the message size
    /// limit, instead of sent in a LaunchTasks request of their own.
    pub(crate) fn schedule_answering(&self, reporter: Option<&str>) -> Vec<pb::TaskDefinition> {
        let assignments = self.state.lock().assign_tasks();
        let mut answer = Vec::new();
        for (executor, mut tasks) in assignments {
            if Some(executor.id.as_str()) == reporter {
                let mut bytes = 0;
                let fits = tasks
                    .iter()
                    .take_while(|t| {
                        bytes += t.plan.len() + MESSAGE_OVERHEAD;
                        bytes < self.config.max_message_size
                    })
                    .count();
                answer = tasks
                    .drain(..fits)
                    .map(|t| {
                        let traceparent = volley_core::telemetry::traceparent(&t.span);
                        definition(&t, traceparent, self.inline_cap())
                    })
                    .collect();
                self.metrics
                    .tasks_launched
                    .with_label_values(&["status_answer"])
                    .inc_by(answer.len() as u64);
                if tasks.is_empty() {
                    continue;
                }
            }
            let this = self.clone();
            tokio::spawn(async move { this.launch(executor, tasks).await });
        }
        answer
    }

    async fn launch(&self, executor: ExecutorInfo, tasks: Vec<TaskLaunch>) {
        let limit = self.config.max_message_size;
        let (fits, too_big): (Vec<TaskLaunch>, Vec<TaskLaunch>) = tasks
            .into_iter()
            .partition(|t| t.plan.len() + MESSAGE_OVERHEAD < limit);
        if !too_big.is_empty() {
            let mut failed = Vec::new();
            {
                let mut state = self.state.lock();
                for t in &too_big {
                    tracing::warn!(job_id = %t.job_id, stage = t.stage_id, bytes = t.plan.len(), limit, "task plan over the message size limit");
                    state.fail_job(
                        &t.job_id,
                        format!(
                            "the plan of stage {} is {} bytes, over the gRPC message size limit of {limit} bytes: raise --max-message-size (scheduler and executors) or simplify the query",
                            t.stage_id,
                            t.plan.len()
                        ),
                    );
                    failed.push(t.job_id.clone());
                }
            }
            self.finish_jobs(failed).await;
        }
        if fits.is_empty() {
            return;
        }
        // Several tasks share one request; keep each request under the message limit.
        let mut batch: Vec<TaskLaunch> = Vec::new();
        let mut batch_bytes = 0;
        for task in fits {
            let bytes = task.plan.len() + MESSAGE_OVERHEAD;
            let other_stage = batch.first().is_some_and(|t| {
                (t.job_id.as_str(), t.stage_id) != (task.job_id.as_str(), task.stage_id)
            });
            if !batch.is_empty() && (batch_bytes + bytes >= limit || other_stage) {
                self.launch_batch(&executor, std::mem::take(&mut batch))
                    .await;
                batch_bytes = 0;
            }
            batch_bytes += bytes;
            batch.push(task);
        }
        if !batch.is_empty() {
            self.launch_batch(&executor, batch).await;
        }
    }

    async fn launch_batch(&self, executor: &ExecutorInfo, tasks: Vec<TaskLaunch>) {
        tracing::debug!(executor_id = %executor.id, tasks = tasks.len(), stage = tasks.first().map(|t| t.stage_id), "launching");
        let request = pb::LaunchTasksParams {
            tasks: tasks
                .iter()
                .map(|t| definition(t, String::new(), self.inline_cap()))
                .collect(),
        };
        // One stage per request: its span's trace context rides in the request metadata.
        let mut request = tonic::Request::new(request);
        if let Some(first) = tasks.first() {
            volley_core::telemetry::inject(&first.span, request.metadata_mut());
        }
        self.metrics
            .tasks_launched
            .with_label_values(&["launch_request"])
            .inc_by(tasks.len() as u64);
        let result = match self.client(executor) {
            Ok(mut client) => client
                .launch_tasks(request)
                .await
                .map(|_| ())
                .map_err(VolleyError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.metrics
                .rpc_errors
                .with_label_values(&["launch_tasks"])
                .inc();
            tracing::warn!(executor_id = %executor.id, error = %e, "cannot launch tasks");
            // An executor we cannot reach is treated as lost: its tasks go back to the queue
            // (without counting as task failures) and a live executor registers again on its
            // next heartbeat.
            self.clients.lock().remove(&executor.id);
            // Only a connection that never opened proves the tasks did not start: a transport
            // error after the request went out may come from an executor that started a task
            // and died of it at once.
            let never_sent = matches!(&e, VolleyError::Connect { .. })
                || matches!(&e, VolleyError::Grpc(s) if s.code() == tonic::Code::Unavailable
                    && s.message().contains("connect error"));
            {
                let mut state = self.state.lock();
                if never_sent {
                    state.unlaunched(&executor.id, &tasks);
                }
                state.executor_lost(&executor.id);
            }
            self.finish_jobs(tasks.iter().map(|t| t.job_id.clone()).collect())
                .await;
            self.schedule();
        }
    }

    pub(crate) async fn finish_jobs(&self, mut job_ids: Vec<String>) {
        job_ids.sort();
        job_ids.dedup();
        for job_id in job_ids {
            let state = self.state.lock().job(&job_id).map(|j| j.state.clone());
            if matches!(state, Some(JobState::Failed(_) | JobState::Cancelled)) {
                self.release(&job_id).await;
            }
        }
    }

    /// Cancel a job's tasks and delete its shuffle files on every executor. The work runs
    /// detached: a caller cancelled midway (an RPC handler whose client went away, e.g. the
    /// executor whose status report failed the job, its reporting task aborted by this very
    /// cancel) must not stop it between "released" and "files deleted".
    pub async fn release(&self, job_id: &str) {
        if let Some(cleanup) = self.release_started(job_id) {
            let _ = cleanup.await;
        }
    }

    /// [`Self::release`] for a client that read the job's result: the job is released (its
    /// status says so) when this returns, the executors' files go right after (the client
    /// does not wait for every executor's answer).
    pub fn release_read(&self, job_id: &str) {
        drop(self.release_started(job_id));
    }

    /// Mark the job released and start deleting its files (None: nothing to do now).
    fn release_started(&self, job_id: &str) -> Option<tokio::task::JoinHandle<()>> {
        if self.release_deferred(job_id) {
            return None;
        }
        let (executors, leftovers) = {
            let mut state = self.state.lock();
            state.abort_job_tasks(job_id);
            if state.job(job_id).is_some() && !state.mark_released(job_id) {
                return None;
            }
            let leftovers = state
                .job(job_id)
                .filter(|j| j.state.is_final())
                .and_then(|j| Some((j.temporary.clone()?, Arc::clone(&j.stores))));
            let executors: Vec<ExecutorInfo> = state.alive_executors().cloned().collect();
            (executors, leftovers)
        };
        let this = self.clone();
        let job_id = job_id.to_string();
        Some(tokio::spawn(async move {
            this.remove_job_files(&job_id, executors, leftovers).await
        }))
    }

    async fn remove_job_files(
        &self,
        job_id: &str,
        executors: Vec<ExecutorInfo>,
        leftovers: Option<Leftovers>,
    ) {
        // Every executor at once: cancel the job's tasks, then delete its files.
        let calls = executors.into_iter().filter_map(|executor| {
            let mut client = self.client(&executor).ok()?;
            let job = job_id.to_string();
            Some(async move {
                let _ = client
                    .cancel_tasks(pb::CancelTasksParams {
                        job_id: job.clone(),
                    })
                    .await;
                if let Err(e) = client
                    .remove_job_data(pb::RemoveJobDataParams { job_id: job.clone() })
                    .await
                {
                    tracing::warn!(executor_id = %executor.id, job_id = %job, error = %e, "cannot remove job data");
                }
            })
        });
        futures::future::join_all(calls).await;
        // A table write: what its attempts left (a failed or cancelled job's files, a
        // committed job's manifest) goes too; its tasks are cancelled by now.
        if let Some((temporary, stores)) = leftovers
            && let Err(e) = self.delete_prefix(&temporary, &stores).await
        {
            tracing::warn!(job_id, error = %e, "cannot remove a failed write's temporary files");
        }
    }

    /// Delete every object under `url` (a folder URL), with the job's store options.
    async fn delete_prefix(
        &self,
        url: &str,
        stores: &[(String, volley_core::stores::StoreOptions)],
    ) -> Result<(), volley_core::VolleyError> {
        use datafusion::execution::object_store::ObjectStoreRegistry;
        use futures::{StreamExt, TryStreamExt};
        let scope = volley_core::stores::StoreScope::with_options(
            Arc::clone(&self.stores),
            stores.to_vec(),
        );
        let listing = datafusion::datasource::listing::ListingTableUrl::parse(url)?;
        let store = scope.get_store(listing.get_url())?;
        let paths = store
            .list(Some(listing.prefix()))
            .map_ok(|meta| meta.location)
            .boxed();
        store
            .delete_stream(paths)
            .try_collect::<Vec<_>>()
            .await
            .map_err(datafusion::error::DataFusionError::from)?;
        Ok(())
    }

    /// Cancel a running job.
    pub async fn cancel(&self, job_id: &str) -> bool {
        let cancelled = self.state.lock().cancel_job(job_id);
        if cancelled {
            tracing::info!(job_id, "job cancelled");
            self.release(job_id).await;
        }
        cancelled
    }
}

impl SchedulerService {
    /// The largest result a task returns inside its status report, whatever its session set:
    /// [`volley_core::config::MAX_INLINE_RESULT_BYTES`], and at most a quarter of the largest
    /// message the scheduler takes (a report it could not take would be retried, holding the
    /// task's slot).
    fn inline_cap(&self) -> u64 {
        volley_core::config::MAX_INLINE_RESULT_BYTES.min(self.config.max_message_size as u64 / 4)
    }
}

/// A task as its executor receives it; `traceparent` is its stage span's trace context when
/// the request's metadata cannot carry it; `inline_cap` bounds the result it returns inline.
fn definition(t: &TaskLaunch, traceparent: String, inline_cap: u64) -> pb::TaskDefinition {
    pb::TaskDefinition {
        task: Some(pb::TaskId {
            job_id: t.job_id.clone(),
            stage_id: t.stage_id,
            partition: t.partition,
            attempt: t.attempt,
        }),
        plan: t.plan.as_ref().clone(),
        settings: t
            .settings
            .iter()
            .map(|(key, value)| pb::KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        stores: t
            .stores
            .iter()
            .map(|(store, options)| volley_core::stores::options::to_proto(store, options))
            .collect(),
        traceparent,
        inline_result_limit: t.inline_limit.min(inline_cap),
    }
}
