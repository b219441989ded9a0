//! `limit-rps` and `limit-connections`, per client IP and per replica as upstream: a token
//! bucket (burst = rate × `limit-burst-multiplier`) and a concurrent-request count. Limiter
//! state is kept across configuration generations, keyed by the location.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Above this many tracked clients, idle ones are dropped.
const MAX_TRACKED: usize = 65_536;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Requests per second per client IP.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    clients: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(rps: u32, burst_multiplier: u32) -> Self {
        let rate = f64::from(rps.max(1));
        Self {
            rate,
            burst: rate * f64::from(burst_multiplier.max(1)),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip`; false if it has none left.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if clients.len() >= MAX_TRACKED {
            let (rate, burst) = (self.rate, self.burst);
            clients
                .retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
        }
        let bucket = clients.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let refill = now.duration_since(bucket.last).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn same_settings(&self, rps: u32, burst_multiplier: u32) -> bool {
        let other = RateLimiter::new(rps, burst_multiplier);
        other.rate == self.rate && other.burst == self.burst
    }
}

/// Concurrent requests per client IP.
#[derive(Debug, Default)]
pub struct ConnLimiter {
    limit: u32,
    clients: Mutex<HashMap<IpAddr, Arc<AtomicU32>>>,
}

/// Releases its slot when dropped.
#[derive(Debug)]
pub struct ConnSlot(Arc<AtomicU32>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnLimiter {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            clients: Mutex::default(),
        }
    }

    /// A slot for `ip`, or None at the limit.
    pub fn acquire(&self, ip: IpAddr) -> Option<ConnSlot> {
        let counter = {
            let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
            if clients.len() >= MAX_TRACKED {
                clients.retain(|_, c| c.load(Ordering::Acquire) > 0);
            }
            clients.entry(ip).or_default().clone()
        };
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        if prev >= self.limit {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnSlot(counter))
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Whether any client holds a slot now.
    pub fn in_use(&self) -> bool {
        let clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.values().any(|c| c.load(Ordering::Acquire) > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let l = RateLimiter::new(2, 5);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let t0 = Instant::now();
        assert_eq!((0..12).filter(|_| l.allow(ip, t0)).count(), 10);
        assert!(l.allow(other, t0), "limits are per client");
        assert!(!l.allow(ip, t0 + Duration::from_millis(100)));
        assert!(l.allow(ip, t0 + Duration::from_millis(600)));
    }

    #[test]
    fn connection_slots() {
        let l = ConnLimiter::new(2);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let a = l.acquire(ip).expect("1");
        let _b = l.acquire(ip).expect("2");
        assert!(l.acquire(ip).is_none());
        drop(a);
        assert!(l.acquire(ip).is_some());
    }
}
