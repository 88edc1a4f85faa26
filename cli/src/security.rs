//! Command-line options for auth tokens, TLS, message limits and the file sandbox.

use std::path::PathBuf;

use volley_core::security::{Security, TlsSettings, load_token};

/// Token, TLS and message-size options shared by every subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct SecurityArgs {
    /// Shared secret every gRPC call and status page must carry (`authorization: Bearer ...`).
    #[arg(long, env = "VOLLEY_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Read the auth token from this file instead.
    #[arg(long, env = "VOLLEY_AUTH_TOKEN_FILE", conflicts_with = "auth_token")]
    pub auth_token_file: Option<PathBuf>,
    /// Secret of the cluster's own processes (scheduler and executors; never clients): it
    /// alone may register executors, launch tasks, report status and read shuffle files.
    #[arg(long, env = "VOLLEY_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// Read the cluster token from this file instead.
    #[arg(
        long,
        env = "VOLLEY_CLUSTER_TOKEN_FILE",
        conflicts_with = "cluster_token"
    )]
    pub cluster_token_file: Option<PathBuf>,
    /// PEM certificate this process presents (servers; clients with mutual TLS). Enables TLS.
    #[arg(long, env = "VOLLEY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "VOLLEY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate that signed the servers' (and, with mutual TLS, clients')
    /// certificates. Enables TLS.
    #[arg(long, env = "VOLLEY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Servers require client certificates signed by --tls-ca (mutual TLS).
    #[arg(long, env = "VOLLEY_TLS_CLIENT_AUTH", requires = "tls_ca")]
    pub tls_client_auth: bool,
    /// Largest gRPC message sent or accepted, in bytes.
    #[arg(long, env = "VOLLEY_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024 * 1024)]
    pub max_message_size: usize,
}

impl SecurityArgs {
    /// The token and TLS settings these options describe.
    pub fn security(&self) -> Result<Security, String> {
        let token = load_token(self.auth_token.clone(), self.auth_token_file.as_deref())
            .map_err(|e| e.to_string())?;
        let tls = if self.tls_cert.is_some() || self.tls_ca.is_some() {
            Some(
                TlsSettings::from_files(
                    self.tls_cert.as_deref(),
                    self.tls_key.as_deref(),
                    self.tls_ca.as_deref(),
                    self.tls_client_auth,
                )
                .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let cluster = load_token(
            self.cluster_token.clone(),
            self.cluster_token_file.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        Ok(Security::none()
            .with_token(token)
            .with_cluster_token(cluster)
            .with_tls(tls))
    }

    /// The settings of a scheduler or executor: with a client token, the cluster token is
    /// required too, or every client could act as an executor.
    pub fn server_security(&self) -> Result<Security, String> {
        let security = self.security()?;
        if security.token().is_some() && security.cluster_token().is_none() {
            return Err(
                "--auth-token needs --cluster-token (VOLLEY_CLUSTER_TOKEN) on the scheduler and executors: it is the credential of the cluster's own processes, which clients must not hold"
                    .to_string(),
            );
        }
        Ok(security)
    }
}

/// File sandbox options of a scheduler.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SandboxArgs {
    /// Folder or object-store URL prefix (`s3://bucket/prefix`) queries may read and write
    /// under (repeatable; default: the working directory and the registered tables' folders).
    #[arg(
        long = "allowed-path",
        value_name = "DIR|URL",
        env = "VOLLEY_ALLOWED_PATHS",
        value_delimiter = ','
    )]
    pub allowed_paths: Vec<String>,
    /// Refuse DDL and DML (CREATE, DROP, INSERT, COPY).
    #[arg(long, env = "VOLLEY_DISABLE_DDL")]
    pub disable_ddl: bool,
}
