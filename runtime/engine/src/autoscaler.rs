//! Scaling policy: which worker (GPU) a model's engine goes to, which engines to drop when a load
//! needs room (sleeping engines first, then the least recently used, never a busy one), and the
//! reaper that puts engines idle past the timeout to sleep (scale to zero, weights kept on the
//! device while the memory is not needed). The checkpoints of dropped engines stay in the pool,
//! so scaling back up after an eviction is a pool hit.

use std::sync::Arc;
use std::time::Duration;

use crate::error::EngineError;
use crate::registry::ModelRegistry;

/// A loaded engine as the policy sees it.
#[derive(Debug, Clone)]
pub struct Resident {
    pub name: String,
    pub bytes: u64,
    pub idle_for: Duration,
    pub busy: bool,
}

/// The engines to drop, most idle first, so `need` more bytes fit in `budget`.
pub fn evictions(need: u64, budget: u64, resident: &[Resident]) -> Result<Vec<String>, EngineError> {
    let used: u64 = resident.iter().map(|r| r.bytes).sum();
    if used + need <= budget {
        return Ok(Vec::new());
    }
    if need > budget {
        return Err(EngineError::Load(format!(
            "model needs {need} bytes but this worker's engine memory budget is {budget} bytes"
        )));
    }
    let mut idle: Vec<&Resident> = resident.iter().filter(|r| !r.busy).collect();
    idle.sort_by_key(|r| std::cmp::Reverse(r.idle_for));
    let mut freed = 0;
    let mut victims = Vec::new();
    for r in idle {
        if used - freed + need <= budget {
            break;
        }
        freed += r.bytes;
        victims.push(r.name.clone());
    }
    if used - freed + need <= budget {
        Ok(victims)
    } else {
        Err(EngineError::Overloaded(format!(
            "not enough engine memory: need {need} bytes, {} of {budget} held by engines that are busy",
            used - freed
        )))
    }
}

/// One worker as placement sees it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub budget: u64,
    /// Bytes held by loads in progress and retiring engines: taken, not evictable.
    pub pinned: u64,
    pub resident: Vec<Resident>,
}

impl WorkerView {
    fn free(&self) -> u64 {
        let used: u64 = self.resident.iter().map(|r| r.bytes).sum();
        self.budget.saturating_sub(self.pinned + used)
    }
}

/// Where a load of `need` bytes goes: the worker with the most free memory among those it fits
/// without evicting anything (so simultaneous cold starts spread over the GPUs); failing that, the
/// worker whose evictions drop the least recently used engines. Returns the worker's index and
/// the engines to drop there.
pub fn placement(need: u64, workers: &[WorkerView]) -> Result<(usize, Vec<String>), EngineError> {
    let largest = workers.iter().map(|w| w.budget).max().unwrap_or(0);
    if need > largest {
        return Err(EngineError::Load(format!(
            "model needs {need} bytes (weights and KV cache) but the largest worker's engine memory budget is {largest} bytes"
        )));
    }
    let roomiest = workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.free() >= need)
        .max_by_key(|(i, w)| (w.free(), std::cmp::Reverse(*i)));
    if let Some((i, _)) = roomiest {
        return Ok((i, Vec::new()));
    }
    let mut best: Option<(usize, Vec<String>, Duration)> = None;
    for (i, w) in workers.iter().enumerate() {
        // It fits some worker's budget (checked above); where it cannot here, loads in progress
        // or busy engines hold the room: a retry later may succeed.
        if let Ok(victims) = evictions(need, w.budget.saturating_sub(w.pinned), &w.resident) {
            // The most recently used engine this choice drops: the older, the better.
            let freshest = victims
                .iter()
                .filter_map(|v| w.resident.iter().find(|r| &r.name == v))
                .map(|r| r.idle_for)
                .min()
                .unwrap_or(Duration::MAX);
            if best.as_ref().is_none_or(|(_, _, b)| freshest > *b) {
                best = Some((i, victims, freshest));
            }
        }
    }
    match best {
        Some((i, victims, _)) => Ok((i, victims)),
        None => Err(EngineError::Overloaded(format!(
            "not enough engine memory: need {need} bytes, and every worker's room is held by engines that are busy or loading"
        ))),
    }
}

/// Where a model split over `ranks` workers goes, `need` bytes on each: `ranks` different
/// workers, each picked as `placement` picks one among those not yet taken. An engine dropped to
/// make room on one worker frees its share on every other worker it spans. Returns each worker's
/// index, rank by rank, with the engines to drop there.
pub fn placements(need: u64, ranks: usize, workers: &[WorkerView]) -> Result<Vec<(usize, Vec<String>)>, EngineError> {
    if ranks > workers.len() {
        return Err(EngineError::Load(format!("a model split over {ranks} workers, but there are {}", workers.len())));
    }
    let mut left: Vec<(usize, WorkerView)> = workers.iter().cloned().enumerate().collect();
    let mut placed = Vec::with_capacity(ranks);
    for _ in 0..ranks {
        let views: Vec<WorkerView> = left.iter().map(|(_, w)| w.clone()).collect();
        let (at, victims) = placement(need, &views)?;
        let (worker, _) = left.remove(at);
        for (_, w) in &mut left {
            w.resident.retain(|r| !victims.contains(&r.name));
        }
        placed.push((worker, victims));
    }
    Ok(placed)
}

/// Puts engines idle for longer than `idle` to sleep (scale to zero: thread and KV cache freed,
/// weights kept on the device until the memory is needed), checking every few seconds.
pub fn spawn_idle_reaper(registry: Arc<ModelRegistry>, idle: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(idle.min(Duration::from_secs(5)).max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            for name in registry.sleep_idle(idle) {
                tracing::info!(model = %name, idle_secs = idle.as_secs_f64(), "scaled to zero after idle timeout (asleep: weights kept on the device)");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, bytes: u64, idle_s: u64, busy: bool) -> Resident {
        Resident { name: name.into(), bytes, idle_for: Duration::from_secs(idle_s), busy }
    }

    #[test]
    fn nothing_is_evicted_when_it_fits() {
        assert!(evictions(10, 100, &[r("a", 50, 9, false)]).unwrap().is_empty());
    }

    #[test]
    fn the_most_idle_engines_go_first_and_only_as_many_as_needed() {
        let resident = [r("recent", 40, 1, false), r("old", 40, 100, false), r("older", 10, 200, false)];
        assert_eq!(evictions(50, 100, &resident).unwrap(), ["older", "old"]);
        assert_eq!(evictions(15, 100, &resident).unwrap(), ["older"]);
    }

    #[test]
    fn busy_engines_are_never_evicted() {
        let resident = [r("busy", 80, 500, true), r("idle", 10, 1, false)];
        let err = evictions(30, 100, &resident).unwrap_err();
        assert!(matches!(err, EngineError::Overloaded(_)), "{err}");
    }

    fn worker(budget: u64, resident: &[Resident]) -> WorkerView {
        WorkerView { budget, pinned: 0, resident: resident.to_vec() }
    }

    #[test]
    fn loads_spread_over_the_workers_with_room() {
        let empty = [worker(100, &[]), worker(100, &[])];
        assert_eq!(placement(60, &empty).unwrap(), (0, vec![]));
        let one_taken = [worker(100, &[r("a", 60, 0, true)]), worker(100, &[])];
        assert_eq!(placement(60, &one_taken).unwrap(), (1, vec![]), "the second 8B goes to the other GPU");
        let loading = [worker(100, &[]), WorkerView { budget: 100, pinned: 70, resident: vec![] }];
        assert_eq!(placement(40, &loading).unwrap(), (0, vec![]), "a load in progress counts as taken");
    }

    #[test]
    fn when_every_worker_is_full_the_least_recently_used_engines_go() {
        let full = [worker(100, &[r("recent", 90, 5, false)]), worker(100, &[r("stale", 90, 500, false)])];
        assert_eq!(placement(50, &full).unwrap(), (1, vec!["stale".to_string()]));
        let busy = [worker(100, &[r("a", 90, 500, true)]), worker(100, &[r("b", 90, 1, false)])];
        assert_eq!(placement(50, &busy).unwrap(), (1, vec!["b".to_string()]), "busy engines stay");
        let all_busy = [worker(100, &[r("a", 90, 5, true)]), worker(100, &[r("b", 90, 5, true)])];
        assert!(matches!(placement(50, &all_busy).unwrap_err(), EngineError::Overloaded(_)));
        let small = [worker(100, &[]), worker(120, &[])];
        assert!(matches!(placement(130, &small).unwrap_err(), EngineError::Load(_)));
        assert_eq!(placement(110, &small).unwrap(), (1, vec![]), "only the larger GPU can hold it");
    }

    #[test]
    fn a_split_model_takes_different_workers_and_an_engine_dropped_for_it_frees_every_share() {
        let free = [worker(100, &[r("a", 70, 0, true)]), worker(100, &[]), worker(100, &[])];
        let placed = placements(50, 2, &free).unwrap();
        assert_eq!(placed, [(1, vec![]), (2, vec![])], "the two roomiest, not the busy one");
        // A split engine "s" holds 60 on both workers; dropping it makes room on both.
        let split = [worker(100, &[r("s", 60, 100, false)]), worker(100, &[r("s", 60, 100, false)])];
        let placed = placements(50, 2, &split).unwrap();
        assert_eq!(placed, [(0, vec!["s".to_string()]), (1, vec![])]);
        assert!(matches!(placements(50, 3, &split).unwrap_err(), EngineError::Load(_)), "more ranks than workers");
        let busy = [worker(100, &[r("b", 60, 1, true)]), worker(100, &[])];
        assert!(matches!(placements(50, 2, &busy).unwrap_err(), EngineError::Overloaded(_)));
    }

    #[test]
    fn a_model_larger_than_the_budget_is_a_load_error() {
        assert!(matches!(evictions(200, 100, &[]).unwrap_err(), EngineError::Load(_)));
    }
}
