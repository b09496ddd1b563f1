//! Where a forward pass's device time goes, phase by phase (`KINDLING_PROFILE_PHASES=1`, CUDA
//! only): a CUDA event is recorded on the stream after each phase (norms, projections, attention,
//! ...), the gaps between consecutive events are that phase's device time, and totals per phase
//! and per step shape are logged after 8 passes and every `REPORT_EVERY` after. Recording events adds no sync;
//! reading them waits for the pass, so profiling turns decode graphs off (`graphs::disable`).
//!
//! A diagnostic, not a metric: it answers "what is this step's time made of" on a lent GPU where
//! Nsight Systems does not run.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns profiling on when `KINDLING_PROFILE_PHASES=1` (CUDA builds only).
pub fn honour_env() {
    if cfg!(feature = "cuda") && std::env::var("KINDLING_PROFILE_PHASES").is_ok_and(|v| v == "1") {
        ENABLED.store(true, Ordering::Relaxed);
        super::graphs::disable("phase profiling is on (KINDLING_PROFILE_PHASES=1)");
    }
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Marks the end of each phase of one forward pass; a no-op unless profiling is on and the
/// device is a GPU.
pub struct PhaseTimer {
    #[cfg(feature = "cuda")]
    inner: Option<cuda::Marks>,
}

impl PhaseTimer {
    /// Starts timing a pass over `rows` tokens.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn start(device: &Device, rows: usize) -> Self {
        #[cfg(feature = "cuda")]
        {
            let inner = if enabled() { cuda::Marks::start(device, rows) } else { None };
            Self { inner }
        }
        #[cfg(not(feature = "cuda"))]
        Self {}
    }

    /// The phase `name` ends here (its time runs from the previous mark).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    #[inline]
    pub fn mark(&mut self, name: &'static str) {
        #[cfg(feature = "cuda")]
        if let Some(m) = &mut self.inner {
            m.mark(name);
        }
    }

    /// Waits for the pass and adds its phases to the totals.
    pub fn finish(self) {
        #[cfg(feature = "cuda")]
        if let Some(m) = self.inner {
            m.finish();
        }
    }
}

/// Milliseconds summed per phase, in the order phases first came.
type PhaseSums = Vec<(&'static str, f64)>;

/// Per step shape: passes counted and their phases' sums.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Default)]
struct Totals {
    by_shape: std::collections::BTreeMap<String, (u64, PhaseSums)>,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const REPORT_EVERY: u64 = 64;

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Totals {
    fn add(&mut self, shape: String, phases: &[(&'static str, f64)]) {
        let (passes, sums) = self.by_shape.entry(shape.clone()).or_default();
        *passes += 1;
        for &(name, ms) in phases {
            match sums.iter_mut().find(|(n, _)| *n == name) {
                Some((_, sum)) => *sum += ms,
                None => sums.push((name, ms)),
            }
        }
        if *passes == 8 || (*passes).is_multiple_of(REPORT_EVERY) {
            let n = *passes as f64;
            let total: f64 = sums.iter().map(|(_, s)| s).sum::<f64>() / n;
            let parts: Vec<String> = sums.iter().map(|(name, s)| format!("{name} {:.3}", s / n)).collect();
            tracing::info!(shape, passes, "phases per pass (ms): total {total:.3} = {}", parts.join(", "));
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::{Arc, Mutex};

    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, sys};

    use super::Totals;

    static TOTALS: Mutex<Option<Totals>> = Mutex::new(None);

    /// Events that keep timestamps (cudarc's default disables timing).
    const TIMED: Option<sys::CUevent_flags> = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);

    pub struct Marks {
        stream: Arc<CudaStream>,
        shape: String,
        start: CudaEvent,
        marks: Vec<(&'static str, CudaEvent)>,
    }

    impl Marks {
        pub fn start(device: &Device, rows: usize) -> Option<Self> {
            let stream = device.as_cuda_device().ok()?.cuda_stream();
            let start = stream.record_event(TIMED).ok()?;
            // Decode-sized steps by their exact rows; larger (prefill) ones in powers of two.
            let shape =
                if rows <= 256 { format!("{rows} rows") } else { format!("~{} rows", rows.next_power_of_two()) };
            Some(Self { stream, shape, start, marks: Vec::with_capacity(512) })
        }

        pub fn mark(&mut self, name: &'static str) {
            if let Ok(event) = self.stream.record_event(TIMED) {
                self.marks.push((name, event));
            }
        }

        pub fn finish(self) {
            let Some((_, last)) = self.marks.last() else { return };
            if last.synchronize().is_err() {
                return;
            }
            let mut phases = Vec::with_capacity(self.marks.len());
            let mut previous = &self.start;
            for (name, event) in &self.marks {
                if let Ok(ms) = previous.elapsed_ms(event) {
                    phases.push((*name, ms as f64));
                }
                previous = event;
            }
            TOTALS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(Totals::default)
                .add(self.shape, &phases);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_each_phase_across_layers_and_passes() {
        let mut totals = Totals::default();
        totals.add("decode x1".into(), &[("qkv", 1.0), ("attention", 2.0), ("qkv", 1.5)]);
        totals.add("decode x1".into(), &[("qkv", 0.5), ("attention", 1.0)]);
        let (passes, sums) = &totals.by_shape["decode x1"];
        assert_eq!(*passes, 2);
        assert_eq!(sums, &vec![("qkv", 3.0), ("attention", 3.0)]);
    }

    #[test]
    fn a_cpu_pass_records_nothing() {
        let mut timer = PhaseTimer::start(&Device::Cpu, 1);
        timer.mark("qkv");
        timer.finish();
    }
}
