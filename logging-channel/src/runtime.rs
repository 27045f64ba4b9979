//! The process's network runtime: tokio on its own threads, shared by every listener and
//! connection. Callers of the public API never run on it; they wait on std primitives.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};

use crate::ChannelError;

/// The runtime's handle, started on first use.
pub(crate) fn handle() -> Result<Handle, ChannelError> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ftvmm-net")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(ChannelError::Runtime(e.clone())),
    }
}
