//! A worker's host-to-device link, shared by the loads that copy weights over it. Loads that
//! copy at the same time share its bandwidth, so all of them finish late: four models scaled from
//! zero together on one H100 all reached first token at about 0.67 s, the 0.6B ones included.
//! One transfer at a time, smallest first, finishes the last one no later and every other one
//! sooner (shortest-job-first minimizes the mean).

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct State {
    busy: bool,
    /// Waiting transfers as (bytes, arrival): the first is next.
    waiting: BTreeSet<(u64, u64)>,
    arrivals: u64,
}

#[derive(Default)]
pub struct Link {
    state: Mutex<State>,
    freed: Condvar,
}

/// Frees the link when the transfer ends, however it ends.
struct Turn<'a>(&'a Link);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("poisoned").busy = false;
        self.0.freed.notify_all();
    }
}

impl Link {
    /// Runs `copy` (moving `bytes` over the link) once the link is free and no smaller transfer
    /// waits. Blocking.
    pub fn transfer<T>(&self, bytes: u64, copy: impl FnOnce() -> T) -> T {
        let mut state = self.state.lock().expect("poisoned");
        let me = (bytes, state.arrivals);
        state.arrivals += 1;
        state.waiting.insert(me);
        while state.busy || state.waiting.first() != Some(&me) {
            state = self.freed.wait(state).expect("poisoned");
        }
        state.waiting.remove(&me);
        state.busy = true;
        drop(state);
        let _turn = Turn(self);
        copy()
    }

    /// Transfers waiting for the link.
    pub fn waiting(&self) -> usize {
        self.state.lock().expect("poisoned").waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn waiting_transfers_go_smallest_first_one_at_a_time() {
        let link = Arc::new(Link::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let (hold, release) = std::sync::mpsc::channel::<()>();
        let first = {
            let link = link.clone();
            std::thread::spawn(move || link.transfer(100, || release.recv().unwrap()))
        };
        while !link.state.lock().unwrap().busy {
            std::thread::yield_now();
        }
        let waiters: Vec<_> = [30u64, 10, 20]
            .into_iter()
            .enumerate()
            .map(|(i, bytes)| {
                let (shared, order) = (link.clone(), order.clone());
                let handle = std::thread::spawn(move || {
                    shared.transfer(bytes, || {
                        order.lock().unwrap().push(bytes);
                        std::thread::sleep(Duration::from_millis(5));
                    })
                });
                // Each is queued before the next arrives.
                while link.waiting() < i + 1 {
                    std::thread::yield_now();
                }
                handle
            })
            .collect();
        hold.send(()).unwrap();
        first.join().unwrap();
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [10, 20, 30]);
    }

    #[test]
    fn a_panicking_transfer_frees_the_link() {
        let link = Link::default();
        let caught =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| link.transfer(1, || panic!("copy failed"))));
        assert!(caught.is_err());
        assert_eq!(link.transfer(2, || 7), 7);
    }
}
