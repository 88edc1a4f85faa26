//! Volley's test harness: TPC-H and TPC-DS data generation, a real S3 server, a cluster of real `volley` processes, result
//! comparison against oracles, and a sqllogictest runner for local and cluster modes.

pub mod compare;
pub mod etcd;
pub mod layout;
pub mod process;
pub mod s3;
pub mod slt;
pub mod suite;
pub mod tpcds;
pub mod tpch;

use std::path::PathBuf;

/// Root of the workspace.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Absolute path of a file in `tests/slt/data` (small CSV tables shared by tests).
pub fn data_file(file: &str) -> String {
    workspace_root()
        .join("tests/slt/data")
        .join(file)
        .display()
        .to_string()
}

/// `CREATE EXTERNAL TABLE sales ...` (typed columns) for `tests/slt/data/sales.csv`.
pub fn sales_table_sql() -> String {
    format!(
        "CREATE EXTERNAL TABLE sales (sale_id INT, emp_id INT, amount DECIMAL(10,2), region VARCHAR, day DATE) \
         STORED AS CSV LOCATION '{}' OPTIONS ('format.has_header' 'true')",
        data_file("sales.csv")
    )
}

/// `CREATE EXTERNAL TABLE emp ...` for the shared `tests/slt/data/emp.csv` table.
pub fn emp_table_sql() -> String {
    format!(
        "CREATE EXTERNAL TABLE emp STORED AS CSV LOCATION '{}' OPTIONS ('format.has_header' 'true')",
        data_file("emp.csv")
    )
}

/// Register the shared `emp` table in a cluster session.
pub async fn register_emp(client: &volley::VolleyClient) -> volley::Result<()> {
    client.sql(&emp_table_sql()).await.map(|_| ())
}

/// A test hold (`volley.test_hold_task`): every task of one stage waits before it runs until
/// the test releases it, so the test observes, kills or cancels the stage while it surely runs
/// instead of racing a fixed sleep. Needs a cluster started with test hooks enabled.
pub struct Hold {
    dir: tempfile::TempDir,
    stage: u32,
}

impl Hold {
    /// A hold on the tasks of `stage`, not yet released.
    pub fn new(stage: u32) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("volley-hold-").tempdir()?;
        Ok(Self { dir, stage })
    }

    /// The file whose creation releases the held tasks.
    pub fn release_file(&self) -> PathBuf {
        self.dir.path().join("release")
    }

    /// The statement that sets this hold for the session's next jobs.
    pub fn set_sql(&self) -> String {
        format!(
            "SET volley.test_hold_task = '{}:{}'",
            self.stage,
            self.release_file().display()
        )
    }

    /// The statement that clears any hold for the session's next jobs.
    pub fn clear_sql() -> &'static str {
        "SET volley.test_hold_task = ''"
    }

    /// True once a held task runs on executor `executor_id` (it writes a marker next to the
    /// release file when it reaches the hold).
    pub fn reached_on(&self, executor_id: &str) -> bool {
        self.dir
            .path()
            .join(format!("reached-{executor_id}"))
            .exists()
    }

    /// Let the held tasks (and any later attempt of them) run.
    pub fn release(&self) -> std::io::Result<()> {
        std::fs::write(self.release_file(), b"released")
    }
}

/// Number of files below `dir`, at any depth (0 when it does not exist), not counting the
/// executors' work-dir markers.
pub fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                let path = e.path();
                if path.is_dir() {
                    files_under(&path)
                } else {
                    usize::from(e.file_name() != volley_core::shuffle::EXECUTOR_MARKER)
                }
            })
            .sum()
    })
}

/// Install a tracing subscriber once (RUST_LOG controls it).
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}

/// An HTTP `GET` or `POST` (with an optional bearer token) on a blocking thread: (status,
/// body); a 4xx/5xx status is an answer, not an error. A request that gets no answer at all
/// is status 0 with the error as body (no assertion on a status accepts it).
pub async fn http(method: &'static str, url: String, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let response = if method == "POST" {
            let mut request = agent.post(&url);
            if let Some(auth) = &auth {
                request = request.header("Authorization", auth);
            }
            request.send_empty()
        } else {
            let mut request = agent.get(&url);
            if let Some(auth) = &auth {
                request = request.header("Authorization", auth);
            }
            request.call()
        };
        match response {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let body = response.body_mut().read_to_string().unwrap_or_default();
                (status, body)
            }
            Err(e) => (0, format!("{method} {url}: {e}")),
        }
    })
    .await
    .unwrap_or_else(|e| (0, format!("HTTP request thread: {e}")))
}

/// The scheduler's record of job `job_id` (its stages and tasks), as `client` sees it.
pub async fn job_record(
    client: &volley::VolleyClient,
    job_id: &str,
) -> Option<volley_core::protobuf::JobRecord> {
    client
        .cluster_state()
        .await
        .ok()?
        .jobs
        .into_iter()
        .find(|j| j.job_id == job_id)
}

/// The rows of job `job_id` once it ends (fetched and released as a client does), or its
/// error as text.
pub async fn job_rows(
    client: &volley::VolleyClient,
    job_id: &str,
) -> Result<Vec<compare::Row>, String> {
    use futures::TryStreamExt;
    let (_, stream) = client
        .fetch(job_id.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let batches: Vec<_> = stream.try_collect().await.map_err(|e| e.to_string())?;
    compare::rows(&batches).map_err(|e| e.to_string())
}
