//! A real S3 server for the tests: moto's `moto_server` on a free 127.0.0.1 port, with IAM
//! authentication on (a request signed with a wrong key gets moto's 403), started per test and
//! killed on drop.
//!
//! Moto lets the first few requests through unauthenticated
//! (`INITIAL_NO_AUTH_ACTION_COUNT`): the harness spends exactly those on creating an IAM user,
//! its access key and policy, and the buckets; every later request must be signed with that
//! key. Objects are uploaded through the S3 API (object_store), never by writing into the
//! server's storage. `tests/s3/moto_server.py` starts moto's server with one fix of moto's
//! signature check (queries holding `%2F`, i.e. every listing of a folder).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::ObjectStoreExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;

use crate::process::free_port;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running moto S3 server and the credentials it accepts.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Access key id of the server's one IAM user.
    pub access_key: String,
    /// Its secret key.
    pub secret_key: String,
}

/// A request moto serves unauthenticated (within the initial allowance): it routes by the
/// service named in the credential scope, so a syntactically valid header is needed.
fn unsigned_auth(service: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"
    )
}

fn between<'a>(body: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = body.find(open)? + open.len();
    let end = body[start..].find(close)? + start;
    Some(&body[start..end])
}

impl S3Server {
    /// Start a server holding empty `buckets`, every request after the setup authenticated.
    pub fn start(buckets: &[&str]) -> Result<Self, BoxError> {
        Self::start_with(buckets, true)
    }

    /// Start a server whose objects anyone can read over plain HTTP (no authentication): a
    /// web server for `http://` table URLs (it answers ranged GETs and HEADs).
    pub fn start_open(buckets: &[&str]) -> Result<Self, BoxError> {
        Self::start_with(buckets, false)
    }

    fn start_with(buckets: &[&str], authenticated: bool) -> Result<Self, BoxError> {
        let port = free_port()?;
        // Unset, moto checks nothing (its default allowance is infinite).
        let bootstrap = (3 + buckets.len()).to_string();
        // moto's own server, with a fix for its signature check of encoded query strings
        // (see the launcher's doc).
        let launcher = crate::workspace_root().join("tests/s3/moto_server.py");
        let mut command = Command::new("python3");
        command.env_remove("INITIAL_NO_AUTH_ACTION_COUNT");
        if authenticated {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", bootstrap);
        }
        let child = command
            .arg(launcher)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start moto ({e}): run tests/install first"))?;
        let mut server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key: String::new(),
            secret_key: String::new(),
        };
        server.wait_ready()?;
        let iam = |form: &[(&str, &str)]| -> Result<String, BoxError> {
            let mut response = ureq::post(&server.endpoint)
                .header("Authorization", &unsigned_auth("iam"))
                .send_form(form.iter().copied())?;
            Ok(response.body_mut().read_to_string()?)
        };
        let version = ("Version", "2010-05-08");
        iam(&[("Action", "CreateUser"), ("UserName", "volley"), version])?;
        let key = iam(&[
            ("Action", "CreateAccessKey"),
            ("UserName", "volley"),
            version,
        ])?;
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
        iam(&[
            ("Action", "PutUserPolicy"),
            ("UserName", "volley"),
            ("PolicyName", "all"),
            ("PolicyDocument", policy),
            version,
        ])?;
        server.access_key = between(&key, "<AccessKeyId>", "</AccessKeyId>")
            .ok_or("no access key in moto's answer")?
            .to_string();
        server.secret_key = between(&key, "<SecretAccessKey>", "</SecretAccessKey>")
            .ok_or("no secret key in moto's answer")?
            .to_string();
        for bucket in buckets {
            ureq::put(&format!("{}/{bucket}", server.endpoint))
                .header("Authorization", &unsigned_auth("s3"))
                .send_empty()?;
        }
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let address = self.endpoint.trim_start_matches("http://").to_string();
        while std::net::TcpStream::connect(&address).is_err() {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("moto_server exited: {status}").into());
            }
            if Instant::now() > deadline {
                return Err("moto_server did not start within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The standard AWS environment for a process that should reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.as_str()),
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// `OPTIONS (...)` of a table on this server, with these credentials.
    pub fn table_options(&self, access_key: &str, secret_key: &str) -> String {
        format!(
            "OPTIONS ('aws.access_key_id' '{access_key}', 'aws.secret_access_key' '{secret_key}', 'aws.region' 'us-east-1', 'aws.endpoint' '{}', 'aws.allow_http' 'true')",
            self.endpoint
        )
    }

    /// A client of `bucket` with this server's credentials.
    pub fn store(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>, BoxError> {
        Ok(Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id(&self.access_key)
                .with_secret_access_key(&self.secret_key)
                .build()?,
        ))
    }

    /// Upload every file under `dir` to `bucket` below `prefix` (same relative paths).
    pub async fn upload_dir(
        &self,
        bucket: &str,
        prefix: &str,
        dir: &Path,
    ) -> Result<usize, BoxError> {
        let store = self.store(bucket)?;
        let mut count = 0;
        let mut pending = vec![dir.to_path_buf()];
        while let Some(folder) = pending.pop() {
            for entry in std::fs::read_dir(&folder)? {
                let path = entry?.path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                let relative = path.strip_prefix(dir)?.to_string_lossy().to_string();
                if relative.starts_with('_') {
                    continue;
                }
                let key = ObjectPath::from(format!("{prefix}/{relative}"));
                store.put(&key, std::fs::read(&path)?.into()).await?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Make every object under `prefix` in `bucket` readable by anyone (canned ACL
    /// `public-read`), as a web server's files are.
    pub async fn publish(&self, bucket: &str, prefix: &str) -> Result<usize, BoxError> {
        let keys = self.list(bucket, prefix).await?;
        for key in &keys {
            let url = format!("{}/{bucket}/{key}?acl", self.endpoint);
            ureq::put(&url)
                .header("Authorization", &unsigned_auth("s3"))
                .header("x-amz-acl", "public-read")
                .send_empty()?;
        }
        Ok(keys.len())
    }

    /// Object paths under `prefix` in `bucket`, sorted.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, BoxError> {
        use futures::TryStreamExt;
        let store = self.store(bucket)?;
        let prefix = ObjectPath::from(prefix);
        let mut paths: Vec<String> = store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await?;
        paths.sort();
        Ok(paths)
    }

    /// Stop the server (requests fail from now on).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
