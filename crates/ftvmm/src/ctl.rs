//! `ftvmm ctl --api-socket PATH <request>`: asks a running ftvmm through its API socket and
//! prints the answer (JSON); `console` attaches to the guest's console instead
//! ([`crate::console`]). Exit status 0 when it was done, 1 when `verify-disk` found the
//! copies different, 2 when it was refused or the socket does not answer as an ftvmm's would
//! (one line on stderr says why).

use clap::{Parser, Subcommand};
use ft_pair::api::{Request, SwitchoverPlan, Then};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Talks to a running ftvmm.
#[derive(Parser, Debug)]
#[command(name = "ftvmm ctl")]
struct CtlArgs {
    /// The API socket the ftvmm was started with (`--api-socket`).
    #[arg(long)]
    api_socket: PathBuf,
    #[command(subcommand)]
    request: CtlRequest,
}

#[derive(Subcommand, Debug)]
enum CtlRequest {
    /// The pair's status as JSON (docs/OPERATIONS.md lists the fields).
    Status,
    /// Stops the guest cleanly: a primary stops its backup with it.
    Stop,
    /// Hands the running guest to the backup with nothing lost: the primary drains its log,
    /// the backup goes live where it ends, and this side stops or becomes the new backup.
    Switchover {
        /// What the old primary does afterwards.
        #[arg(long, value_enum, default_value = "stop")]
        then: ThenArg,
        /// Before pausing the guest, run it at half speed until the backup has replayed
        /// everything sent more than this before (at most 5 s): the pause then waits for that
        /// little replay, not the whole lag. `0` pauses at once.
        #[arg(long, default_value = "3ms", value_parser = crate::cli::parse_duration_or_zero)]
        converge: Duration,
    },
    /// Compares the two copies of a mirrored disk at one log position (sent to the primary):
    /// prints the outcome, exit status 1 if they differ (the backup then heals its copy).
    VerifyDisk,
    /// Attaches this terminal to the guest's serial console on the live side (raw mode on a
    /// terminal; detach with Ctrl-] or `~.` at the start of a line). Exit status 0 when
    /// detached, 1 when the ftvmm closed it, 2 when refused (a backup that follows) or
    /// unreachable.
    Console,
}

/// `--then`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ThenArg {
    /// Stop (exit 0).
    Stop,
    /// Attach to the new primary as its backup.
    Backup,
}

pub(crate) fn main() -> ExitCode {
    let args = CtlArgs::parse_from(std::env::args().skip(1));
    let request = match args.request {
        CtlRequest::Console => return crate::console::main(&args.api_socket),
        CtlRequest::Status => Request::Status,
        CtlRequest::Stop => Request::Stop,
        CtlRequest::Switchover { then, converge } => Request::Switchover(SwitchoverPlan {
            then: match then {
                ThenArg::Stop => Then::Stop,
                ThenArg::Backup => Then::Backup,
            },
            converge,
        }),
        CtlRequest::VerifyDisk => Request::VerifyDisk,
    };
    match ask(&args.api_socket, request) {
        Ok(answer) => {
            print!("{answer}");
            match serde_json::from_str::<serde_json::Value>(&answer) {
                Ok(v) if v.get("error").is_some() => {
                    eprintln!(
                        "ftvmm ctl: refused: {}",
                        v["error"].as_str().unwrap_or_default()
                    );
                    ExitCode::from(2)
                }
                Ok(v) if v.get("result").and_then(|r| r.as_str()) == Some("mismatch") => {
                    eprintln!(
                        "ftvmm ctl: the copies differ at log position {}: {} blocks (the first: {})",
                        v["position"], v["differing"], v["first_differing"]
                    );
                    ExitCode::from(1)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("ftvmm ctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// The longest answer read (a status document is a few KiB).
const MAX_ANSWER: u64 = 1 << 20;

/// Why `ftvmm ctl` got no answer it can use.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    /// `connect` on the socket path failed: no such socket, or nobody listening on it.
    #[error("cannot reach {path}: {source} (is an ftvmm running with --api-socket {path}?)")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    /// The request could not be written within 5 s.
    #[error("{path}: {source} (not an ftvmm API socket?)")]
    Send {
        path: String,
        source: std::io::Error,
    },
    /// Reading the answer failed or timed out (30 s, 120 s for a switchover).
    #[error("{path}: no answer: {source}")]
    NoAnswer {
        path: String,
        source: std::io::Error,
    },
    /// The peer closed the connection without writing a byte.
    #[error("{0}: the socket closed without answering (not an ftvmm API socket?)")]
    Closed(String),
    /// The answer does not parse as JSON; `said` holds its first 80 characters.
    #[error("{path}: the answer is not JSON: not an ftvmm API socket (it said: {said:?})")]
    NotJson { path: String, said: String },
}

fn ask(socket: &std::path::Path, request: Request) -> Result<String, CtlError> {
    let path = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|source| CtlError::Unreachable {
        path: path.clone(),
        source,
    })?;
    // A switchover waits for the backup to drain the log and go live.
    let wait = match request {
        Request::Switchover(_) | Request::VerifyDisk => Duration::from_secs(180),
        _ => Duration::from_secs(30),
    };
    let _ = stream.set_read_timeout(Some(wait));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    // One write: a peer that answers the first bytes and closes must not see a half request.
    stream
        .write_all(format!("{}\n", request.line()).as_bytes())
        .map_err(|source| CtlError::Send {
            path: path.clone(),
            source,
        })?;
    let mut answer = String::new();
    stream
        .take(MAX_ANSWER)
        .read_to_string(&mut answer)
        .map_err(|source| CtlError::NoAnswer {
            path: path.clone(),
            source,
        })?;
    if answer.is_empty() {
        return Err(CtlError::Closed(path));
    }
    if serde_json::from_str::<serde_json::Value>(&answer).is_err() {
        return Err(CtlError::NotJson {
            path,
            said: answer.chars().take(80).collect(),
        });
    }
    Ok(answer)
}
