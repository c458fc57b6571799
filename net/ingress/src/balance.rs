//! Choosing an endpoint: round-robin or least connections, skipping
//! endpoints that refused a connection a moment ago and those this request
//! already tried. `pick` is pure; `Pool` holds the counters it reads.
use crate::routes::Balance;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// What `pick` needs to know of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub inflight: usize,
    pub ejected: bool,
    pub tried: bool,
}

/// The index of the endpoint to use, given a round-robin counter `turn`.
/// Endpoints that are neither ejected nor tried come first; when every
/// untried endpoint is ejected, an ejected one is better than none.
pub fn pick(eps: &[View], balance: Balance, turn: usize) -> Option<usize> {
    let n = eps.len();
    if n == 0 {
        return None;
    }
    for allow_ejected in [false, true] {
        let ok = |v: &View| !v.tried && (allow_ejected || !v.ejected);
        let rotated = (0..n).map(|k| (turn + k) % n);
        let found = match balance {
            Balance::RoundRobin => rotated.clone().find(|&i| ok(&eps[i])),
            // The fewest in flight; ties go round-robin.
            Balance::LeastConn => rotated
                .clone()
                .filter(|&i| ok(&eps[i]))
                .min_by_key(|&i| eps[i].inflight),
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// One endpoint's live state, shared by every route that reaches it.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub inflight: AtomicUsize,
    /// Milliseconds on the process clock until which it gets no requests.
    pub ejected_until: AtomicU64,
}

/// Counts a request in flight on an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(pub Arc<Endpoint>);

impl InFlight {
    pub fn new(ep: Arc<Endpoint>) -> Self {
        ep.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(ep)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one target and its round-robin counter.
#[derive(Debug)]
pub struct Pool {
    pub endpoints: Vec<Arc<Endpoint>>,
    pub turn: AtomicUsize,
}

impl Pool {
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints.iter().map(|e| e.addr)
    }

    /// Choose an endpoint at `now_ms`, not one of `tried`.
    pub fn choose(
        &self,
        balance: Balance,
        now_ms: u64,
        tried: &[SocketAddr],
    ) -> Option<Arc<Endpoint>> {
        let views: Vec<View> = self
            .endpoints
            .iter()
            .map(|e| View {
                inflight: e.inflight.load(Ordering::Relaxed),
                ejected: e.ejected_until.load(Ordering::Relaxed) > now_ms,
                tried: tried.contains(&e.addr),
            })
            .collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        pick(&views, balance, turn).map(|i| self.endpoints[i].clone())
    }
}

/// Endpoint state by address, kept while any table uses it, so counters and
/// ejections outlive a change of routes.
#[derive(Debug, Default)]
pub struct Registry(Mutex<HashMap<SocketAddr, Weak<Endpoint>>>);

impl Registry {
    pub fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = m.get(&addr).and_then(Weak::upgrade) {
            return e;
        }
        if m.len() > 1024 {
            m.retain(|_, w| w.strong_count() > 0);
        }
        let e = Arc::new(Endpoint {
            addr,
            inflight: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
        });
        m.insert(addr, Arc::downgrade(&e));
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(inflight: usize, ejected: bool, tried: bool) -> View {
        View {
            inflight,
            ejected,
            tried,
        }
    }

    #[test]
    fn round_robin_rotates_and_skips_ejected_and_tried() {
        let eps = [v(0, false, false), v(0, true, false), v(0, false, false)];
        let got: Vec<_> = (0..4).map(|t| pick(&eps, Balance::RoundRobin, t)).collect();
        assert_eq!(got, vec![Some(0), Some(2), Some(2), Some(0)]);
        let eps = [v(0, false, true), v(0, true, false)];
        assert_eq!(
            pick(&eps, Balance::RoundRobin, 0),
            Some(1),
            "ejected beats none"
        );
        let eps = [v(0, false, true), v(0, true, true)];
        assert_eq!(pick(&eps, Balance::RoundRobin, 0), None);
        assert_eq!(pick(&[], Balance::RoundRobin, 0), None);
    }

    #[test]
    fn least_conn_takes_the_fewest_in_flight_ties_round_robin() {
        let eps = [v(3, false, false), v(1, false, false), v(1, false, false)];
        assert_eq!(pick(&eps, Balance::LeastConn, 0), Some(1));
        assert_eq!(pick(&eps, Balance::LeastConn, 2), Some(2));
        let eps = [v(3, false, false), v(0, true, false)];
        assert_eq!(pick(&eps, Balance::LeastConn, 0), Some(0));
    }

    #[test]
    fn pool_counts_in_flight_and_registry_keeps_state() {
        let reg = Registry::default();
        let a: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let b: SocketAddr = "198.18.0.3:80".parse().unwrap();
        let pool = Pool {
            endpoints: vec![reg.endpoint(a), reg.endpoint(b)],
            turn: AtomicUsize::new(0),
        };
        let g = InFlight::new(pool.choose(Balance::LeastConn, 0, &[]).unwrap());
        assert_eq!(g.0.addr, a);
        assert_eq!(pool.choose(Balance::LeastConn, 0, &[]).unwrap().addr, b);
        assert_eq!(reg.endpoint(a).inflight.load(Ordering::Relaxed), 1);
        drop(g);
        assert_eq!(reg.endpoint(a).inflight.load(Ordering::Relaxed), 0);
        reg.endpoint(b).ejected_until.store(100, Ordering::Relaxed);
        assert_eq!(pool.choose(Balance::RoundRobin, 50, &[a]).unwrap().addr, b);
        assert_eq!(pool.choose(Balance::RoundRobin, 50, &[]).unwrap().addr, a);
        assert_eq!(pool.choose(Balance::RoundRobin, 150, &[a]).unwrap().addr, b);
    }
}
