//! logging-channel: not implemented yet.
