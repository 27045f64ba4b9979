//! ft-core
