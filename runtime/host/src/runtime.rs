//! The handler runtime: one wasmtime `Engine` (pooling allocator, epoch interruption), one
//! `Linker` with WASI, wasi:http and `kindling:llm`, components prepared once per deployment
//! (`InstancePre`) and a fresh `Store` and instance per request, made ahead of it when it can be
//! (`warm`).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline,
};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::component_cache::{ComponentCache, content_hash};
use crate::limits::HandlerLimits;
use crate::llm::{LlmCtx, LlmReport};
use crate::state::InvocationState;
use crate::warm::{HandlerKey, Ready, WarmInstances};

/// Epoch tick: the granularity of wall-clock deadlines for guest code.
const EPOCH_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Instances that may exist at once across all deployments (pooling allocator slots).
    pub max_instances: u32,
    /// The largest linear memory any handler may have; per-deployment limits are below this.
    pub max_memory_bytes: usize,
    /// Bytes of compiled components the cache keeps; the least recently used go past it.
    pub cache_max_bytes: u64,
    /// Bytes of each memory and table slot kept resident between instances.
    pub keep_resident_bytes: usize,
    /// Instances made ahead of requests (one per recently invoked deployment), in slots of their
    /// own on top of `max_instances`; 0 makes every instance on its request's path.
    pub warm_instances: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_instances: 128,
            max_memory_bytes: 1 << 30,
            cache_max_bytes: 8 << 30,
            keep_resident_bytes: 16 << 20,
            warm_instances: 16,
        }
    }
}

/// Why a component cannot be deployed. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("not a WebAssembly binary (missing the \\0asm magic number)")]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component; build a component (componentize-py, jco componentize, or `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("invalid component: {0}")]
    Invalid(String),
    #[error("component imports something Kindling does not provide: {0}")]
    UnknownImport(String),
    #[error("component does not export wasi:http/incoming-handler@0.2.x: {0}")]
    MissingExport(String),
}

/// Why an invocation produced no response. The server maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("handler exceeded its {0:?} deadline")]
    Timeout(Duration),
    #[error("handler trapped: {0}")]
    Trap(String),
    /// The host failed, not the guest (a bug or a resource the host ran out of).
    #[error("host error: {0}")]
    Host(String),
    /// The server is shutting down and stopped the handler.
    #[error("the server stopped the handler while shutting down")]
    Killed,
    #[error("handler returned without sending a response")]
    NoResponse,
    #[error("handler sent an error response: {0}")]
    ErrorResponse(String),
    #[error("no instance slot free: {0}")]
    Capacity(String),
}

/// A deployment's component, compiled and pre-linked; cheap to instantiate per request.
#[derive(Clone)]
pub struct PreparedHandler {
    pre: ProxyPre<InvocationState>,
    pub hash: String,
    /// Its ready instances (see `warm`).
    key: Arc<HandlerKey>,
}

/// What the caller gets back from an invocation that produced a response.
pub struct Invocation {
    pub response: hyper::Response<HyperOutgoingBody>,
    /// Filled in as the handler runs; final once the response body has ended.
    pub report: Arc<Mutex<LlmReport>>,
    /// Keep until the response is over: dropping it ends the guest (and so its generations).
    pub guest: GuestTask,
    /// Where the time to the response went.
    pub timing: InvokeTiming,
}

/// The host's share of an invocation up to its response headers, for `Server-Timing`.
#[derive(Debug, Clone, Copy, Default)]
pub struct InvokeTiming {
    /// Creating the instance from the pre-linked component (memories, tables, start functions).
    pub instantiate: Duration,
    /// From the call into the guest's handler to its response headers.
    pub handler: Duration,
    /// The instance was made ahead of the request (`instantiate` is then only the hand-over).
    pub warm: bool,
}

/// The task running a guest instance. Dropping it aborts the guest at its next yield, which
/// drops its store: its model resources and token streams go with it, so the engine cancels
/// their generations at its next step instead of computing for a client that has gone.
pub struct GuestTask(tokio::task::AbortHandle);

impl Drop for GuestTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct HandlerRuntime {
    engine: Engine,
    linker: Linker<InvocationState>,
    cache: ComponentCache,
    /// Set at the end of a shutdown: every guest traps at its next epoch tick.
    killing: Arc<AtomicBool>,
    /// Instances (stores) alive now, whether or not their response is still being read.
    live: Arc<AtomicUsize>,
    /// The most instances live at once (the pool has `warm_instances` more slots, for those).
    max_live: usize,
    warm: Arc<WarmInstances>,
}

/// Counts an instance as live until its store is gone.
struct LiveInstance(Arc<AtomicUsize>);

impl LiveInstance {
    /// Counts one more live instance, unless `max` are live already.
    fn admit(live: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Self(live.clone()))
    }
}

impl Drop for LiveInstance {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The most of each guest's async stack kept resident (the part a handler's calls touch).
const ASYNC_STACK_KEEP_RESIDENT_MAX: usize = 512 << 10;

fn pooling(cfg: &RuntimeConfig) -> PoolingAllocationConfig {
    // Interpreter-based components (componentize-py, jco) hold ~10 core instances, several
    // memories and large tables; size the slots for them.
    let mut p = PoolingAllocationConfig::default();
    let n = cfg.max_instances + u32::try_from(cfg.warm_instances).unwrap_or(u32::MAX);
    p.total_component_instances(n)
        .total_core_instances(n * 16)
        .total_memories(n * 4)
        .total_tables(n * 8)
        .max_core_instances_per_component(32)
        .max_memories_per_component(8)
        .max_tables_per_component(16)
        .max_memory_size(cfg.max_memory_bytes)
        .table_elements(100_000)
        .max_component_instance_size(1 << 20)
        .max_core_instance_size(4 << 20);
    // A freed slot's first bytes are zeroed in place rather than handed back to the kernel, so the
    // next instance does not fault them in again (and frees skip the madvise that serializes
    // concurrent instances on the address-space lock).
    p.linear_memory_keep_resident(cfg.keep_resident_bytes)
        .table_keep_resident(cfg.keep_resident_bytes)
        .async_stack_keep_resident(cfg.keep_resident_bytes.min(ASYNC_STACK_KEEP_RESIDENT_MAX));
    p
}

fn is_capacity_error(e: &wasmtime::Error) -> bool {
    e.chain().any(|cause| cause.is::<PoolConcurrencyLimitError>())
}

fn instantiation_error(e: wasmtime::Error) -> InvokeError {
    if is_capacity_error(&e) {
        InvokeError::Capacity(format!("{e:#}"))
    } else {
        InvokeError::Trap(format!("instantiation failed: {e:#}"))
    }
}

/// Guest code yields to the executor every epoch tick, so a spinning guest cannot starve other
/// requests of worker threads; past `timeout` from now (or once the server is killing guests) it
/// traps, which the caller reports as a timeout.
fn arm_deadline(store: &mut Store<InvocationState>, timeout: Duration, killing: Arc<AtomicBool>) {
    let deadline = std::time::Instant::now() + timeout;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if std::time::Instant::now() >= deadline || killing.load(Ordering::Relaxed) {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
}

/// A store with a deployment's limits, before any instance is in it.
fn new_store(engine: &Engine, llm: LlmCtx, limits: &HandlerLimits) -> Store<InvocationState> {
    let mut store = Store::new(engine, InvocationState::new(llm, limits));
    store.limiter(|s| &mut s.limits);
    store
}

impl HandlerRuntime {
    pub fn new(cfg: RuntimeConfig) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(&cfg)));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        crate::llm::add_to_linker(&mut linker, InvocationState::llm_view)?;

        // Ticks for as long as the engine exists, which includes every store still running a
        // guest: a guest that never yields is stopped (or killed) only by these ticks.
        let weak = engine.weak();
        std::thread::Builder::new().name("epoch-ticker".into()).spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;
        let cache = ComponentCache::new(cfg.cache_dir, cfg.cache_max_bytes)?;
        let warm = WarmInstances::new(cfg.warm_instances)?;
        let max_live = cfg.max_instances as usize;
        Ok(Self { engine, linker, cache, killing: Arc::default(), live: Arc::default(), max_live, warm })
    }

    /// Stops every guest at its next epoch tick (the last step of a shutdown whose drain ran out).
    pub fn kill_all(&self) {
        self.killing.store(true, Ordering::SeqCst);
    }

    /// Instances alive now.
    pub fn live_instances(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Instances made ahead of requests, waiting for one.
    pub fn warm_instances(&self) -> usize {
        self.warm.count()
    }

    /// Compiles (or loads from cache) and links a component. Blocking: compilation can take
    /// seconds, so call it from a blocking context.
    pub fn prepare(&self, wasm: &[u8]) -> Result<PreparedHandler, PrepareError> {
        match wasm.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => return Err(PrepareError::CoreModule),
            Some([0, b'a', b's', b'm', _, _, 1, 0]) => {}
            Some([0, b'a', b's', b'm', ..]) => {
                return Err(PrepareError::Invalid("unknown WebAssembly version or layer".into()));
            }
            _ => return Err(PrepareError::NotWasm),
        }
        let hash = content_hash(wasm);
        let (component, cached) = match self.cache.load(&self.engine, &hash) {
            Some(c) => (c, true),
            None => (Component::new(&self.engine, wasm).map_err(|e| PrepareError::Invalid(format!("{e:#}")))?, false),
        };
        let pre = self.linker.instantiate_pre(&component).map_err(|e| PrepareError::UnknownImport(format!("{e:#}")))?;
        let pre = ProxyPre::new(pre).map_err(|e| PrepareError::MissingExport(format!("{e:#}")))?;
        // Only a component that links and exports the handler is worth keeping compiled.
        if !cached {
            self.cache.store(&hash, &component);
        }
        Ok(PreparedHandler { pre, hash, key: self.warm.key() })
    }

    /// Starts making the next ready instance of `handler` in the background, unless it has one
    /// (or one on the way). Its store gets `llm`'s deployment settings; the request that takes it
    /// puts its own capability in.
    fn make_ready(&self, handler: &PreparedHandler, limits: &HandlerLimits, llm: &LlmCtx) {
        let Some(victim) = self.warm.want(handler.key.id) else {
            return;
        };
        let (engine, instances, killing) = (self.engine.clone(), self.warm.clone(), self.killing.clone());
        let (pre, key, limits, llm) = (handler.pre.clone(), handler.key.clone(), limits.clone(), llm.fresh());
        let id = key.id;
        let sent = self.warm.run(async move {
            drop(victim); // an older ready instance that gave its slot up (its reset runs here)
            let mut store = new_store(&engine, llm, &limits);
            arm_deadline(&mut store, limits.timeout, killing);
            match pre.instantiate_async(&mut store).await {
                Ok(proxy) => instances.put(&key, Ready::new(store, proxy, limits)),
                Err(e) => {
                    // The request path instantiates the same way and reports what goes wrong.
                    tracing::debug!(error = %format!("{e:#}"), "making a ready instance failed");
                    instances.abandon(key.id);
                }
            }
        });
        if !sent {
            self.warm.abandon(id);
        }
    }

    /// Runs one request through a handler, in an instance no other request has used: one made
    /// ahead of it when there is one (see `warm`), else made now. `lease` (e.g. the deployment's
    /// concurrency permit) is dropped only after the instance is gone, however the invocation
    /// ends: a guest aborted at a disconnect still counts until then.
    pub async fn invoke(
        &self,
        handler: &PreparedHandler,
        request: hyper::Request<Full<Bytes>>,
        llm: LlmCtx,
        limits: &HandlerLimits,
        lease: impl Send + 'static,
    ) -> Result<Invocation, InvokeError> {
        let started = std::time::Instant::now();
        let live = LiveInstance::admit(&self.live, self.max_live)
            .ok_or_else(|| InvokeError::Capacity(format!("all {} handler instance slots are in use", self.max_live)))?;
        let report = llm.report.clone();
        let made_ahead = self.warm.take(handler.key.id, limits);
        self.make_ready(handler, limits, &llm);
        let warm = made_ahead.is_some();
        let (mut store, proxy) = match made_ahead {
            Some(ready) => {
                let mut store = ready.store;
                // The request's own capability: grants read now, its own report and slots.
                store.data_mut().llm = llm;
                (store, Some(ready.proxy))
            }
            None => (new_store(&self.engine, llm, limits), None),
        };
        arm_deadline(&mut store, limits.timeout, self.killing.clone());

        let (sender, receiver) = tokio::sync::oneshot::channel();
        let internal = |e: wasmtime::Error| InvokeError::Host(format!("{e:#}"));
        let request = request.map(|body| {
            http_body_util::BodyExt::map_err(body, |never: Infallible| -> wasmtime_wasi_http::Error { match never {} })
        });
        let req = store.data_mut().http().new_incoming_request(Scheme::Http, request).map_err(internal)?;
        let out = store.data_mut().http().new_response_outparam(sender).map_err(internal)?;
        let pre = handler.pre.clone();
        let timeout = limits.timeout;
        let killing = self.killing.clone();
        let instantiated_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let instantiated = instantiated_us.clone();

        // The handler runs in its own task so it can keep streaming the body after `set`. The
        // task owns the store, then the lease: dropping the task (finished or aborted) drops the
        // instance first and releases the lease after it.
        let task = tokio::spawn(async move {
            let mut held = (store, lease, live);
            let store = &mut held.0;
            let run = async {
                let proxy = match proxy {
                    Some(proxy) => proxy,
                    None => pre.instantiate_async(&mut *store).await.map_err(instantiation_error)?,
                };
                instantiated.store(started.elapsed().as_micros() as u64, Ordering::Release);
                proxy.wasi_http_incoming_handler().call_handle(&mut *store, req, out).await.map_err(|e| {
                    match e.downcast_ref::<Trap>() {
                        Some(Trap::Interrupt) if killing.load(Ordering::Relaxed) => InvokeError::Killed,
                        Some(Trap::Interrupt) => InvokeError::Timeout(timeout),
                        _ => InvokeError::Trap(format!("{e:#}")),
                    }
                })
            };
            let result = tokio::time::timeout(timeout, run).await.unwrap_or(Err(InvokeError::Timeout(timeout)));
            if let Err(e) = &result {
                let output = store.data().stderr.contents();
                let tail = String::from_utf8_lossy(&output[output.len().saturating_sub(4096)..]);
                tracing::warn!(error = %e, guest_output = %tail, "handler failed");
            }
            result
        });

        // If the caller stops waiting (its client went away), the guard aborts the guest.
        let guest = GuestTask(task.abort_handle());
        match receiver.await {
            Ok(Ok(response)) => {
                let total = started.elapsed();
                let instantiate = Duration::from_micros(instantiated_us.load(Ordering::Acquire));
                let timing = InvokeTiming { instantiate, handler: total.saturating_sub(instantiate), warm };
                Ok(Invocation { response, report, guest, timing })
            }
            Ok(Err(code)) => Err(InvokeError::ErrorResponse(format!("{code:?}"))),
            Err(_) => match task.await {
                Ok(Ok(())) => Err(InvokeError::NoResponse),
                Ok(Err(e)) => Err(e),
                Err(join) => Err(InvokeError::Host(format!("handler task failed: {join}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BoxFuture, LlmFailure, Loaded, ModelBackend};
    use crate::llm::GenerationShare;

    /// ping.wat (the smallest handler) made to answer 200 + how many requests its instance has
    /// served: 201 from every instance no request used before.
    fn counting_component() -> Vec<u8> {
        let ping = include_str!("../../../examples/ping-wat/ping.wat");
        let patches = [
            (
                "    (export \"[static]response-outparam.set\"",
                "    (export \"[method]outgoing-response.set-status-code\"\n      (func (param \"self\" (borrow $resp)) (param \"status-code\" u16) (result (result))))\n    (export \"[static]response-outparam.set\"",
            ),
            (
                "  (core instance $http\n",
                "  (core func $status (canon lower (func $types \"[method]outgoing-response.set-status-code\")))\n  (core instance $http\n    (export \"status\" (func $status))\n",
            ),
            (
                "    (func (export \"handle\") (param $request i32) (param $out i32)\n      (call $set (local.get $out) (i32.const 0) (call $response-new (call $fields-new))",
                "    (import \"http\" \"status\" (func $status (param i32 i32) (result i32)))\n    (global $served (mut i32) (i32.const 0))\n    (func (export \"handle\") (param $request i32) (param $out i32) (local $resp i32)\n      (global.set $served (i32.add (global.get $served) (i32.const 1)))\n      (local.set $resp (call $response-new (call $fields-new)))\n      (drop (call $status (local.get $resp) (i32.add (i32.const 200) (global.get $served))))\n      (call $set (local.get $out) (i32.const 0) (local.get $resp)",
            ),
        ];
        let text = patches.iter().fold(ping.to_string(), |text, (from, to)| {
            assert!(text.contains(from), "ping.wat changed: {from}");
            text.replacen(from, to, 1)
        });
        wat::parse_str(&text).expect("counting component")
    }

    struct NoModels;

    impl ModelBackend for NoModels {
        fn load<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Loaded, LlmFailure>> {
            Box::pin(async move { Err(LlmFailure::ModelNotFound(name.into())) })
        }
    }

    fn llm() -> LlmCtx {
        LlmCtx::new(Arc::new(NoModels), Arc::default(), 16, GenerationShare::new("test", 4))
    }

    async fn call(rt: &HandlerRuntime, handler: &PreparedHandler, limits: &HandlerLimits) -> (u16, bool) {
        let request = hyper::Request::get("http://localhost/").body(Full::new(Bytes::new())).unwrap();
        let done = rt.invoke(handler, request, llm(), limits, ()).await.expect("invocation");
        (done.response.status().as_u16(), done.timing.warm)
    }

    /// Waits until `handler` has `n` ready instances and all handlers `total`.
    async fn until_warm(rt: &HandlerRuntime, handler: &PreparedHandler, n: usize, total: usize) {
        for _ in 0..500 {
            if rt.warm.count_of(handler.key.id) == n && rt.warm_instances() == total {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{} ready instances of the handler, {} in all; expected {n}, {total}",
            rt.warm.count_of(handler.key.id),
            rt.warm_instances()
        );
    }

    fn runtime(warm_instances: usize) -> HandlerRuntime {
        HandlerRuntime::new(RuntimeConfig { warm_instances, max_instances: 4, ..RuntimeConfig::default() }).unwrap()
    }

    #[tokio::test]
    async fn requests_take_instances_made_ahead_and_each_instance_serves_one_request() {
        let rt = runtime(1);
        let handler = rt.prepare(&counting_component()).unwrap();
        let limits = HandlerLimits::default();
        assert_eq!(call(&rt, &handler, &limits).await, (201, false), "nothing was made ahead of the first");
        for _ in 0..3 {
            until_warm(&rt, &handler, 1, 1).await;
            assert_eq!(call(&rt, &handler, &limits).await, (201, true), "made ahead, never used before");
        }
        // An instance made under other limits is not handed to a request with these.
        until_warm(&rt, &handler, 1, 1).await;
        let tighter = HandlerLimits { memory_bytes: 1 << 20, ..limits.clone() };
        assert_eq!(call(&rt, &handler, &tighter).await, (201, false));
        // Dropping the deployment's handler drops what was made for it.
        until_warm(&rt, &handler, 1, 1).await;
        drop(handler);
        assert_eq!(rt.warm_instances(), 0);
    }

    #[tokio::test]
    async fn ready_instances_stay_under_their_cap_and_none_are_made_without_one() {
        let rt = runtime(1);
        let component = counting_component();
        let (a, b) = (rt.prepare(&component).unwrap(), rt.prepare(&component).unwrap());
        let limits = HandlerLimits::default();
        call(&rt, &a, &limits).await;
        until_warm(&rt, &a, 1, 1).await;
        call(&rt, &b, &limits).await;
        until_warm(&rt, &b, 1, 1).await;
        assert_eq!(call(&rt, &a, &limits).await, (201, false), "b's, the newest, replaced a's");
        until_warm(&rt, &a, 1, 1).await;
        assert_eq!(call(&rt, &b, &limits).await, (201, false), "a's newer one replaced b's");

        let off = runtime(0);
        let handler = off.prepare(&component).unwrap();
        for _ in 0..3 {
            assert_eq!(call(&off, &handler, &limits).await, (201, false));
        }
        assert_eq!(off.warm_instances(), 0);
    }
}
