//! Sessions in the state store: each session's settings and the statements that changed it
//! (DDL, SET) are saved as they happen and replayed when the scheduler starts, so a client's
//! session — its tables, views and settings — outlives a restart. Expired sessions are
//! forgotten there too.

use std::time::Instant;

use datafusion::prelude::SessionContext;
use volley_core::Result;
use volley_core::protobuf as pb;

use crate::cluster::ClusterState;
use crate::job::journal::SubmittedPlan;
use crate::service::SchedulerService;
use crate::service::plan::{Planned, plan_statement};
use crate::store::{JournalWrite, RunningJob, StoredSession};

/// The setting a session's partition count is kept under: a restored session keeps the count
/// it was created with, not the count of a cluster whose executors have not registered yet.
const TARGET_PARTITIONS: &str = "datafusion.execution.target_partitions";

/// The record of a running job of `session`: its statement, or (`plan`) the plan it was
/// submitted as with `sql` its description.
pub(super) fn running_job(
    session: &str,
    sql: &str,
    plan: Option<SubmittedPlan>,
    submitted_at: std::time::SystemTime,
) -> RunningJob {
    RunningJob {
        session: session.to_string(),
        sql: sql.to_string(),
        resumes: 0,
        submitted_at_ms: crate::fmt::epoch_ms(submitted_at),
        plan,
        steps: Vec::new(),
    }
}

impl SchedulerService {
    /// Save new session `id` (its settings as created).
    pub(super) fn remember_session(&self, id: &str, ctx: &SessionContext) {
        let target = ctx.state().config().target_partitions().to_string();
        let session = StoredSession {
            settings: vec![(TARGET_PARTITIONS.to_string(), target)],
            statements: Vec::new(),
        };
        self.save_session(id, session);
    }

    /// Add `sql`, which changed session `id`, to its saved statements.
    pub(super) fn remember_statement(&self, id: &str, sql: &str) {
        let session = {
            let mut records = self.session_records.lock();
            let Some(session) = records.get_mut(id) else {
                return;
            };
            session.statements.push(sql.to_string());
            session.clone()
        };
        self.save_session(id, session);
    }

    fn save_session(&self, id: &str, session: StoredSession) {
        if let Err(e) = self.store.save_session(id, &session) {
            tracing::warn!(store = %self.store.location(), error = %e, "cannot save a session");
        }
        self.session_records.lock().insert(id.to_string(), session);
    }

    /// Forget expired sessions in the store.
    pub(super) fn forget_sessions(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        {
            let mut records = self.session_records.lock();
            for id in ids {
                records.remove(id);
            }
        }
        if let Err(e) = self.store.forget_sessions(ids) {
            tracing::warn!(store = %self.store.location(), error = %e, "cannot forget sessions");
        }
    }

    /// Open the saved sessions again, replaying their statements in order. A statement that
    /// fails now (its file is gone, say) is logged and skipped; the session opens without it.
    pub async fn restore_sessions(&self) -> Result<()> {
        for (id, session) in self.store.sessions()? {
            let settings: Vec<pb::KeyValue> = session
                .settings
                .iter()
                .map(|(key, value)| pb::KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect();
            let ctx = self.new_session(&settings)?;
            for (n, sql) in session.statements.iter().enumerate() {
                if let Err(e) = self.replay(&ctx, sql).await {
                    tracing::warn!(session = %id, statement = n + 1, error = %e, "a saved statement of a session could not be replayed");
                }
            }
            self.session_records.lock().insert(id.clone(), session);
            self.sessions.lock().insert(id, (ctx, Instant::now()));
        }
        Ok(())
    }

    /// Save running job `id` to take it over after a restart: through the journal (after
    /// its steps so far, in the order of `state`'s transitions) when there is one, else
    /// straight to the store.
    pub(super) fn remember_running(&self, state: &mut ClusterState, id: &str, job: RunningJob) {
        if state.journaling() {
            state.journal(JournalWrite::Save(id.to_string(), job));
        } else if let Err(e) = self.store.save_running(id, &job) {
            tracing::warn!(store = %self.store.location(), error = %e, "cannot save a running job");
        }
    }

    /// Take over, under their ids, the jobs that were running when the scheduler stopped: each
    /// is planned again and its journal replayed, so stages that completed keep their outputs
    /// (where their executors still hold them) and the rest runs; a client waiting for one
    /// gets its result. A job whose session is gone, or that no longer plans, is listed as
    /// failed with the reason.
    pub async fn resume_jobs(&self) -> Result<()> {
        for (id, job) in self.store.running_jobs()? {
            let ctx = self
                .sessions
                .lock()
                .get(&job.session)
                .map(|(c, _)| c.clone());
            let resumes = job.resumes + 1;
            self.state
                .lock()
                .prepare_resume(id.clone(), job.steps.clone(), resumes);
            let resumed = match (ctx, &job.plan) {
                (Some(ctx), None) => self.submit_as(&ctx, &job.sql, id.clone(), None).await,
                (Some(ctx), Some(plan)) => self.resubmit_plan(&ctx, &id, &job.sql, plan).await,
                (None, _) => Err(volley_core::VolleyError::Internal(
                    "its session is gone".to_string(),
                )),
            };
            let mut state = self.state.lock();
            state.cancel_resume(&id);
            if resumed.is_ok() {
                let again = RunningJob {
                    resumes,
                    steps: Vec::new(),
                    ..job.clone()
                };
                self.remember_running(&mut state, &id, again);
            }
            match resumed {
                Ok(_) => {
                    tracing::info!(job_id = %id, "job resumed after a restart");
                    state.set_job_owner(&id, &job.session);
                    if job.submitted_at_ms > 0 {
                        let at = std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(job.submitted_at_ms);
                        state.set_submitted_at(&id, at);
                    }
                }
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "job not resumed after a restart");
                    let sql = volley_core::stores::redact::redact_sql(&job.sql);
                    state.add_failed_job(
                        id.clone(),
                        sql,
                        format!("job {id} could not be resumed after the scheduler restarted: {e}"),
                    );
                    state.set_job_owner(&id, &job.session);
                }
            }
        }
        Ok(())
    }

    /// Submit a saved plan again under its id.
    async fn resubmit_plan(
        &self,
        ctx: &SessionContext,
        id: &str,
        description: &str,
        plan: &SubmittedPlan,
    ) -> Result<String> {
        let bytes = plan.bytes().ok_or_else(|| {
            volley_core::VolleyError::Internal("its saved plan is damaged".to_string())
        })?;
        let physical = volley_core::codec::VolleyCodec::decode_plan(&bytes, &ctx.task_ctx())?;
        let settings = std::sync::Arc::new(plan.settings.clone());
        self.submit_physical(id.to_string(), description, ctx, physical, settings)
            .await
    }

    async fn replay(&self, ctx: &SessionContext, sql: &str) -> Result<()> {
        let per_task = self.state.lock().partitions_per_task();
        match plan_statement(ctx, sql, &self.sandbox, "restore", per_task).await? {
            Planned::Collect(df, _) => {
                df.collect().await?;
                Ok(())
            }
            _ => Err(volley_core::VolleyError::Internal(
                "only DDL and SET statements are saved".to_string(),
            )),
        }
    }
}
