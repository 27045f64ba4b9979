//! ft-core: the determinism boundary of ftvmm.
//!
//! Everything the guest can observe that is not a function of its own state enters through
//! [`boundary::Boundary`]; every output to the world leaves through it. The vCPU loop reports
//! each synchronous exit to it ([`exit::SyncExit`]), which is the only notion of position in the
//! instruction stream this platform has (DESIGN.md section 2). Standalone runs use
//! [`live::LiveBoundary`]; record, replay and the live backup are further implementations.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod boundary;
pub mod disk;
pub mod exit;
pub mod live;
pub mod log;
pub mod output;
pub mod record;
pub mod replay;
pub mod takeover;
pub mod wire;

pub use boundary::{Boundary, BoundaryError, Input, OutputKind, Point, RunEnd, WaitRequest};
pub use exit::{ExitDigest, ExitKind, SyncExit};
