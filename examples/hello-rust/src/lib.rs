//! Hello, Kindling, in Rust: the request body is the prompt, the answer its greedy completion
//! (streamed when the path ends in /stream). Needs the wasm32-wasip2 target:
//!
//! ```sh
//! rustup target add wasm32-wasip2
//! cargo build --manifest-path examples/hello-rust/Cargo.toml --target wasm32-wasip2 --release
//! kindling deploy -m examples/hello-rust/kindling.toml \
//!   -c examples/hello-rust/target/wasm32-wasip2/release/kindling_example_hello_rust.wasm
//! ```

use kindling_sdk::{Handler, Request, Response, llm, params, stream};

struct Hello;

impl Handler for Hello {
    fn handle(req: Request) -> Response {
        let prompt = match req.text() {
            p if p.is_empty() => "Once upon a time".to_string(),
            p => p,
        };
        let model = match llm::load("tiny") {
            Ok(m) => m,
            Err(e) => return Response::llm_error(&e),
        };
        if req.path_with_query.ends_with("/stream") {
            return match model.generate_stream(&prompt, &params(32)) {
                // An error before the first token becomes its JSON answer; a later one cuts the body.
                Ok(tokens) => Response::streaming(200, vec![("content-type".into(), "text/plain".into())], stream(tokens)),
                Err(e) => Response::llm_error(&e),
            };
        }
        match model.generate(&prompt, &params(32)) {
            Ok(completion) => Response::text(200, &completion.text),
            Err(e) => Response::llm_error(&e),
        }
    }
}

kindling_sdk::export_handler!(Hello);
