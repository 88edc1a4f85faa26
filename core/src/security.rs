//! Transport security shared by every Volley process: the bearer token carried on each gRPC
//! call (checked in constant time by [`AuthInterceptor`]) and TLS for servers and channels.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Request, Status};

use crate::{Result, VolleyError};

/// Environment variable holding the auth token for every subcommand.
pub const TOKEN_ENV: &str = "VOLLEY_AUTH_TOKEN";

/// TLS material of one process, PEM encoded.
#[derive(Clone)]
pub struct TlsSettings {
    /// Certificate chain this process presents (as server, and as client for mutual TLS).
    pub cert_pem: Option<Vec<u8>>,
    /// Private key of `cert_pem`.
    pub key_pem: Option<Vec<u8>>,
    /// CA that signed the peers' certificates (servers we call; clients when mutual TLS).
    pub ca_pem: Option<Vec<u8>>,
    /// Servers require a client certificate signed by `ca_pem`.
    pub require_client_cert: bool,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert", &self.cert_pem.is_some())
            .field("key", &"<redacted>")
            .field("ca", &self.ca_pem.is_some())
            .field("require_client_cert", &self.require_client_cert)
            .finish()
    }
}

impl TlsSettings {
    /// Read PEM files; any of them may be absent.
    pub fn from_files(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
        require_client_cert: bool,
    ) -> Result<Self> {
        let read = |p: Option<&Path>, what: &str| -> Result<Option<Vec<u8>>> {
            p.map(|p| {
                std::fs::read(p).map_err(|e| {
                    VolleyError::Config(format!("cannot read TLS {what} {}: {e}", p.display()))
                })
            })
            .transpose()
        };
        let settings = Self {
            cert_pem: read(cert, "certificate")?,
            key_pem: read(key, "key")?,
            ca_pem: read(ca, "CA certificate")?,
            require_client_cert,
        };
        if settings.cert_pem.is_some() != settings.key_pem.is_some() {
            return Err(VolleyError::Config(
                "--tls-cert and --tls-key must be given together".to_string(),
            ));
        }
        if require_client_cert && settings.ca_pem.is_none() {
            return Err(VolleyError::Config(
                "client certificate checks need --tls-ca".to_string(),
            ));
        }
        Ok(settings)
    }

    fn identity(&self) -> Option<Identity> {
        match (&self.cert_pem, &self.key_pem) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(cert, key)),
            _ => None,
        }
    }
}

/// How a process authenticates itself and its peers.
#[derive(Clone, Default)]
pub struct Security {
    token: Option<Arc<str>>,
    cluster_token: Option<Arc<str>>,
    tls: Option<Arc<TlsSettings>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "cluster_token",
                &self.cluster_token.as_ref().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

impl Security {
    /// No token, plaintext: for loopback clusters and tests.
    pub fn none() -> Self {
        Self::default()
    }

    /// Use `token` (empty means none).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty()).map(Arc::from);
        self
    }

    /// Use TLS.
    pub fn with_tls(mut self, tls: Option<TlsSettings>) -> Self {
        self.tls = tls.map(Arc::new);
        self
    }

    /// The token, if one is set.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// True when this process speaks TLS.
    pub fn tls_enabled(&self) -> bool {
        self.tls.is_some()
    }

    /// `https` with TLS, `http` without.
    pub fn scheme(&self) -> &'static str {
        if self.tls_enabled() { "https" } else { "http" }
    }

    /// The URL of `host:port` in this process's scheme.
    pub fn url(&self, host: &str, port: u16) -> String {
        format!("{}://{host}:{port}", self.scheme())
    }

    /// Set the cluster token: the credential of the cluster's own processes (executors
    /// registering and reporting, the scheduler launching tasks, shuffle fetches). Clients never
    /// hold it.
    pub fn with_cluster_token(mut self, token: Option<String>) -> Self {
        self.cluster_token = token.filter(|t| !t.is_empty()).map(Arc::from);
        self
    }

    /// The cluster token, if any.
    pub fn cluster_token(&self) -> Option<&str> {
        self.cluster_token.as_deref()
    }

    /// These settings as a client of this cluster gets them: without the cluster token.
    pub fn for_clients(&self) -> Self {
        Self {
            cluster_token: None,
            ..self.clone()
        }
    }

    /// The role a call presenting `presented` (an `authorization` header) gets, or None when
    /// it must be refused. With no token at all every caller is trusted (a loopback cluster);
    /// with a client token only, its holders are trusted with everything (one-token mode of
    /// library users: the `volley` binary refuses it); with a cluster token, only its holders
    /// are [`Role::Cluster`].
    pub fn role_of(&self, presented: Option<&str>) -> Option<Role> {
        let bearer = presented.and_then(|p| p.strip_prefix("Bearer "));
        let is = |token: &Option<Arc<str>>| {
            token
                .as_deref()
                .zip(bearer)
                .is_some_and(|(t, b)| bool::from(t.as_bytes().ct_eq(b.as_bytes())))
        };
        match (&self.token, &self.cluster_token) {
            (None, None) => Some(Role::Cluster),
            (_, Some(_)) if is(&self.cluster_token) => Some(Role::Cluster),
            (Some(_), None) => is(&self.token).then_some(Role::Cluster),
            (Some(_), Some(_)) => is(&self.token).then_some(Role::Client),
            (None, Some(_)) => Some(Role::Client),
        }
    }

    /// Check a presented token in constant time.
    pub fn token_matches(&self, presented: Option<&str>) -> bool {
        match (&self.token, presented) {
            (None, _) => true,
            (Some(expected), Some(presented)) => {
                let presented = presented.strip_prefix("Bearer ").unwrap_or("");
                bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
            }
            (Some(_), None) => false,
        }
    }

    /// A server builder with this process's TLS configuration.
    pub fn server(&self) -> Result<Server> {
        let mut builder = Server::builder().tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            let identity = tls.identity().ok_or_else(|| {
                VolleyError::Config("a TLS server needs --tls-cert and --tls-key".to_string())
            })?;
            let mut config = ServerTlsConfig::new().identity(identity);
            if tls.require_client_cert
                && let Some(ca) = &tls.ca_pem
            {
                config = config.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder
                .tls_config(config)
                .map_err(|e| VolleyError::Config(format!("bad TLS configuration: {e}")))?;
        }
        Ok(builder)
    }

    /// A lazily connected endpoint to `url`, with TLS when configured.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let url = match (&self.tls, url.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => url.to_string(),
        };
        let bad = |e: tonic::transport::Error| VolleyError::Connect {
            address: url.clone(),
            message: e.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            let mut config = ClientTlsConfig::new();
            if let Some(ca) = &tls.ca_pem {
                config = config.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some(identity) = tls.identity() {
                config = config.identity(identity);
            }
            endpoint = endpoint.tls_config(config).map_err(bad)?;
        }
        Ok(endpoint)
    }

    /// The interceptor servers check calls with.
    pub fn server_interceptor(&self, service: &'static str) -> AuthInterceptor {
        AuthInterceptor {
            security: self.clone(),
            service,
        }
    }

    /// The interceptor clients stamp calls with.
    pub fn client_interceptor(&self) -> Result<ClientAuth> {
        // The cluster's own processes call each other with the cluster token.
        let header = self
            .cluster_token
            .as_ref()
            .or(self.token.as_ref())
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| {
                    VolleyError::Config(
                        "the auth token must be printable ASCII without newlines".to_string(),
                    )
                })
            })
            .transpose()?;
        Ok(ClientAuth { header })
    }

    /// `channel` with every call carrying the token.
    pub fn authed(&self, channel: Channel) -> Result<AuthChannel> {
        Ok(InterceptedService::new(channel, self.client_interceptor()?))
    }
}

/// A channel whose calls carry the auth token.
pub type AuthChannel = InterceptedService<Channel, ClientAuth>;

/// Adds `authorization: Bearer <token>` to outgoing calls.
#[derive(Clone)]
pub struct ClientAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// Rejects calls without the right bearer token with `UNAUTHENTICATED`, before any work.
#[derive(Clone)]
pub struct AuthInterceptor {
    security: Security,
    service: &'static str,
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if let Some(role) = self.security.role_of(presented) {
            let principal = Principal::of(presented);
            let mut request = request;
            request.extensions_mut().insert(role);
            request.extensions_mut().insert(principal);
            return Ok(request);
        }
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let reason = if presented.is_some() {
            "wrong auth token"
        } else {
            "missing auth token"
        };
        tracing::warn!(service = self.service, %peer, reason, "rejected unauthenticated call");
        Err(Status::unauthenticated(format!(
            "{reason}: this Volley {} requires `authorization: Bearer <token>` (--auth-token / {TOKEN_ENV})",
            self.service
        )))
    }
}

/// What a caller may do, from the credential it presented (set by [`AuthInterceptor`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Submit, cancel and fetch results (the client token).
    Client,
    /// Everything, including registering executors, launching tasks, reporting status and
    /// reading shuffle files (the cluster token).
    Cluster,
}

/// The role of an authenticated call.
pub fn role<T>(request: &Request<T>) -> Option<Role> {
    request.extensions().get::<Role>().copied()
}

/// Who a call acts for, as far as per-caller state (the result cache) goes: a hash of the
/// credential it presented, never the credential; empty when it presented none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Principal(String);

impl Principal {
    /// The principal of a call presenting `presented` (an `authorization` header).
    pub fn of(presented: Option<&str>) -> Self {
        Self(presented.map_or_else(String::new, |p| {
            let digest = ring::digest::digest(&ring::digest::SHA256, p.as_bytes());
            digest.as_ref()[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        }))
    }

    /// The scheduler's own callers (in-process library users, resumed jobs).
    pub fn in_process() -> Self {
        Self("in-process".to_string())
    }

    /// Its text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The principal of an authenticated call (set by [`AuthInterceptor`]).
pub fn principal<T>(request: &Request<T>) -> Principal {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or_default()
}

/// Refuse `what` unless the call came with the cluster token.
pub fn require_cluster<T>(request: &Request<T>, what: &str) -> Result<(), Status> {
    if role(request) == Some(Role::Cluster) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{what} needs the cluster token (--cluster-token): client credentials may submit, cancel and fetch results only"
        )))
    }
}

/// True for `localhost` and loopback addresses (127.0.0.0/8, ::1).
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Read a token from `--auth-token`, `--auth-token-file` or nothing.
pub fn load_token(token: Option<String>, file: Option<&Path>) -> Result<Option<String>> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            VolleyError::Config(format!("cannot read token file {}: {e}", file.display()))
        })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(VolleyError::Config(format!(
                "token file {} is empty",
                file.display()
            )));
        }
        return Ok(Some(token));
    }
    Ok(token.filter(|t| !t.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_checks() {
        let open = Security::none();
        assert!(open.token_matches(None));
        let secured = Security::none().with_token(Some("s3cret".to_string()));
        assert!(secured.token_matches(Some("Bearer s3cret")));
        assert!(!secured.token_matches(Some("Bearer s3cre")));
        assert!(!secured.token_matches(Some("s3cret")));
        assert!(!secured.token_matches(None));
        let mut interceptor = secured.server_interceptor("scheduler");
        let err = interceptor.call(Request::new(())).err().map(|s| s.code());
        assert_eq!(err, Some(tonic::Code::Unauthenticated));
        let mut client = secured.client_interceptor().unwrap();
        let stamped = client.call(Request::new(())).unwrap();
        assert!(interceptor.call(stamped).is_ok());
    }

    #[test]
    fn roles() {
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(Security::none().role_of(None), Some(Role::Cluster));
        let one = Security::none().with_token(Some("c".to_string()));
        assert_eq!(one.role_of(Some(&bearer("c"))), Some(Role::Cluster));
        assert_eq!(one.role_of(None), None);
        let two = one.clone().with_cluster_token(Some("k".to_string()));
        assert_eq!(two.role_of(Some(&bearer("c"))), Some(Role::Client));
        assert_eq!(two.role_of(Some(&bearer("k"))), Some(Role::Cluster));
        assert_eq!(two.role_of(Some(&bearer("x"))), None);
        assert_eq!(two.role_of(None), None);
        let open_clients = Security::none().with_cluster_token(Some("k".to_string()));
        assert_eq!(open_clients.role_of(None), Some(Role::Client));
        assert_eq!(
            open_clients.role_of(Some(&bearer("k"))),
            Some(Role::Cluster)
        );
        // A client of the cluster presents the client token, its processes the cluster token.
        let mut stamp = two.for_clients().client_interceptor().unwrap();
        let stamped = stamp.call(Request::new(())).unwrap();
        let mut interceptor = two.server_interceptor("scheduler");
        let seen = interceptor.call(stamped).unwrap();
        assert_eq!(role(&seen), Some(Role::Client));
        let mut stamp = two.client_interceptor().unwrap();
        let seen = interceptor
            .call(stamp.call(Request::new(())).unwrap())
            .unwrap();
        assert_eq!(role(&seen), Some(Role::Cluster));
    }
}
