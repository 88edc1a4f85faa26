//! HTTP Basic for Flight SQL clients (any user name, the token as password), turned into the
//! bearer token every other RPC presents before the usual check.

use base64::Engine;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use volley_core::security::AuthInterceptor;

/// Takes `authorization: Basic base64(user:token)` as the bearer token it carries, then checks
/// the call like every other RPC.
#[derive(Clone)]
pub struct FlightSqlAuth(pub AuthInterceptor);

impl Interceptor for FlightSqlAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let basic = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .map(str::to_string);
        if let Some(encoded) = basic {
            // Padded or not: Go's Flight client sends it unpadded.
            let engine = base64::engine::GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            );
            let decoded = engine
                .decode(encoded.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or_else(|| Status::unauthenticated("malformed Basic credentials"))?;
            let token = decoded.split_once(':').map_or("", |(_, password)| password);
            let bearer = format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::unauthenticated("malformed Basic credentials"))?;
            request.metadata_mut().insert("authorization", bearer);
        }
        self.0.call(request)
    }
}
