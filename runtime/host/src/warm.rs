//! Instances made ahead of the requests that will use them. Instantiating an interpreter-sized
//! component (componentize-py: ten core instances, each with a copy-on-write memory image) takes
//! about a millisecond; made between requests, it is off the request's path. Every request still
//! gets an instance no request has used: a ready instance is handed out once, and its successor
//! is made in the background.
//!
//! Ready instances sit in pool slots of their own (`RuntimeConfig::warm_instances`, on top of
//! `max_instances`), one per recently invoked deployment; past the cap the oldest gives way.
//! They are made on a thread of their own: on the server's workers, a millisecond of
//! instantiation would queue in front of the very request it was made for (measured: +0.35 ms on
//! a JavaScript handler's time, on 16 cores). An instance's start functions run when it is made,
//! under its deployment's limits and generation share; the request that takes it puts its own
//! `kindling:llm` capability in (grants as they are then, its own report).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use tokio::sync::mpsc;

use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::Proxy;

use crate::limits::HandlerLimits;
use crate::state::InvocationState;

/// Ready instances kept per deployment: enough for the next request of a quiet one. Under load
/// most requests instantiate on their own path, as before; one at a time is made ahead.
const READY_PER_HANDLER: usize = 1;

/// An instantiated component whose handler has not been called.
pub(crate) struct Ready {
    pub store: Store<InvocationState>,
    pub proxy: Proxy,
    /// What its store was made with; a request with other limits does not take it.
    pub limits: HandlerLimits,
    made: Instant,
}

impl Ready {
    pub fn new(store: Store<InvocationState>, proxy: Proxy, limits: HandlerLimits) -> Self {
        Self { store, proxy, limits, made: Instant::now() }
    }
}

#[derive(Default)]
struct State {
    ready: HashMap<u64, Vec<Ready>>,
    /// Handlers with an instance being made now.
    making: HashMap<u64, usize>,
}

impl State {
    fn ready_count(&self) -> usize {
        self.ready.values().map(Vec::len).sum()
    }
}

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The ready instances of every deployment.
pub(crate) struct WarmInstances {
    cap: usize,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// The thread making them (none when `cap` is 0); it ends when this is dropped.
    maker: Option<mpsc::UnboundedSender<Job>>,
}

/// Identifies one prepared handler's ready instances; dropping the last clone of the handler
/// drops them.
pub(crate) struct HandlerKey {
    pub id: u64,
    warm: Weak<WarmInstances>,
}

impl Drop for HandlerKey {
    fn drop(&mut self) {
        if let Some(warm) = self.warm.upgrade() {
            let gone = {
                // Nothing is being made for it: a making holds the key until it is done.
                warm.state.lock().expect("poisoned").ready.remove(&self.id).unwrap_or_default()
            };
            drop(gone); // stores are dropped outside the lock: freeing a slot resets its memory
        }
    }
}

impl WarmInstances {
    pub fn new(cap: usize) -> std::io::Result<Arc<Self>> {
        let maker = if cap == 0 { None } else { Some(spawn_maker()?) };
        Ok(Arc::new(Self { cap, state: Mutex::default(), next_id: AtomicU64::new(0), maker }))
    }

    /// Runs `make` (an instantiation) on the maker thread; false if there is none.
    pub fn run(&self, make: impl Future<Output = ()> + Send + 'static) -> bool {
        self.maker.as_ref().is_some_and(|maker| maker.send(Box::pin(make)).is_ok())
    }

    pub fn key(self: &Arc<Self>) -> Arc<HandlerKey> {
        Arc::new(HandlerKey { id: self.next_id.fetch_add(1, Ordering::Relaxed), warm: Arc::downgrade(self) })
    }

    /// A ready instance of handler `id` made with `limits`, if there is one.
    pub fn take(&self, id: u64, limits: &HandlerLimits) -> Option<Ready> {
        let (ready, stale) = {
            let mut s = self.state.lock().expect("poisoned");
            let list = s.ready.get_mut(&id)?;
            let ready = list.pop()?;
            if ready.limits == *limits { (Some(ready), None) } else { (None, Some(ready)) }
        };
        drop(stale); // made before the deployment's limits changed
        ready
    }

    /// Whether handler `id` should get another ready instance: `None` if not; if so it is
    /// counted as being made until `put` or `abandon`, and a slot is found for it: when ready
    /// and being-made instances fill the cap, the oldest ready one gives its slot up and comes
    /// back here, to be dropped off the request's path.
    pub fn want(&self, id: u64) -> Option<Option<Ready>> {
        let mut s = self.state.lock().expect("poisoned");
        let have = s.ready.get(&id).map_or(0, Vec::len) + s.making.get(&id).copied().unwrap_or(0);
        let making: usize = s.making.values().sum();
        if have >= READY_PER_HANDLER || making >= self.cap {
            return None;
        }
        let victim = if s.ready_count() + making >= self.cap { Self::remove_oldest(&mut s) } else { None };
        *s.making.entry(id).or_default() += 1;
        Some(victim)
    }

    /// Keeps a newly made instance of handler `key` (its slot was found by `want`).
    pub fn put(&self, key: &HandlerKey, ready: Ready) {
        let mut s = self.state.lock().expect("poisoned");
        Self::done_making(&mut s, key.id);
        s.ready.entry(key.id).or_default().push(ready);
    }

    /// A making that failed (the request path reports instantiation errors; this one is dropped).
    pub fn abandon(&self, id: u64) {
        Self::done_making(&mut self.state.lock().expect("poisoned"), id);
    }

    /// Ready instances held now.
    pub fn count(&self) -> usize {
        self.state.lock().expect("poisoned").ready_count()
    }

    /// Ready instances of handler `id`.
    #[cfg(test)]
    pub fn count_of(&self, id: u64) -> usize {
        self.state.lock().expect("poisoned").ready.get(&id).map_or(0, Vec::len)
    }

    fn done_making(s: &mut State, id: u64) {
        if let Some(n) = s.making.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                s.making.remove(&id);
            }
        }
    }

    fn remove_oldest(s: &mut State) -> Option<Ready> {
        let (&id, _) = s.ready.iter().filter(|(_, l)| !l.is_empty()).min_by_key(|(_, l)| l[0].made)?;
        let list = s.ready.get_mut(&id).expect("found above");
        let oldest = list.remove(0);
        if list.is_empty() {
            s.ready.remove(&id);
        }
        Some(oldest)
    }
}

/// A thread with its own single-threaded runtime, running the instantiations it is sent.
fn spawn_maker() -> std::io::Result<mpsc::UnboundedSender<Job>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    std::thread::Builder::new().name("instance-maker".into()).spawn(move || {
        runtime.block_on(async {
            while let Some(job) = rx.recv().await {
                tokio::spawn(job);
            }
        })
    })?;
    Ok(tx)
}
