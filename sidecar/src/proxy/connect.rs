//! A new HTTP/1.1 connection for one attempt (when the pool has no idle one),
//! hedged.
//!
//! Why hedge a connect: a backend whose accept queue is full drops the SYN,
//! and the kernel sends it again only after a second. A connect that has not
//! completed after `connect_hedge` (100 ms by default, where a healthy
//! connect takes well under a millisecond on one network) is most likely
//! such a drop, so a connect to another endpoint starts beside it and the
//! first connection made wins; the other is abandoned. Nothing of the request
//! has been sent while connecting, so this is safe for any method, and the
//! request is still sent once. The slow endpoint is marked suspect (loaded,
//! not broken: no ejection is counted), so new requests prefer others for a
//! moment. Happy Eyeballs (RFC 8305) races connects the same way, with a
//! 250 ms delay between address families.
//!
//! Every wait here ends at the attempt's deadline; the caller then treats the
//! attempt as timed out.

use std::future::Future;
use std::pin::Pin;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use tracing::debug;

use super::attempts::Attempts;
use super::pool::Sender;
use super::ProxyContext;
use crate::balance::Pick;
use crate::endpoints::InFlight;
use crate::outlier::Outcome;

/// A new connection for the attempt, on `pick`'s endpoint (which may be the
/// hedge's rather than the one first chosen).
pub(super) struct Connected<'a> {
    pub pick: Pick<'a>,
    pub guard: InFlight,
    pub tx: Sender,
}

/// No connection: the failure of `pick`'s endpoint (any hedge's failure was
/// recorded already).
pub(super) struct NotConnected<'a> {
    pub pick: Pick<'a>,
    pub guard: InFlight,
    pub refused: bool,
    pub cause: String,
    /// The attempt's deadline passed first.
    pub timed_out: bool,
}

type ConnectResult = Result<Sender, (bool, String)>;

/// Most connects one attempt has pending at once: the first and its hedges.
const MAX_CONNECTS: usize = 4;

type Racing<'f> = FuturesUnordered<Pin<Box<dyn Future<Output = (Option<usize>, ConnectResult)> + Send + 'f>>>;

/// Connects for one attempt to `pick` (whose in-flight `guard` is held),
/// hedging as the module doc says (when given the request's `attempts`),
/// until `deadline`. Each hedge goes to
/// another endpoint when one is usable, else to the same one again: a new
/// connect sends a new SYN at once, where the kernel would wait a second.
pub(super) async fn connect<'a>(
    ctx: &ProxyContext,
    attempts: Option<&mut Attempts<'a>>,
    pick: Pick<'a>,
    guard: InFlight,
    deadline: Instant,
) -> Result<Connected<'a>, NotConnected<'a>> {
    let delay = ctx.config.connect_hedge;
    let first = ctx.pool.connect(pick.endpoint);
    tokio::pin!(first);
    let mut next_hedge = Instant::now() + delay;
    if delay.is_zero() || next_hedge >= deadline {
        return settle(tokio::time::timeout_at(deadline, first).await, pick, guard);
    }
    // Without the request's attempts (the two attempts of a hedged request),
    // hedges go to the same endpoint only.
    let mut attempts = attempts;
    if let Ok(r) = tokio::time::timeout_at(next_hedge, &mut first).await {
        return settle(Ok(r), pick, guard);
    }
    pick.endpoint.state.outlier.mark_suspect(Instant::now());
    // Hedges to other endpoints, with their picks and guards (taken when they settle).
    let mut others: Vec<Option<(Pick<'a>, InFlight)>> = Vec::new();
    let racing: Racing<'_> = FuturesUnordered::new();
    tokio::pin!(racing);
    let mut launched = 1;
    let mut first_failed: Option<(bool, String)> = None;
    let outcome = |refused: bool| if refused { Outcome::Refused } else { Outcome::Failure };
    loop {
        let may_hedge = launched < MAX_CONNECTS && first_failed.is_none() && next_hedge < deadline;
        tokio::select! {
            r = &mut first, if first_failed.is_none() => match r {
                Ok(tx) => return Ok(Connected { pick, guard, tx}),
                Err(e) => first_failed = Some(e),
            },
            Some((slot, r)) = racing.next(), if !racing.is_empty() => match (slot, r) {
                // The same endpoint, on a later SYN.
                (None, Ok(tx)) => return Ok(Connected { pick, guard, tx}),
                (None, Err(_)) => {}
                (Some(i), Ok(tx)) => {
                    if let Some((won, won_guard)) = others.get_mut(i).and_then(Option::take) {
                        let mut lost = pick;
                        if let (Some((refused, _)), Some(a)) = (&first_failed, attempts.as_deref()) {
                            a.failed(&mut lost, outcome(*refused));
                        }
                        return Ok(Connected { pick: won, guard: won_guard, tx});
                    }
                }
                (Some(i), Err((refused, cause))) => {
                    if let (Some((mut failed, _)), Some(a)) = (others.get_mut(i).and_then(Option::take), attempts.as_deref()) {
                        a.failed(&mut failed, outcome(refused));
                        debug!(endpoint = %failed.endpoint.authority, %cause, "hedged connect failed");
                    }
                }
            },
            _ = tokio::time::sleep_until(next_hedge), if may_hedge => {
                launched += 1;
                next_hedge += delay;
                let pool = &ctx.pool;
                match attempts.as_deref_mut().and_then(|a| a.alternative(&pick)) {
                    Some(alt) => {
                        let endpoint = alt.endpoint;
                        debug!(slow = %pick.endpoint.authority, hedge = %endpoint.authority, "connect still pending; hedging");
                        let slot = others.len();
                        racing.push(Box::pin(async move { (Some(slot), pool.connect(endpoint).await) }));
                        let alt_guard = ctx.begin(alt.endpoint);
                        others.push(Some((alt, alt_guard)));
                    }
                    None => {
                        let endpoint = pick.endpoint;
                        debug!(slow = %endpoint.authority, "connect still pending and no other endpoint; connecting again");
                        racing.push(Box::pin(async move { (None, pool.connect(endpoint).await) }));
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(NotConnected { pick, guard, refused: false, cause: too_late(), timed_out: true });
            }
        }
        if racing.is_empty() {
            if let Some((refused, cause)) = first_failed {
                return Err(NotConnected { pick, guard, refused, cause, timed_out: false });
            }
        }
    }
}

fn too_late() -> String {
    "no connection within the attempt's time".into()
}

fn settle<'a>(
    r: Result<ConnectResult, tokio::time::error::Elapsed>,
    pick: Pick<'a>,
    guard: InFlight,
) -> Result<Connected<'a>, NotConnected<'a>> {
    match r {
        Ok(Ok(tx)) => Ok(Connected { pick, guard, tx }),
        Ok(Err((refused, cause))) => Err(NotConnected { pick, guard, refused, cause, timed_out: false }),
        Err(_) => Err(NotConnected { pick, guard, refused: false, cause: too_late(), timed_out: true }),
    }
}
