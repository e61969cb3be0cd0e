//! herald: a WebSocket notification gateway.
//!
//! Data path, top to bottom: a publish arrives (the Redis reader, or an HTTP request on an
//! event loop) → [`message`] (validate once, stamp, frame once) → [`route`] (which loops hold
//! the user or topic) → [`mailbox`] → [`event_loop`] (which connections, bounded queues,
//! writev) → sockets. [`broker`] is the seam between herald and where publishes travel.
//!
//! Imports point downward only: [`ids`], [`sse`], [`frame`], [`metrics`], [`config`] at the bottom;
//! then [`message`], [`conn`], [`mailbox`], [`route`], [`admission`], [`jwks`]; then [`broker`];
//! [`shared`]; [`http`]; [`event_loop`]; [`server`] at the top.

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(rust_2018_idioms)]

pub mod admission;
pub mod auth;
pub mod broker;
pub mod config;
pub mod conn;
pub mod dialect;
pub mod event_loop;
pub mod frame;
pub mod history;
pub mod http;
pub mod ids;
pub mod jwks;
pub mod mailbox;
pub mod message;
pub mod metrics;
pub mod percent;
pub mod presence;
pub mod route;
pub mod server;
pub mod shared;
pub mod sse;
pub mod tick;
pub mod tls;
pub mod webhook;
