//! The agent's HTTP endpoints. Each is an axum `Router` on a listener of its
//! own with an authentication of its own, run by [`serve`] until the
//! daemon's shutdown token fires and joined by `daemon::run` like the other
//! tasks. A listener per endpoint keeps their doors apart: who can reach
//! one cannot reach another through it, and each can be bound to the
//! interface that needs it.
//!
//! - [`metrics`]: `GET /metrics`, Prometheus text on `--metrics-listen`
//!   (off by default), unauthenticated as scrape targets are: it shows
//!   counts and GPU ids, no secrets.
//! - [`identity`]: the token endpoint, `GET /msi/token` (Azure ML's
//!   protocol, `MSI_ENDPOINT`) and `GET /identity/token` (App Service's,
//!   `IDENTITY_ENDPOINT`) on `--identity-listen` (`127.0.0.1:46808` by
//!   default; `off` turns it off). It hands job containers managed-identity
//!   tokens through `drover_imds`'s cache, each request authenticated by
//!   its part's own secret (`MSI_SECRET`/`IDENTITY_HEADER`) and authorized
//!   for the part's cluster's identities only (see `crate::identity`).
//!   Loopback is reachable from job containers that share the node's
//!   network: multi-node parts (`--node-network`, `host` on a VM) and
//!   every part of a local cluster. Single-node parts on Docker's default
//!   bridge have a loopback of their own: on such nodes bind the bridge's
//!   gateway (`--identity-listen 172.17.0.1:46808`), which both they and
//!   host-network parts reach; the variables parts get name the address
//!   bound (loopback when it is unspecified, `0.0.0.0`).
//!
//! MPI's launch door is not here: it is `drover-init launch-listen` in
//! the job's own containers.
//!
//! Every endpoint answers 404 for a path it does not serve and 405 for a
//! method a path does not take.

pub mod identity;
pub mod metrics;

use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long requests in flight at shutdown may take to finish before their
/// connections are dropped: the drain must not wait on a slow client.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown` fires, then lets requests
/// in flight finish for a few seconds. Failures are logged: the endpoint is
/// a task of the daemon, which goes on without it.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let addr = listener.local_addr().ok();
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = server => {
            if let Err(e) = r {
                tracing::error!(addr = ?addr, error = %e, "http server failed");
            }
        }
        () = grace => {
            tracing::warn!(addr = ?addr, grace_s = SHUTDOWN_GRACE.as_secs(), "http requests still open after shutdown; dropping them");
        }
    }
}
