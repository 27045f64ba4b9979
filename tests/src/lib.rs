//! Support for the integration tests: find the `ftvmm` binary and the guest images, run the
//! binary as a real process with scripted serial input and a time limit, start a fault-tolerant
//! pair on loopback or on simulated hosts, and check what it printed.
//!
//! The tests need `/dev/kvm`, a built `ftvmm` (`cargo build --release -p ftvmm`, which
//! `scripts/test` does first) and the test guests (`images/build-test-guests`).
//!
//! One module a concern, all re-exported here (`use ftvmm_tests::{...}`):
//!
//! | module | what it holds |
//! | --- | --- |
//! | `paths` | the workspace root, the `ftvmm` binary, the test guests, scratch directories |
//! | `lane` | the host probe, TCG, the flags a lane adds, trial counts from the environment |
//! | `run` | `Ftvmm` (one process's flags), `Run` (what a run did), `ctl`, `wait_until` |
//! | `process` | `Proc`: a process in the background |
//! | `proxy` | `Proxy`: the TCP proxy between a backup and its primary |
//! | `pair` | `Pair`: a primary and its backup, started and attached (`Sides`); key files |
//! | `net` | `Hosts`: simulated hosts (network namespaces), `sh` |
//! | `etcd` | `Etcd`: the lock service of the multi-host tests |
//! | `linux` | the Linux guest: images, machine flags, the booted snapshots, fault reports |
//! | `checks` | the serial stream across failovers, numbered lines, status numbers |

mod checks;
mod etcd;
mod lane;
mod linux;
mod net;
mod pair;
mod paths;
mod process;
mod proxy;
mod run;

pub use checks::*;
pub use etcd::*;
pub use lane::*;
pub use linux::*;
pub use net::*;
pub use pair::*;
pub use paths::*;
pub use process::*;
pub use proxy::*;
pub use run::*;
