//! A cluster of real `volley` processes on 127.0.0.1: one scheduler, N executors.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use volley::{ClientOptions, VolleyClient};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The `volley` binary built by this workspace (`VOLLEY_BIN` overrides).
pub fn volley_bin() -> Result<PathBuf, BoxError> {
    if let Ok(path) = std::env::var("VOLLEY_BIN") {
        return Ok(PathBuf::from(path));
    }
    // Test binaries live in target/<profile>/deps; the binary in target/<profile>.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or("cannot locate target dir")?;
    let bin = profile_dir.join(format!("volley{}", std::env::consts::EXE_SUFFIX));
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: run `cargo build --bin volley` (cargo test --workspace builds it)",
            bin.display()
        )
        .into())
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16, BoxError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Wait until `child` accepts connections on `port` (true) or exits (false); 30 s at most.
async fn wait_listening(child: &mut Child, port: u16) -> Result<bool, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Err(format!("the scheduler did not listen on port {port} within 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Scheduler and executor processes; all are killed on drop.
pub struct ProcessCluster {
    url: String,
    http_url: String,
    scheduler: Child,
    /// The scheduler's arguments, to start it again on the same ports.
    scheduler_command: Vec<String>,
    restarts: usize,
    executors: Vec<Child>,
    executor_ports: Vec<u16>,
    work_dir: tempfile::TempDir,
    scheduler_args: Vec<String>,
    /// `--allowed-path` arguments of the executors (the scheduler's roots).
    sandbox: Vec<String>,
    env: Vec<(String, String)>,
    options: ClientOptions,
    log_dir: Option<PathBuf>,
    executor_hosts: Vec<String>,
}

/// Extra settings for a process cluster: environment of every process and how clients connect.
#[derive(Default, Clone)]
pub struct ProcessOptions {
    /// Environment variables of the scheduler and executor processes.
    pub env: Vec<(String, String)>,
    /// Client options (token, TLS) for the harness's own connections.
    pub client: ClientOptions,
    /// Write each process's stderr to `scheduler.log` / `executor-N.log` here.
    pub log_dir: Option<PathBuf>,
    /// Addresses executors bind and advertise, one per executor in turn (default 127.0.0.1):
    /// `127.0.0.2`, `127.0.0.3` make them separate "hosts" (each has its own work dir).
    pub executor_hosts: Vec<String>,
}

impl ProcessOptions {
    /// Every process holds `client` (the client token) and `cluster` (the cluster token);
    /// the harness's clients connect with the client token.
    pub fn with_tokens(client: &str, cluster: &str) -> Self {
        Self {
            env: vec![
                ("VOLLEY_AUTH_TOKEN".to_string(), client.to_string()),
                ("VOLLEY_CLUSTER_TOKEN".to_string(), cluster.to_string()),
            ],
            client: ClientOptions::with_token(client),
            ..Self::default()
        }
    }
}

/// A scheduler process with `args`, stderr to `log` in the options' log dir.
fn spawn_scheduler(
    args: &[String],
    options: &ProcessOptions,
    log: &str,
) -> Result<Child, BoxError> {
    Ok(Command::new(volley_bin()?)
        .args(args)
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(stderr_for(options.log_dir.as_ref(), log)?)
        .spawn()?)
}

fn stderr_for(log_dir: Option<&PathBuf>, name: &str) -> Result<Stdio, BoxError> {
    Ok(match log_dir {
        Some(dir) => Stdio::from(std::fs::File::create(dir.join(name))?),
        None => Stdio::inherit(),
    })
}

impl ProcessCluster {
    /// Start a scheduler and `executors` executors with `slots` slots each and wait until all
    /// executors registered.
    pub async fn start(
        executors: usize,
        slots: usize,
        scheduler_args: &[&str],
    ) -> Result<Self, BoxError> {
        Self::start_with(executors, slots, scheduler_args, ProcessOptions::default()).await
    }

    /// Start with environment variables for every process (tokens, TLS files).
    pub async fn start_with(
        executors: usize,
        slots: usize,
        scheduler_args: &[&str],
        options: ProcessOptions,
    ) -> Result<Self, BoxError> {
        let port = free_port()?;
        let http_port = free_port()?;
        // With a client token the cluster's processes need a cluster token of their own,
        // which the harness's clients never hold.
        let mut options = options;
        let has = |key: &str| options.env.iter().any(|(k, _)| k == key);
        if has("VOLLEY_AUTH_TOKEN") && !has("VOLLEY_CLUSTER_TOKEN") {
            options.env.push((
                "VOLLEY_CLUSTER_TOKEN".to_string(),
                format!("test-cluster-secret-{port}-{}", std::process::id()),
            ));
        }
        let scheduler_args: Vec<String> = scheduler_args.iter().map(|s| s.to_string()).collect();
        // Test data lives under the workspace and the system temp dir.
        let sandbox = if scheduler_args.iter().any(|a| a == "--allowed-path") {
            // Executors get the same roots (after --allowed-path in the scheduler's args).
            scheduler_args
                .windows(2)
                .filter(|w| w[0] == "--allowed-path")
                .flat_map(|w| ["--allowed-path".to_string(), w[1].clone()])
                .collect()
        } else {
            vec![
                "--allowed-path".to_string(),
                crate::workspace_root().display().to_string(),
                "--allowed-path".to_string(),
                std::env::temp_dir().display().to_string(),
            ]
        };
        let scheme = if options.client.security.tls_enabled() {
            "https"
        } else {
            "http"
        };
        // A free port may be taken by another process's connection before the scheduler binds
        // it ("Address already in use"): then it exits, and starts again on other ports.
        let mut tries = 0;
        let (scheduler, scheduler_command, port, http_port) = loop {
            let (port, http_port) = if tries == 0 {
                (port, http_port)
            } else {
                (free_port()?, free_port()?)
            };
            tries += 1;
            let mut command: Vec<String> = [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--http-port",
                &http_port.to_string(),
                "--enable-test-hooks",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if !scheduler_args.iter().any(|a| a == "--allowed-path") {
                command.extend(sandbox.iter().cloned());
            }
            command.extend(scheduler_args.iter().cloned());
            let mut scheduler = spawn_scheduler(&command, &options, "scheduler.log")?;
            match wait_listening(&mut scheduler, port).await? {
                true => break (scheduler, command, port, http_port),
                false if tries < 4 => continue,
                false => return Err("the scheduler exited at start four times".into()),
            }
        };
        let mut cluster = Self {
            url: format!("{scheme}://127.0.0.1:{port}"),
            http_url: format!("{scheme}://127.0.0.1:{http_port}"),
            scheduler,
            scheduler_command,
            restarts: 0,
            executors: Vec::new(),
            executor_ports: Vec::new(),
            work_dir: tempfile::Builder::new().prefix("volley-test-").tempdir()?,
            scheduler_args,
            sandbox,
            env: options.env,
            options: options.client,
            log_dir: options.log_dir,
            executor_hosts: options.executor_hosts,
        };
        cluster.wait_for_scheduler().await?;
        for _ in 0..executors {
            cluster.add_executor(slots)?;
        }
        cluster.wait_for_started(executors, slots).await?;
        Ok(cluster)
    }

    /// Start one more executor process.
    pub fn add_executor(&mut self, slots: usize) -> Result<(), BoxError> {
        let n = self.executors.len();
        let (child, port) = self.spawn_executor(n, slots)?;
        self.executors.push(child);
        self.executor_ports.push(port);
        Ok(())
    }

    /// Spawn executor number `n` on a free port.
    fn spawn_executor(&self, n: usize, slots: usize) -> Result<(Child, u16), BoxError> {
        let port = free_port()?;
        let host = match self.executor_hosts.len() {
            0 => "127.0.0.1".to_string(),
            hosts => self.executor_hosts[n % hosts].clone(),
        };
        let dir = self.work_dir.path().join(format!("executor-{n}-{port}"));
        let child = Command::new(volley_bin()?)
            .args([
                "executor",
                "--scheduler",
                &self.url,
                "--host",
                &host,
                "--port",
                &port.to_string(),
                "--slots",
                &slots.to_string(),
                "--heartbeat-ms",
                "500",
                "--enable-test-hooks",
                "--work-dir",
            ])
            .arg(&dir)
            .args(&self.sandbox)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(stderr_for(
                self.log_dir.as_ref(),
                &format!("executor-{n}.log"),
            )?)
            .spawn()?;
        Ok((child, port))
    }

    /// Wait until `n` executors are alive, starting again on another port any that exited
    /// before registering (a free port taken by another process in between: "Address
    /// already in use").
    async fn wait_for_started(&mut self, n: usize, slots: usize) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in 0..self.executors.len() {
                if self.executors[i].try_wait()?.is_some() {
                    let (child, port) = self.spawn_executor(i, slots)?;
                    self.executors[i] = child;
                    self.executor_ports[i] = port;
                }
            }
            match self.wait_alive(n, Duration::from_millis(500)).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => {}
            }
        }
    }

    async fn wait_for_scheduler(&self) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.client().await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("scheduler did not start: {e}").into());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Wait until `n` executors are alive.
    pub async fn wait_for_executors(&self, n: usize) -> Result<(), BoxError> {
        self.wait_alive(n, Duration::from_secs(30)).await
    }

    /// Wait up to `patience` until `n` executors are alive.
    async fn wait_alive(&self, n: usize, patience: Duration) -> Result<(), BoxError> {
        let client = self.client().await?;
        let deadline = Instant::now() + patience;
        loop {
            let alive = client.cluster_state().await?.executors.len();
            if alive >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("only {alive} of {n} executors registered").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Scheduler URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Base URL of the scheduler's status page and JSON API.
    pub fn http_url(&self) -> &str {
        &self.http_url
    }

    /// Arguments the scheduler was started with.
    pub fn scheduler_args(&self) -> &[String] {
        &self.scheduler_args
    }

    /// Ports of the executor processes (gRPC and Flight).
    pub fn executor_ports(&self) -> &[u16] {
        &self.executor_ports
    }

    /// OS process id of the scheduler.
    pub fn scheduler_pid(&self) -> u32 {
        self.scheduler.id()
    }

    /// OS process ids of the executors.
    pub fn executor_pids(&self) -> Vec<u32> {
        self.executors.iter().map(|c| c.id()).collect()
    }

    /// Index of the executor process registered under `executor_id`.
    pub async fn executor_index(&self, executor_id: &str) -> Result<usize, BoxError> {
        let client = self.client().await?;
        let state = client.cluster_state().await?;
        let port = state
            .executors
            .iter()
            .find(|e| e.id == executor_id)
            .map(|e| e.grpc_port)
            .ok_or_else(|| format!("executor {executor_id} is not registered"))?;
        self.executor_ports
            .iter()
            .position(|p| u32::from(*p) == port)
            .ok_or_else(|| format!("no executor process on port {port}").into())
    }

    /// SIGKILL the executor process registered as `executor_id`.
    pub async fn kill_executor_id(&mut self, executor_id: &str) -> Result<(), BoxError> {
        let index = self.executor_index(executor_id).await?;
        self.kill_executor(index)
    }

    /// SIGKILL executor `index`.
    pub fn kill_executor(&mut self, index: usize) -> Result<(), BoxError> {
        let child = self.executors.get_mut(index).ok_or("no such executor")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGKILL executor `index` and delete its work dir: the machine and its disk are gone, so
    /// executors on the same host cannot read its shuffle files from disk either.
    pub fn kill_executor_and_disk(&mut self, index: usize) -> Result<(), BoxError> {
        self.kill_executor(index)?;
        let port = self.executor_ports.get(index).ok_or("no such executor")?;
        let dir = self
            .work_dir
            .path()
            .join(format!("executor-{index}-{port}"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Send a signal (`STOP`, `CONT`, ...) to executor `index`.
    pub fn signal_executor(&self, index: usize, signal: &str) -> Result<(), BoxError> {
        let pid = self.executors.get(index).ok_or("no such executor")?.id();
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{signal} {pid} failed").into())
        }
    }

    /// SIGKILL the scheduler and start it again with the same arguments and ports; the
    /// executors keep running and register again.
    pub async fn restart_scheduler(&mut self) -> Result<(), BoxError> {
        self.scheduler.kill()?;
        self.scheduler.wait()?;
        self.restarts += 1;
        let options = ProcessOptions {
            env: self.env.clone(),
            log_dir: self.log_dir.clone(),
            ..ProcessOptions::default()
        };
        let log = format!("scheduler-{}.log", self.restarts);
        let port: u16 = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or("scheduler URL without a port")?;
        // The old process's port may linger briefly: try a few times.
        for _ in 0..20 {
            self.scheduler = spawn_scheduler(&self.scheduler_command, &options, &log)?;
            if wait_listening(&mut self.scheduler, port).await? {
                return self.wait_for_scheduler().await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err("the restarted scheduler did not listen on its port".into())
    }

    /// The scheduler process, to check it still runs.
    pub fn scheduler_alive(&mut self) -> bool {
        matches!(self.scheduler.try_wait(), Ok(None))
    }

    /// Where the processes' stderr goes, when a log dir was given.
    pub fn log_dir(&self) -> Option<&std::path::Path> {
        self.log_dir.as_deref()
    }

    /// Root of the executors' work dirs.
    pub fn work_dir(&self) -> &std::path::Path {
        self.work_dir.path()
    }

    /// A new client session.
    pub async fn client(&self) -> Result<VolleyClient, BoxError> {
        Ok(VolleyClient::connect_with(&self.url, self.options.clone()).await?)
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for child in self
            .executors
            .iter_mut()
            .chain(std::iter::once(&mut self.scheduler))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Scheduler arguments of a fault test: `attempts` per task and per stage, executors lost
/// after 2 s of silence.
pub fn fault_args(attempts: &str) -> [&str; 6] {
    [
        "--executor-timeout-secs",
        "2",
        "--task-max-attempts",
        attempts,
        "--stage-max-attempts",
        attempts,
    ]
}
