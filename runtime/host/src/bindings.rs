//! The one place `bindgen!` runs: host-side types for the `kindling:llm/llm` interface.
//! WASI and wasi:http come from wasmtime-wasi / wasmtime-wasi-http and are linked beside it.

wasmtime::component::bindgen!({
    path: "../../wit",
    interfaces: "import kindling:llm/llm@0.1.0;",
    imports: { default: async | trappable },
    with: {
        "kindling:llm/llm.model": crate::llm::ModelResource,
        "kindling:llm/llm.token-stream": crate::llm::TokenStreamResource,
    },
});

pub use kindling::llm::llm;
