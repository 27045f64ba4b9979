//! `ftvmm ctl --api-socket PATH <request>`: asks a running ftvmm through its API socket and
//! prints the answer (JSON).

use clap::Parser;
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
    /// What to ask: `status`.
    request: String,
}

pub(crate) fn main() -> ExitCode {
    let args = CtlArgs::parse_from(std::env::args().skip(1));
    match ask(&args) {
        Ok(answer) => {
            print!("{answer}");
            if answer.contains("\"error\"") {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("ftvmm ctl: {e}");
            ExitCode::from(2)
        }
    }
}

fn ask(args: &CtlArgs) -> Result<String, String> {
    let path = args.api_socket.display();
    let mut stream = UnixStream::connect(&args.api_socket).map_err(|e| {
        format!("cannot reach {path}: {e} (is an ftvmm running with --api-socket {path}?)")
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    writeln!(stream, "{}", args.request).map_err(|e| format!("{path}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("{path}: no answer: {e}"))?;
    if answer.is_empty() {
        return Err(format!(
            "{path}: the ftvmm closed the socket without answering"
        ));
    }
    Ok(answer)
}
