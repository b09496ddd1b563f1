//! Scaling policy: which engines to drop when a load needs room (least recently used, never a
//! busy one), and the reaper that drops engines idle past the timeout (scale to zero). The
//! checkpoints of dropped engines stay in the pool, so scaling back up is a pool hit.

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

/// Drops engines idle for longer than `idle`, checking every few seconds.
pub fn spawn_idle_reaper(registry: Arc<ModelRegistry>, idle: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(idle.min(Duration::from_secs(5)).max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            for name in registry.unload_idle(idle) {
                tracing::info!(model = %name, idle_secs = idle.as_secs_f64(), "scaled to zero after idle timeout");
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

    #[test]
    fn a_model_larger_than_the_budget_is_a_load_error() {
        assert!(matches!(evictions(200, 100, &[]).unwrap_err(), EngineError::Load(_)));
    }
}
