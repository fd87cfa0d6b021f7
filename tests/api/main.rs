//! Integration tests: one binary, one module per feature, all through `common`.

#[path = "../common/mod.rs"]
mod common;

mod billing;
mod chaos;
mod classes;
mod compression;
mod delivery;
mod failover;
mod faults;
mod handover;
mod hostile;
mod lifecycle;
mod model;
mod model_pair;
mod publish_api;
mod readiness;
mod scale_out;
mod startup;
