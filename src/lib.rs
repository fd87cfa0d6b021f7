//! chat-sync: fans live chat out to very large audiences over Server-Sent Events.
//!
//! The data's path, top to bottom: [`broker`] receives payloads from Redis (or the
//! in-process broker) into [`session`] inboxes; every tick [`fanout`] captures them,
//! names each message ([`position`]), frames each batch once ([`frame`]), keeps it for
//! resume ([`replay`]), writes it to the shared [`history`] and broadcasts it; [`sse`]
//! streams it to each viewer admitted by [`registry`]; [`http`] is the API; [`billing`]
//! reports the captured counts to the tenant.

pub mod app;
pub mod billing;
pub mod broker;
pub mod class;
pub mod client;
pub mod config;
pub mod error;
pub mod fanout;
pub mod frame;
pub mod gzip;
pub mod history;
pub mod http;
pub mod lag;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod position;
pub mod registry;
pub mod replay;
pub mod server;
pub mod session;
pub mod sse;
pub mod subscription;
pub mod telemetry;
pub mod topology;
pub mod viewer;

pub use app::Application;
pub use config::Config;
