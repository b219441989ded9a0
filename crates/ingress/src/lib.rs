//! Drop-in replacement for ingress-nginx: the controller (watch Ingresses, Services,
//! EndpointSlices, Secrets, the ConfigMap; build a routing snapshot) and the rustls reverse
//! proxy that serves it, in one process, with no reloads.

pub mod annotations;
pub mod app;
pub mod auth;
pub(crate) mod batched_writes;
pub mod cli;
pub mod config;
pub mod control_frames;
pub mod controller;
pub mod cors;
pub mod endpoints;
pub mod framing;
pub mod fuzzing;
pub mod ingress_class;
pub mod keepalive;
pub mod metrics;
pub mod parked;
pub mod path_rules;
pub mod proxy;
pub mod ratelimit;
pub mod send_timeout;
pub mod server;
pub mod snapshot;
pub mod status;
pub mod tls_store;
pub mod upstream;
pub mod values;
pub mod webhook;
pub mod workers;

/// The maps read on every request (routes by host and path, idle upstream connections by
/// destination): foldhash, randomly seeded, instead of SipHash, which cost about a thousand
/// instructions per proxied request. Their keys come from configuration; a client's Host is
/// only looked up, never inserted, so it cannot grow a chain. Maps keyed by what a client
/// chooses (the rate limiters' client addresses, which X-Forwarded-For can set) stay on
/// SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
