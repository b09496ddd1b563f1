//! The data of one invocation's `Store`: WASI, wasi:http, the llm capability and the limiter.

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::limits::HandlerLimits;
use crate::llm::{LlmCtx, LlmView};

/// Handlers serve requests; they do not make outgoing ones. The guest gets a clear
/// `HTTP-request-denied` error instead of a missing import.
struct DenyOutgoing;

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// Guest stdout/stderr are captured (bounded) so a failing handler's traceback reaches the logs.
pub const GUEST_OUTPUT_CAPACITY: usize = 64 * 1024;

pub struct InvocationState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: DenyOutgoing,
    table: ResourceTable,
    pub(crate) llm: LlmCtx,
    pub(crate) limits: StoreLimits,
    pub(crate) stderr: MemoryOutputPipe,
}

impl InvocationState {
    pub fn new(llm: LlmCtx, limits: &HandlerLimits) -> Self {
        let stderr = MemoryOutputPipe::new(GUEST_OUTPUT_CAPACITY);
        let wasi = WasiCtx::builder().stdout(stderr.clone()).stderr(stderr.clone()).build();
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.memory_bytes)
            .table_elements(limits.table_elements)
            .trap_on_grow_failure(false)
            .build();
        Self {
            wasi,
            http: WasiHttpCtx::new(),
            hooks: DenyOutgoing,
            table: ResourceTable::new(),
            llm,
            limits: store_limits,
            stderr,
        }
    }

    pub(crate) fn llm_view(&mut self) -> LlmView<'_> {
        LlmView { ctx: &mut self.llm, table: &mut self.table }
    }
}

impl WasiView for InvocationState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for InvocationState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}
