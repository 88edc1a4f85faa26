//! L0: keeping a scheduler's leadership lease in etcd alive (for the etcd store).

use std::time::Duration;

use etcd_client::Client;

/// Lease of the leader key: a leader that cannot renew it for this long is replaced.
pub const LEASE_TTL_SECS: i64 = 5;

/// Keep `lease` alive, and check that the leader key `key` still holds it, until either
/// fails; returns why it stopped. A renewal that fails or is slow is tried again for as long
/// as the lease surely lives (its TTL from the last renewal, less a second).
pub(super) async fn keep_alive(client: &mut Client, lease: i64, key: &str) -> String {
    let ttl = Duration::from_secs(u64::try_from(LEASE_TTL_SECS).unwrap_or(5));
    let interval = ttl / 3;
    let mut renewed_at = tokio::time::Instant::now();
    let mut stream = None;
    loop {
        if renewed_at.elapsed() + Duration::from_secs(1) >= ttl {
            return "the lease could not be renewed before it expired (etcd unreachable)"
                .to_string();
        }
        if stream.is_none() {
            stream = client.lease_keep_alive(lease).await.ok();
        }
        let renewal = match stream.as_mut() {
            Some((keeper, answers)) => {
                tokio::time::timeout(interval, async {
                    keeper.keep_alive().await?;
                    answers.message().await
                })
                .await
            }
            None => Ok(Err(etcd_client::Error::LeaseKeepAliveError(
                "no keep-alive stream".into(),
            ))),
        };
        match renewal {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => renewed_at = tokio::time::Instant::now(),
            Ok(Ok(Some(_))) => return "the lease expired".to_string(),
            // A broken stream or a slow answer: open a new stream and try again.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                stream = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        match client.get(key, None).await {
            Ok(answer) if answer.kvs().first().is_none_or(|kv| kv.lease() != lease) => {
                return "another scheduler holds the leader key".to_string();
            }
            _ => {}
        }
        tokio::time::sleep(interval).await;
    }
}
