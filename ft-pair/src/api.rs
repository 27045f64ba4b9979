//! What a node answers on its API socket (`ftvmm ctl`): the requests, and the functions a node
//! hands the socket's server. The socket itself (a Unix socket, one request line, one JSON
//! answer) is the binary's.

use crate::status::Status;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// A planned switchover as asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchoverPlan {
    /// What the old primary does once the backup is live.
    pub then: Then,
    /// Before it pauses the guest, the primary runs it at half speed until the backup has
    /// replayed everything sent more than this before (for at most
    /// [`crate::primary::CONVERGE_LIMIT`]): the pause then waits for that little replay, not
    /// for the whole lag. Zero: pause at once.
    pub converge: Duration,
}

impl SwitchoverPlan {
    /// How close the backup comes before the pause unless asked otherwise.
    pub const DEFAULT_CONVERGE: Duration = Duration::from_millis(3);

    /// `then`, converging to the default bound.
    pub fn then(then: Then) -> SwitchoverPlan {
        SwitchoverPlan {
            then,
            converge: Self::DEFAULT_CONVERGE,
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
    Switchover(SwitchoverPlan),
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
            Request::Switchover(plan) => format!(
                "switchover {} converge-us={}",
                plan.then.as_str(),
                plan.converge.as_micros()
            ),
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
            ["switchover", rest @ ..] => switchover(rest)
                .map(Request::Switchover)
                .ok_or_else(|| UnknownRequest(line.trim().to_string())),
            ["verify-disk"] => Ok(Request::VerifyDisk),
            ["console"] => Ok(Request::Console),
            _ => Err(UnknownRequest(line.trim().to_string())),
        }
    }
}

/// `switchover [stop|backup] [converge-us=N]`'s words after the first.
fn switchover(words: &[&str]) -> Option<SwitchoverPlan> {
    let mut plan = SwitchoverPlan::then(Then::Stop);
    let mut words = words.iter().peekable();
    match words.peek() {
        Some(&&"stop") => {
            words.next();
        }
        Some(&&"backup") => {
            plan.then = Then::Backup;
            words.next();
        }
        _ => {}
    }
    if let Some(w) = words.next() {
        let us: u64 = w.strip_prefix("converge-us=")?.parse().ok()?;
        plan.converge = Duration::from_micros(us);
    }
    words.next().is_none().then_some(plan)
}

/// unknown request `{0}`: try `status`, `stop`, `switchover [stop|backup] [converge-us=N]`,
/// `verify-disk` or `console`
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown request `{0}`: try `status`, `stop`, `switchover [stop|backup] [converge-us=N]`, `verify-disk` or `console`"
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
            Ok(Request::Switchover(SwitchoverPlan::then(Then::Stop)))
        );
        assert_eq!(
            Request::parse("switchover backup"),
            Ok(Request::Switchover(SwitchoverPlan::then(Then::Backup)))
        );
        assert_eq!(
            Request::parse("switchover converge-us=0"),
            Ok(Request::Switchover(SwitchoverPlan {
                then: Then::Stop,
                converge: Duration::ZERO
            }))
        );
        for r in [
            Request::Status,
            Request::Stop,
            Request::Switchover(SwitchoverPlan::then(Then::Backup)),
            Request::Switchover(SwitchoverPlan {
                then: Then::Stop,
                converge: Duration::from_micros(1500),
            }),
            Request::VerifyDisk,
            Request::Console,
        ] {
            assert_eq!(Request::parse(&r.line()), Ok(r));
        }
        assert!(Request::parse("switchover sideways").is_err());
        assert!(Request::parse("switchover backup converge-us=x").is_err());
        assert!(Request::parse("switchover backup converge-us=1 more").is_err());
        assert!(Request::parse("switchover converge=1").is_err());
        assert!(Request::parse("").is_err());
        assert!(Request::parse("GET / HTTP/1.1").is_err());
    }
}
