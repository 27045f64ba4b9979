//! What a node answers on its API socket (`ftvmm ctl`): the requests, and the functions a node
//! hands the socket's server. The socket itself (a Unix socket, one request line, one JSON
//! answer) is the binary's.

use crate::status::Status;
use std::sync::{Arc, Mutex};

/// What builds the status document.
pub type StatusFn = Arc<dyn Fn() -> Status + Send + Sync>;

/// What the old primary does once its backup went live in a switchover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Stop (exit 0).
    Stop,
    /// Attach to the new primary as its backup.
    Backup,
}

impl Then {
    /// The word for it on the API socket and in the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Then::Stop => "stop",
            Then::Backup => "backup",
        }
    }
}

/// One request on the API socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The status document.
    Status,
    /// Stop the guest cleanly.
    Stop,
    /// Hand the guest over to the backup, then stop or become its backup.
    Switchover(Then),
    /// Compare the two copies of a mirrored disk at one log position.
    VerifyDisk,
    /// Attach to the guest's console: the socket carries its serial line from then on
    /// ([`crate::console`]); the socket's server answers it, not the role.
    Console,
}

impl Request {
    /// The request line for this request.
    pub fn line(self) -> String {
        match self {
            Request::Status => "status".into(),
            Request::Stop => "stop".into(),
            Request::Switchover(then) => format!("switchover {}", then.as_str()),
            Request::VerifyDisk => "verify-disk".into(),
            Request::Console => "console".into(),
        }
    }

    /// A request line as the socket reads it.
    pub fn parse(line: &str) -> Result<Request, UnknownRequest> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => Ok(Request::Status),
            ["stop"] => Ok(Request::Stop),
            ["switchover"] | ["switchover", "stop"] => Ok(Request::Switchover(Then::Stop)),
            ["switchover", "backup"] => Ok(Request::Switchover(Then::Backup)),
            ["verify-disk"] => Ok(Request::VerifyDisk),
            ["console"] => Ok(Request::Console),
            _ => Err(UnknownRequest(line.trim().to_string())),
        }
    }
}

/// unknown request `{0}`: try `status`, `stop`, `switchover stop|backup`, `verify-disk` or
/// `console`
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown request `{0}`: try `status`, `stop`, `switchover stop|backup`, `verify-disk` or `console`"
)]
pub struct UnknownRequest(pub String);

/// Answers requests: what a role serves on its API socket.
pub type ApiFn = Arc<dyn Fn(Request) -> serde_json::Value + Send + Sync>;

/// An error answer.
pub fn refusal(why: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({ "error": why.to_string() })
}

/// A role whose answers change as it goes (a backup that goes live answers as a primary).
#[derive(Clone)]
pub struct SwappableApi(Arc<Mutex<ApiFn>>);

impl SwappableApi {
    /// Answers with `api` until [`SwappableApi::set`].
    pub fn new(api: ApiFn) -> SwappableApi {
        SwappableApi(Arc::new(Mutex::new(api)))
    }

    /// Answers with `api` from now on.
    pub fn set(&self, api: ApiFn) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = api;
    }

    /// The answering function (looked up at each request).
    pub fn api(&self) -> ApiFn {
        let me = self.0.clone();
        Arc::new(move |req| {
            let api = me.lock().unwrap_or_else(|e| e.into_inner()).clone();
            api(req)
        })
    }
}

/// An API that answers only `status`.
pub fn status_only(status: StatusFn, role: &'static str) -> ApiFn {
    Arc::new(move |req| match req {
        Request::Status => status().to_json(),
        Request::Stop | Request::Switchover(_) | Request::VerifyDisk | Request::Console => {
            refusal(format!(
                "this ftvmm is a {role}: send `{}` to the primary's API socket",
                req.line()
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(Request::parse("status\n"), Ok(Request::Status));
        assert_eq!(Request::parse(" stop "), Ok(Request::Stop));
        assert_eq!(
            Request::parse("switchover"),
            Ok(Request::Switchover(Then::Stop))
        );
        assert_eq!(
            Request::parse("switchover backup"),
            Ok(Request::Switchover(Then::Backup))
        );
        for r in [
            Request::Status,
            Request::Stop,
            Request::Switchover(Then::Backup),
            Request::VerifyDisk,
            Request::Console,
        ] {
            assert_eq!(Request::parse(&r.line()), Ok(r));
        }
        assert!(Request::parse("switchover sideways").is_err());
        assert!(Request::parse("").is_err());
        assert!(Request::parse("GET / HTTP/1.1").is_err());
    }
}
