//! What can go wrong in an operator command, said in one line, and the exit
//! code: 2 for a command line or file that cannot work, 1 for everything the
//! registry (or the way to it) answered.
//!
//! A transport error's text is reqwest's chain of wrappers; the line keeps the
//! innermost cause ("Connection refused"), which is the part an operator acts on.
//! The registry's own message is quoted for 4xx answers, cleaned of control
//! characters so it stays one line.

use std::time::Duration;

use reqwest::StatusCode;
use trellis_shared::{ClientError, InstanceId, ServiceName};
use url::Url;

use super::table::clean;

/// A command's failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The flags or files cannot work (a bad URL, an unreadable token or CA).
    #[error("{0}")]
    Setup(String),
    /// Boxed: a client error is large, and every command returns this type.
    #[error(transparent)]
    Client(Box<ClientError>),
    /// No instance of the service is registered (it is not in `registry services`).
    #[error("no service \"{0}\": no instance of it is registered")]
    UnknownService(ServiceName),
    #[error("{service}/{id} is not registered")]
    UnknownInstance { service: ServiceName, id: InstanceId },
    /// Printing failed (a closed pipe is not reported, see [`CliError::is_closed_output`]).
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(Box::new(e))
    }
}

/// What the message may say about how the command was set up.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// A token was given (`--token-file` or `TRELLIS_TOKEN`).
    pub token: bool,
    /// `--registry-ca` was given.
    pub ca: bool,
    /// `--timeout`.
    pub timeout: Duration,
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Setup(_) => 2,
            _ => 1,
        }
    }

    /// The reader went away (`registry watch users | head`): nothing to report.
    pub fn is_closed_output(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The one line printed after `registry <command>: `.
    pub fn line(&self, context: &Context) -> String {
        let line = match self {
            CliError::Client(e) => describe(e, context),
            other => other.to_string(),
        };
        clean(&line)
    }
}

/// A client error in the operator's terms.
pub fn describe(e: &ClientError, context: &Context) -> String {
    match e {
        ClientError::Transport { url, source } if source.is_timeout() => {
            format!("the registry at {} did not answer within {}", origin(url), humantime::format_duration(context.timeout))
        }
        ClientError::Transport { url, source } => {
            format!("cannot reach the registry at {}: {}", origin(url), innermost(source))
        }
        ClientError::Api { url, status, body } => {
            let hint = match *status {
                StatusCode::UNAUTHORIZED if !context.token => " (give a token: --token-file or TRELLIS_TOKEN)",
                _ => "",
            };
            let verb = if status.is_client_error() { "refused the request" } else { "failed" };
            format!(
                "the registry at {} {verb}: {} {}: {}{hint}",
                origin(url),
                status.as_u16(),
                body.error,
                body.message
            )
        }
        ClientError::Certificate { url, source } => {
            let trusted = if context.ca { "--registry-ca" } else { "the web roots (a private CA needs --registry-ca)" };
            format!(
                "the TLS certificate of the registry at {} does not verify against {trusted}: {}",
                origin(url),
                innermost(source)
            )
        }
        ClientError::ClientCertificate { url, source } => format!(
            "the registry at {} refused this client's TLS certificate (check --registry-cert and --registry-key): {}",
            origin(url),
            innermost(source)
        ),
        other => other.to_string(),
    }
}

/// `scheme://host:port` of a request URL: where, without the route.
fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The last error in `e`'s chain, looking inside `io::Error`s (whose
/// `source` skips the error they wrap).
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    loop {
        let next = last.source().or_else(|| {
            last.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn std::error::Error + 'static))
        });
        match next {
            Some(n) => last = n,
            None => return last.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_shared::{ErrorBody, ErrorCode};

    fn context(token: bool) -> Context {
        Context { token, ca: false, timeout: Duration::from_secs(5) }
    }

    #[test]
    fn a_refusal_quotes_the_registry_in_one_line_and_hints_at_a_missing_token() {
        let e = ClientError::Api {
            url: Url::parse("http://10.0.0.1:7600/v1/services").unwrap(),
            status: StatusCode::UNAUTHORIZED,
            body: ErrorBody {
                error: ErrorCode::Unauthenticated,
                message: "this request needs\na token".into(),
            },
        };
        let line = CliError::from(e).line(&context(false));
        assert_eq!(
            line,
            "the registry at http://10.0.0.1:7600 refused the request: 401 unauthenticated: \
             this request needs\\na token (give a token: --token-file or TRELLIS_TOKEN)"
        );
        let e = ClientError::Api {
            url: Url::parse("https://r:7600/v1/services/users").unwrap(),
            status: StatusCode::FORBIDDEN,
            body: ErrorBody {
                error: ErrorCode::PermissionDenied,
                message: "token \"b\" may not read".into(),
            },
        };
        let line = CliError::from(e).line(&context(true));
        assert_eq!(
            line,
            "the registry at https://r:7600 refused the request: 403 permission_denied: token \"b\" may not read"
        );
    }

    #[test]
    fn exit_codes_tell_setup_from_the_registry() {
        assert_eq!(CliError::Setup("x".into()).exit_code(), 2);
        let unknown = CliError::UnknownService(ServiceName::new("users").unwrap());
        assert_eq!(unknown.exit_code(), 1);
        assert_eq!(unknown.line(&context(false)), "no service \"users\": no instance of it is registered");
        let pipe = CliError::Output(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(pipe.is_closed_output());
    }
}
