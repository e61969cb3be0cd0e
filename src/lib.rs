//! herald: a WebSocket notification gateway.
//!
//! Data path, top to bottom: [`broker`] (Redis subscriber, or HTTP publishes in embedded
//! mode) → [`message`] (validate once, stamp, frame once) → [`router`] (which loops hold the
//! user or topic) → [`event_loop`] (which connections, bounded queues, writev) → sockets.

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(rust_2018_idioms)]

pub mod auth;
pub mod broker;
pub mod config;
pub mod conn;
pub mod dialect;
pub mod event_loop;
pub mod frame;
pub mod http;
pub mod message;
pub mod metrics;
pub mod router;
pub mod server;
pub mod shared;
