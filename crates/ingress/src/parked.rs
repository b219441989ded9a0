//! Connections idle between requests, held by their worker without a task, as nginx holds a
//! keep-alive connection: its socket and a few words, no coroutine (`ngx_http_set_keepalive`).
//!
//! A parked connection is an entry in its listener's [`Lot`]. The socket's read readiness wakes
//! a small [`Token`] (a waker that names the entry, not a task), the lot's one task takes the
//! entry out and spawns the connection again. The same task closes entries whose keep-alive
//! deadline has passed (one sweep per [`SWEEP`], as nginx's timers are coarse too) and, on
//! drain, every entry. An idle connection so costs its entry, its token and tokio's readiness
//! record, not a task sized for serving.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};

use slab::Slab;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the lot closes the connections whose keep-alive deadline has passed.
pub const SWEEP: Duration = Duration::from_secs(1);

/// A connection that can be parked.
pub trait Sleeper: Sized + Send + 'static {
    /// The client's socket, whose readiness wakes the connection.
    fn socket(&self) -> &TcpStream;
    /// Serves the connection again: bytes (or its end) arrived.
    fn wake(self, lot: Lot<Self>) -> impl Future<Output = ()> + Send + 'static;
    /// Closes it as the server does on drain (TLS: close_notify first).
    fn close(self) -> impl Future<Output = ()> + Send + 'static;
}

/// One listener's parked connections.
pub struct Lot<C>(Arc<Inner<C>>);

impl<C> Clone for Lot<C> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

struct Inner<C> {
    state: Mutex<State<C>>,
    /// Room the lot takes at once on first use: growing it later would copy the entries and
    /// leave the old block behind in the allocator (unused room is address space, not memory).
    capacity: usize,
    /// Tokens have added to `ready`.
    woken: Notify,
}

struct State<C> {
    parked: Slab<Entry<C>>,
    /// Entries whose socket became readable, with the generation each token was made for.
    ready: Vec<(usize, u32)>,
    generation: u32,
    /// The lot's task runs (started by the first park).
    running: bool,
    /// The server drains: nothing more is parked.
    draining: bool,
}

struct Entry<C> {
    conn: C,
    deadline: Instant,
    /// Tells this entry from a later one in the same slot, for tokens that fire late.
    generation: u32,
}

impl<C: Sleeper> Lot<C> {
    /// A lot for up to `capacity` connections at a time (more still fit).
    pub fn new(capacity: usize) -> Self {
        Self(Arc::new(Inner {
            state: Mutex::new(State {
                parked: Slab::new(),
                ready: Vec::new(),
                generation: 0,
                running: false,
                draining: false,
            }),
            capacity,
            woken: Notify::new(),
        }))
    }

    /// Parks `conn` until its socket is readable, `deadline` passes (it is closed) or `drain`
    /// (it is closed with [`Sleeper::close`]). A connection already readable is handed back.
    /// The lot watches the `drain` of its first park: every connection of one listener
    /// shares it.
    pub fn park(&self, conn: C, deadline: Instant, drain: &CancellationToken) -> Result<(), C> {
        let mut state = self.lock();
        if !state.running {
            state.running = true;
            state.parked.reserve(self.0.capacity);
            tokio::spawn(self.clone().run(drain.clone()));
        }
        state.generation = state.generation.wrapping_add(1);
        let generation = state.generation;
        // The slot the entry will take: nothing else inserts while the lock is held.
        let key = state.parked.vacant_key();
        let waker = Waker::from(Arc::new(Token {
            lot: Arc::downgrade(&self.0),
            key,
            generation,
        }));
        match poll_read_ready(conn.socket(), &waker) {
            Poll::Ready(Ok(())) => return Err(conn),
            // The runtime is going away.
            Poll::Ready(Err(_)) => {
                drop(state);
                drop(conn);
                return Ok(());
            }
            Poll::Pending => {}
        }
        if state.draining || drain.is_cancelled() {
            drop(state);
            tokio::spawn(conn.close());
            return Ok(());
        }
        state.parked.insert(Entry {
            conn,
            deadline,
            generation,
        });
        Ok(())
    }

    /// How many connections are parked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().parked.len()
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lot's task: wakes readable entries, sweeps expired ones, closes all on drain.
    async fn run(self, drain: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = self.0.woken.notified() => self.wake_ready(),
                () = drain.cancelled() => break,
                _ = sweep.tick() => self.sweep(Instant::now()),
            }
        }
        // A request already waiting is served (and answered with `Connection: close`), as a
        // busy connection's is; the others are closed.
        self.wake_ready();
        let all: Vec<C> = {
            let mut state = self.lock();
            state.draining = true;
            state.parked.drain().map(|e| e.conn).collect()
        };
        for conn in all {
            tokio::spawn(conn.close());
        }
    }

    fn wake_ready(&self) {
        let woken: Vec<C> = {
            let mut state = self.lock();
            let ready = std::mem::take(&mut state.ready);
            ready
                .into_iter()
                .filter_map(|(key, generation)| {
                    let current = state.parked.get(key)?.generation == generation;
                    current.then(|| state.parked.remove(key).conn)
                })
                .collect()
        };
        for conn in woken {
            tokio::spawn(conn.wake(self.clone()));
        }
    }

    /// Closes (drops) the entries whose deadline has passed.
    fn sweep(&self, now: Instant) {
        let expired: Vec<C> = {
            let mut state = self.lock();
            let keys: Vec<usize> = (state.parked.iter())
                .filter(|(_, e)| e.deadline <= now)
                .map(|(key, _)| key)
                .collect();
            keys.into_iter()
                .map(|key| state.parked.remove(key).conn)
                .collect()
        };
        // Closed outside the lock: the sockets' deregistration is no work for the critical
        // section.
        drop(expired);
    }
}

/// Registers `waker` for the socket's read readiness. Outside tokio's cooperative budget: with
/// the budget spent, tokio would not register the waker but wake it, resuming the connection
/// for nothing.
fn poll_read_ready(socket: &TcpStream, waker: &Waker) -> Poll<io::Result<()>> {
    let mut cx = Context::from_waker(waker);
    let mut ready =
        tokio::task::coop::unconstrained(std::future::poll_fn(|cx| socket.poll_read_ready(cx)));
    Pin::new(&mut ready).poll(&mut cx)
}

/// The waker a parked socket holds: names its entry.
struct Token<C> {
    lot: Weak<Inner<C>>,
    key: usize,
    generation: u32,
}

impl<C: Send + 'static> Wake for Token<C> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(inner) = self.lot.upgrade() else {
            return;
        };
        let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.ready.push((self.key, self.generation));
        drop(state);
        inner.woken.notify_one();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connection that counts its wakes and closes, and parks again after each wake.
    struct Conn {
        stream: TcpStream,
        counts: Arc<Counts>,
        drain: CancellationToken,
    }

    #[derive(Default)]
    struct Counts {
        woken: AtomicUsize,
        closed: AtomicUsize,
    }

    impl Sleeper for Conn {
        fn socket(&self) -> &TcpStream {
            &self.stream
        }

        async fn wake(mut self, lot: Lot<Self>) {
            self.counts.woken.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 64];
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => {}
                Ok(n) => {
                    let _ = self.stream.write_all(&buf[..n]).await;
                    let drain = self.drain.clone();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let _ = lot.park(self, deadline, &drain);
                }
            }
        }

        async fn close(self) {
            self.counts.closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A lot with one parked server side of a connection; the client side.
    async fn parked(deadline: Duration) -> (Lot<Conn>, TcpStream, Arc<Counts>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let stream = accepted(&listener).await;
        let counts = Arc::new(Counts::default());
        let drain = CancellationToken::new();
        let lot = Lot::new(4);
        let conn = Conn {
            stream,
            counts: counts.clone(),
            drain: drain.clone(),
        };
        let parking = lot.park(conn, Instant::now() + deadline, &drain);
        assert!(parking.is_ok());
        assert_eq!(lot.len(), 1);
        (lot, client, counts, drain)
    }

    /// An accepted socket with nothing to read, as a server's last read leaves it (tokio takes
    /// a new socket as readable until a read finds nothing).
    async fn accepted(listener: &TcpListener) -> TcpStream {
        let (stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1];
        assert!(stream.try_read(&mut buf).is_err());
        stream
    }

    async fn echo(client: &mut TcpStream, bytes: &[u8]) {
        client.write_all(bytes).await.unwrap();
        let mut got = vec![0u8; bytes.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got))
            .await
            .expect("answered in time")
            .unwrap();
        assert_eq!(got, bytes);
    }

    #[tokio::test]
    async fn a_parked_connection_is_woken_by_its_bytes_again_and_again() {
        let (lot, mut client, counts, _drain) = parked(Duration::from_secs(60)).await;
        for round in 1..=3 {
            echo(&mut client, b"hello").await;
            assert_eq!(counts.woken.load(Ordering::SeqCst), round);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lot.len(), 1);
    }

    #[tokio::test]
    async fn a_readable_connection_is_handed_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        client.write_all(b"x").await.unwrap();
        stream.readable().await.unwrap();
        let drain = CancellationToken::new();
        let lot = Lot::new(4);
        let conn = Conn {
            stream,
            counts: Arc::default(),
            drain: drain.clone(),
        };
        let back = lot.park(conn, Instant::now() + Duration::from_secs(60), &drain);
        assert!(back.is_err(), "a readable socket is not parked");
        assert_eq!(lot.len(), 0);
    }

    #[tokio::test]
    async fn a_connection_past_its_deadline_is_closed() {
        let (lot, mut client, counts, _drain) = parked(Duration::from_millis(100)).await;
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(SWEEP * 3, client.read(&mut buf))
            .await
            .expect("closed within a sweep")
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(lot.len(), 0);
        assert_eq!(counts.woken.load(Ordering::SeqCst), 0);
        // Gone, not kept alive by its waker: with it goes its place under the bound.
        assert_eq!(Arc::strong_count(&counts), 1);
    }

    #[tokio::test]
    async fn the_drain_closes_parked_connections_and_what_parks_after() {
        let (lot, _client, counts, drain) = parked(Duration::from_secs(60)).await;
        drain.cancel();
        for _ in 0..100 {
            if counts.closed.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(counts.closed.load(Ordering::SeqCst), 1);
        assert_eq!(lot.len(), 0);
        // A connection parking once the drain has begun is closed at once.
        let counts2 = Arc::new(Counts::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let stream = accepted(&listener).await;
        let conn = Conn {
            stream,
            counts: counts2.clone(),
            drain: drain.clone(),
        };
        let parking = lot.park(conn, Instant::now() + Duration::from_secs(60), &drain);
        assert!(parking.is_ok());
        assert_eq!(lot.len(), 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(counts2.closed.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_late_token_does_not_wake_the_next_entry_in_its_slot() {
        let (lot, _client, counts, _drain) = parked(Duration::from_secs(60)).await;
        // A token for slot 0 from an earlier generation.
        let stale = Arc::new(Token {
            lot: Arc::downgrade(&lot.0),
            key: 0,
            generation: 0,
        });
        stale.wake_by_ref();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(counts.woken.load(Ordering::SeqCst), 0);
        assert_eq!(lot.len(), 1);
    }
}
