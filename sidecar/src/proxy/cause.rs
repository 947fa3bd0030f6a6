//! What an error chain says about an attempt: the questions the retry and
//! ejection rules ask of an error (was the connection refused, did an HTTP/2
//! endpoint refuse the stream, did the client's own body fail), answered by
//! walking `source()` once through one helper, and the whole chain as one line
//! for the answer's message.

use std::error::Error;

/// Whether any error in the chain starting at `e` satisfies `pred`.
fn any_in_chain(e: &(dyn Error + 'static), mut pred: impl FnMut(&(dyn Error + 'static)) -> bool) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if pred(err) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The connection was refused: nothing listens there, and nothing was sent.
pub fn is_refused(e: &(dyn Error + 'static)) -> bool {
    any_in_chain(e, |err| {
        err.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// An HTTP/2 endpoint refused the stream (`REFUSED_STREAM`): by the protocol,
/// it processed nothing of it.
pub fn is_refused_stream(e: &(dyn Error + 'static)) -> bool {
    any_in_chain(e, |err| {
        err.downcast_ref::<h2::Error>().is_some_and(|h2| h2.reason() == Some(h2::Reason::REFUSED_STREAM))
    })
}

/// Sending failed because reading the client's own request body failed (hyper
/// reports the body's error as a user error).
pub fn is_client_body_error(e: &(dyn Error + 'static)) -> bool {
    any_in_chain(e, |err| err.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_user()))
}

/// `outer: inner: innermost`, for error messages and logs.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn finds_a_refusal_anywhere_in_the_chain() {
        let refused = Outer(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert!(is_refused(&refused));
        assert_eq!(chain(&refused), "outer: refused");
        let reset = Outer(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(!is_refused(&reset));
        assert!(!is_refused_stream(&reset));
        assert!(!is_client_body_error(&reset));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("stream failed")]
    struct Stream(#[source] h2::Error);

    #[test]
    fn finds_a_refused_stream() {
        assert!(is_refused_stream(&Stream(h2::Error::from(h2::Reason::REFUSED_STREAM))));
        assert!(!is_refused_stream(&Stream(h2::Error::from(h2::Reason::CANCEL))));
    }
}
