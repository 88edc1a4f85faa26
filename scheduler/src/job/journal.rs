//! A job's journal: the state transitions a scheduler restarted on durable state replays to
//! take a running job over where it was, as data.
//!
//! A resumed job is planned again from its statement (planning is deterministic for a given
//! session and data) and then its [`Step`]s are applied in order: each stage that was prepared
//! (adaptive re-planning before its first launch, which depends only on the sizes of the stages
//! done before it) is prepared again the same way, each launch is marked, and each completed
//! stage gets its tasks back as they finished — their executors and output files — so it does
//! not run again. Running tasks are not journaled: they run again. One step is written per
//! stage transition, never per task, so the journal costs nothing on the task hot path.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use datafusion::physical_plan::ExecutionPlan;
use serde::{Deserialize, Serialize};
use volley_core::shuffle::PartitionLocation;

use crate::fmt::{epoch_ms, ms};
use crate::job::Job;
use crate::job::task::{TaskInfo, TaskState};

/// Attempt numbers of a job's tasks after its `n`th resume start at `n` times this, so they
/// never reuse the output folder of an attempt launched before the restart (an executor may
/// still be writing it).
pub const RESUME_ATTEMPT_STRIDE: u32 = 1000;

/// A job that was submitted and has not finished, as stored: taken over after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningJob {
    /// The session that submitted it.
    pub session: String,
    /// Its statement.
    pub sql: String,
    /// Times it was resumed already.
    #[serde(default)]
    pub resumes: u32,
    /// When it was first submitted, ms since the Unix epoch (a resumed job keeps it).
    #[serde(default)]
    pub submitted_at_ms: u64,
    /// A plan submitted through the DataFrame API (`ExecutePlan`) instead of a statement:
    /// the encoded plan (hex) and the settings it was submitted with.
    #[serde(default)]
    pub plan: Option<SubmittedPlan>,
    /// Its journal, oldest first (stored apart, one record per step).
    #[serde(skip)]
    pub steps: Vec<Step>,
}

/// A plan as submitted: taken over by decoding it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmittedPlan {
    /// The plan encoded with Volley's codec, as hex.
    pub hex: String,
    /// Its settings.
    pub settings: Vec<(String, String)>,
}

impl SubmittedPlan {
    /// `bytes` (an encoded plan) with `settings`.
    pub fn new(bytes: &[u8], settings: Vec<(String, String)>) -> Self {
        use std::fmt::Write;
        let mut hex = String::with_capacity(bytes.len() * 2);
        for byte in bytes {
            let _ = write!(hex, "{byte:02x}");
        }
        Self { hex, settings }
    }

    /// The encoded plan (None: the record is damaged).
    pub fn bytes(&self) -> Option<Vec<u8>> {
        (0..self.hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(self.hex.get(i..i + 2)?, 16).ok())
            .collect()
    }
}

/// One write to the state store's running jobs, in the order the transitions happened.
#[derive(Debug, Clone, PartialEq)]
pub enum JournalWrite {
    /// Save a job as running (again: its resume count went up).
    Save(String, RunningJob),
    /// Append a step to a job's journal.
    Step(String, Step),
    /// Forget finished jobs and their journals.
    Forget(Vec<String>),
}

/// One state transition of a job's stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Step {
    /// The job was planned into stages of these ids and partition counts (a resumed job whose
    /// plan comes out different is not taken over: it runs from the start).
    Planned {
        /// (stage id, partitions) in id order.
        shape: Vec<(u32, usize)>,
        /// A fingerprint of each stage's plan (its operators and the files its scans read), in
        /// id order.
        #[serde(default)]
        plans: Vec<u64>,
        /// Partitions a task of a grouped stage could run (0 in records from before grouping).
        #[serde(default)]
        per_task: usize,
    },
    /// The stage's inputs were done and adaptive execution re-planned it, with this many task
    /// slots in the cluster.
    Prepared {
        /// Stage.
        stage: u32,
        /// Task slots of live executors then.
        slots: usize,
    },
    /// The stage's first tasks were launched.
    Launched {
        /// Stage.
        stage: u32,
    },
    /// Every task of the stage succeeded with these outputs.
    Done {
        /// Stage.
        stage: u32,
        /// Times the stage was started.
        attempts: u32,
        /// Its tasks in partition order.
        tasks: Vec<DoneTask>,
        /// Operator metrics summed over its tasks (pre-order).
        metrics: Vec<BTreeMap<String, u64>>,
    },
}

/// A finished task as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneTask {
    /// Its successful attempt.
    pub attempt: u32,
    /// Failed attempts before it.
    pub failures: u32,
    /// Executor holding its output.
    pub executor_id: String,
    /// Start of the attempt, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Duration of the attempt, ms.
    pub elapsed_ms: u64,
    /// Bytes it spilled.
    pub spilled_bytes: u64,
    /// Its outputs.
    pub outputs: Vec<DoneOutput>,
}

/// One output file (or in-memory output) of a finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneOutput {
    /// Host of the executor's Flight service.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Path on the executor.
    pub path: String,
    /// Output bucket.
    pub bucket: u32,
    /// Rows.
    pub rows: u64,
    /// Bytes.
    pub bytes: u64,
    /// Held in the executor's memory.
    pub in_memory: bool,
}

/// A hash of a stage plan's operators (names and one-line descriptions, pre-order) and of
/// every file its scans read (path, range, size, modification time): equal for the same
/// statement on the same data (unlike the encoded plan, whose maps encode in any order).
fn fingerprint(plan: &Arc<dyn ExecutionPlan>) -> u64 {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::datasource::physical_plan::FileScanConfig;
    use datafusion::datasource::source::DataSourceExec;
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    let _ = plan.apply(|node| {
        node.name().hash(&mut hasher);
        let scan = node
            .downcast_ref::<DataSourceExec>()
            .and_then(|d| d.data_source().downcast_ref::<FileScanConfig>());
        match scan {
            Some(scan) => {
                for (group, files) in scan.file_groups.iter().enumerate() {
                    for file in files.iter() {
                        group.hash(&mut hasher);
                        file.object_meta.location.as_ref().hash(&mut hasher);
                        file.object_meta.size.hash(&mut hasher);
                        file.object_meta.last_modified.hash(&mut hasher);
                        file.range
                            .as_ref()
                            .map(|r| (r.start, r.end))
                            .hash(&mut hasher);
                    }
                }
            }
            None => datafusion::physical_plan::displayable(node.as_ref())
                .one_line()
                .to_string()
                .hash(&mut hasher),
        }
        Ok(TreeNodeRecursion::Continue)
    });
    hasher.finish()
}

impl Job {
    /// The step that says how the job was cut into stages, before anything ran: what a
    /// resumed job's new plan must equal for its journal to apply.
    pub fn planned_step(&self) -> Step {
        Step::Planned {
            shape: self
                .stages
                .iter()
                .map(|(id, s)| (*id, s.plan.partitions))
                .collect(),
            plans: self
                .stages
                .values()
                .map(|s| fingerprint(&(Arc::clone(&s.plan.plan) as Arc<dyn ExecutionPlan>)))
                .collect(),
            per_task: self.per_task,
        }
    }

    /// The step recording completed stage `stage_id` (None: not complete).
    pub fn done_step(&self, stage_id: u32) -> Option<Step> {
        let stage = self.stages.get(&stage_id)?;
        let mut tasks = Vec::with_capacity(stage.tasks.len());
        for task in &stage.tasks {
            let TaskState::Succeeded {
                executor_id,
                outputs,
                elapsed,
            } = &task.state
            else {
                return None;
            };
            tasks.push(DoneTask {
                attempt: task.attempt,
                failures: task.failures,
                executor_id: executor_id.clone(),
                started_at_ms: task.started_at.map(epoch_ms).unwrap_or(0),
                elapsed_ms: ms(*elapsed),
                spilled_bytes: task.spilled_bytes,
                outputs: outputs
                    .iter()
                    .map(|o| DoneOutput {
                        host: o.host.clone(),
                        port: o.flight_port,
                        path: o.path.clone(),
                        bucket: o.output_partition,
                        rows: o.num_rows,
                        bytes: o.num_bytes,
                        in_memory: o.in_memory,
                    })
                    .collect(),
            });
        }
        Some(Step::Done {
            stage: stage_id,
            attempts: stage.attempts,
            tasks,
            metrics: stage.operator_metrics.clone(),
        })
    }

    /// Give completed stage `stage_id` its journaled tasks back; an error when the stage does
    /// not fit them (the plan came out different).
    pub fn restore_done(
        &mut self,
        stage_id: u32,
        attempts: u32,
        tasks: &[DoneTask],
        metrics: &[BTreeMap<String, u64>],
    ) -> Result<(), String> {
        let stage = self
            .stages
            .get_mut(&stage_id)
            .ok_or_else(|| format!("stage {stage_id} is not in the plan"))?;
        if stage.tasks.len() != tasks.len() {
            return Err(format!(
                "stage {stage_id} has {} tasks, the journal {}",
                stage.tasks.len(),
                tasks.len()
            ));
        }
        for ((partition, info), done) in stage.tasks.iter_mut().enumerate().zip(tasks) {
            let map_partition = u32::try_from(partition).unwrap_or(u32::MAX);
            let outputs = done
                .outputs
                .iter()
                .map(|o| PartitionLocation {
                    executor_id: done.executor_id.clone(),
                    host: o.host.clone(),
                    flight_port: o.port,
                    path: o.path.clone(),
                    map_partition,
                    output_partition: o.bucket,
                    num_rows: o.rows,
                    num_bytes: o.bytes,
                    grant: String::new(),
                    in_memory: o.in_memory,
                })
                .collect();
            *info = TaskInfo::pending();
            info.attempt = done.attempt;
            info.failures = done.failures;
            info.spilled_bytes = done.spilled_bytes;
            info.started_at = Some(UNIX_EPOCH + Duration::from_millis(done.started_at_ms));
            info.last_executor = Some(done.executor_id.clone());
            info.state = TaskState::Succeeded {
                executor_id: done.executor_id.clone(),
                outputs,
                elapsed: Duration::from_millis(done.elapsed_ms),
            };
        }
        stage.attempts = attempts;
        stage.operator_metrics = metrics.to_vec();
        stage.mark_launched();
        stage.mark_succeeded();
        stage.resumed = true;
        Ok(())
    }

    /// After a resume: tasks still to run start at attempt `floor` (see
    /// [`RESUME_ATTEMPT_STRIDE`]), and so do the tasks adaptive execution creates later.
    pub fn raise_attempts(&mut self, floor: u32) {
        self.attempt_floor = floor;
        for stage in self.stages.values_mut() {
            for task in &mut stage.tasks {
                if !task.is_done() {
                    task.attempt = task.attempt.max(floor);
                }
            }
        }
    }

    /// Executors holding the outputs of completed stages.
    pub fn output_executors(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .stages
            .values()
            .flat_map(|s| s.tasks.iter())
            .filter_map(|t| match &t.state {
                TaskState::Succeeded { executor_id, .. } => Some(executor_id.clone()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_encode_and_old_records_read() {
        let step = Step::Done {
            stage: 2,
            attempts: 1,
            tasks: vec![DoneTask {
                attempt: 0,
                failures: 0,
                executor_id: "e1".into(),
                started_at_ms: 5,
                elapsed_ms: 7,
                spilled_bytes: 0,
                outputs: vec![DoneOutput {
                    host: "127.0.0.1".into(),
                    port: 9,
                    path: "/w/j/2/0-0/part-1.arrow".into(),
                    bucket: 1,
                    rows: 3,
                    bytes: 100,
                    in_memory: true,
                }],
            }],
            metrics: Vec::new(),
        };
        let text = serde_json::to_string(&step).unwrap();
        assert_eq!(serde_json::from_str::<Step>(&text).unwrap(), step);
        // Records written before `resumes` existed read as never resumed.
        let job: RunningJob = serde_json::from_str(r#"{"session":"s","sql":"SELECT 1"}"#).unwrap();
        assert_eq!((job.resumes, job.steps.len(), job.plan), (0, 0, None));
        let plan = SubmittedPlan::new(&[0, 1, 0xab, 0xff], vec![("k".into(), "v".into())]);
        assert_eq!(plan.hex, "0001abff");
        assert_eq!(plan.bytes(), Some(vec![0, 1, 0xab, 0xff]));
        assert_eq!(
            SubmittedPlan::new(&[], Vec::new()).bytes(),
            Some(Vec::new())
        );
        let odd = SubmittedPlan {
            hex: "abc".into(),
            settings: Vec::new(),
        };
        assert_eq!(odd.bytes(), None);
    }
}
