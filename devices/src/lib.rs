//! Device models (filled in below).
