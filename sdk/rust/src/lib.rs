//! Kindling guest SDK for Rust handlers.
//!
//! Build for `wasm32-wasip2` (`rustup target add wasm32-wasip2`); the `kindling:llm` and
//! `wasi:http` bindings come from the repository's `wit/` via wit-bindgen. On other targets the
//! crate type-checks but its imports are unavailable.
//!
//! ```ignore
//! use kindling_sdk::{llm, serve, Request, Response};
//!
//! struct Hello;
//! impl kindling_sdk::Handler for Hello {
//!     fn handle(req: Request) -> Response {
//!         let model = match llm::load("tiny") { Ok(m) => m, Err(e) => return Response::llm_error(&e) };
//!         match model.generate(&req.text(), &kindling_sdk::params(32)) {
//!             Ok(c) => Response::text(200, &c.text),
//!             Err(e) => Response::llm_error(&e),
//!         }
//!     }
//! }
//! kindling_sdk::export_handler!(Hello);
//! ```

pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "kindling:llm/handler",
        generate_all,
        pub_export_macro: true,
        default_bindings_module: "kindling_sdk::bindings",
    });
}

pub use bindings::kindling::llm::llm;
use bindings::wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// wasi:io output streams accept at most 4096 bytes per blocking write.
const WRITE_CHUNK: usize = 4096;

/// An incoming request with its body read.
pub struct Request {
    pub method: String,
    pub path_with_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A response: status, headers and a body given whole or as pieces flushed one by one. A piece
/// may be an LLM error: before the first byte it becomes the error's JSON answer; later the body
/// is cut off (not finished), so the client sees a broken response rather than a short one.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Box<dyn Iterator<Item = Result<Vec<u8>, llm::Error>>>,
}

/// The error code and HTTP status of a `kindling:llm` error.
pub fn error_code(e: &llm::Error) -> (u16, &'static str, &str) {
    // KINDLING-ERROR-CODES: the table in runtime/server/src/error_code.rs; its tests check this copy.
    match e {
        llm::Error::ModelNotAllowed(m) => (403, "model_not_allowed", m),
        llm::Error::ModelNotFound(m) => (404, "model_not_found", m),
        llm::Error::InvalidParams(m) => (400, "invalid_params", m),
        llm::Error::PromptTooLong(m) => (413, "prompt_too_long", m),
        llm::Error::Overloaded(m) => (503, "overloaded", m),
        llm::Error::RuntimeError(m) => (500, "runtime_error", m),
    }
    // KINDLING-ERROR-CODES (end)
}

impl Response {
    pub fn new(status: u16, headers: Vec<(String, String)>, body: impl Iterator<Item = Vec<u8>> + 'static) -> Self {
        Self::streaming(status, headers, body.map(Ok))
    }

    /// A body whose pieces may fail, e.g. [`stream`] of a generation.
    pub fn streaming(
        status: u16,
        headers: Vec<(String, String)>,
        body: impl Iterator<Item = Result<Vec<u8>, llm::Error>> + 'static,
    ) -> Self {
        Self { status, headers, body: Box::new(body) }
    }

    pub fn text(status: u16, text: &str) -> Self {
        let body = std::iter::once(text.as_bytes().to_vec());
        Self::new(status, vec![("content-type".into(), "text/plain; charset=utf-8".into())], body)
    }

    /// `value` as JSON (serde_json: every string escaped as JSON requires).
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        let mut body = serde_json::to_vec(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
        body.push(b'\n');
        Self::new(status, vec![("content-type".into(), "application/json".into())], std::iter::once(body))
    }

    /// The JSON error answer for a `kindling:llm` error, with its code's status.
    pub fn llm_error(e: &llm::Error) -> Self {
        let (status, code, message) = error_code(e);
        Self::json(status, &serde_json::json!({ "error": { "code": code, "message": message } }))
    }

    /// This response, or the error answer when its body fails before its first byte. Returns the
    /// first piece too, already taken from the body.
    pub fn settle(mut self) -> (Self, Option<Vec<u8>>) {
        match self.body.next() {
            Some(Err(e)) => {
                let mut answer = Self::llm_error(&e);
                let first = answer.body.next().and_then(Result::ok);
                (answer, first)
            }
            Some(Ok(first)) => (self, Some(first)),
            None => (self, None),
        }
    }
}

/// Greedy sampling of up to `max_tokens` tokens; set the other fields for more control.
pub fn params(max_tokens: u32) -> llm::Params {
    llm::Params { max_tokens, temperature: 0.0, top_p: 1.0, seed: None, stop: Vec::new() }
}

/// Text pieces of a generation as the model produces them; an error is the last item.
pub fn stream(tokens: llm::TokenStream) -> impl Iterator<Item = Result<Vec<u8>, llm::Error>> {
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        match tokens.next() {
            Ok(Some(piece)) => Some(Ok(piece.into_bytes())),
            Ok(None) => None,
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    })
}

/// What a handler implements; `export_handler!` wires it to wasi:http.
pub trait Handler {
    fn handle(request: Request) -> Response;
}

fn method_name(m: &Method) -> String {
    match m {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(s) => s.clone(),
    }
}

/// Reads the request, runs the handler and writes its response. Used by `export_handler!`.
pub fn serve<H: Handler>(request: IncomingRequest, out: ResponseOutparam) {
    let mut body = Vec::new();
    if let Ok(incoming) = request.consume() {
        if let Ok(stream) = incoming.stream() {
            while let Ok(chunk) = stream.blocking_read(65536) {
                body.extend_from_slice(&chunk);
            }
        }
        let _ = IncomingBody::finish(incoming);
    }
    let req = Request {
        method: method_name(&request.method()),
        path_with_query: request.path_with_query().unwrap_or_else(|| "/".into()),
        headers: request.headers().entries(),
        body,
    };
    let (response, first) = H::handle(req).settle();
    let headers: Vec<(String, Vec<u8>)> =
        response.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())).collect();
    let fields = Fields::from_list(&headers).unwrap_or_else(|_| Fields::new());
    let outgoing = OutgoingResponse::new(fields);
    let _ = outgoing.set_status_code(response.status);
    let Ok(out_body) = outgoing.body() else { return };
    ResponseOutparam::set(out, Ok(outgoing));
    if let Ok(stream) = out_body.write() {
        for piece in first.into_iter().map(Ok).chain(response.body) {
            let piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    // Headers are out: leave the body unfinished so the client sees it broke.
                    let (_, code, message) = error_code(&e);
                    eprintln!("kindling: generation failed mid-response: {code}: {message}");
                    return;
                }
            };
            for chunk in piece.chunks(WRITE_CHUNK) {
                if stream.blocking_write_and_flush(chunk).is_err() {
                    return;
                }
            }
        }
    }
    let _ = OutgoingBody::finish(out_body, None);
}

/// Exports `$handler` (a type implementing [`Handler`]) as the component's incoming handler.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        struct KindlingExport;
        impl $crate::bindings::exports::wasi::http::incoming_handler::Guest for KindlingExport {
            fn handle(
                request: $crate::bindings::wasi::http::types::IncomingRequest,
                out: $crate::bindings::wasi::http::types::ResponseOutparam,
            ) {
                $crate::serve::<$handler>(request, out)
            }
        }
        $crate::bindings::export!(KindlingExport with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_text(r: Response) -> String {
        let pieces: Vec<Vec<u8>> = r.body.map(|p| p.expect("ok piece")).collect();
        String::from_utf8(pieces.concat()).unwrap()
    }

    #[test]
    fn error_answers_are_valid_json_whatever_the_message() {
        let e = llm::Error::PromptTooLong("line one\nline \"two\"\t\u{1}".into());
        let r = Response::llm_error(&e);
        assert_eq!(r.status, 413);
        let v: serde_json::Value = serde_json::from_str(&body_text(r)).expect("valid JSON");
        assert_eq!(v["error"]["code"], "prompt_too_long");
        assert_eq!(v["error"]["message"], "line one\nline \"two\"\t\u{1}");
    }

    #[test]
    fn a_body_that_fails_before_its_first_byte_becomes_the_error_answer() {
        let failing = Response::streaming(200, vec![], std::iter::once(Err(llm::Error::Overloaded("busy".into()))));
        let (answer, first) = failing.settle();
        assert_eq!(answer.status, 503);
        let v: serde_json::Value = serde_json::from_slice(&first.unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "overloaded");

        let pieces = vec![Ok(b"a".to_vec()), Err(llm::Error::RuntimeError("late".into()))];
        let (answer, first) = Response::streaming(200, vec![], pieces.into_iter()).settle();
        assert_eq!((answer.status, first), (200, Some(b"a".to_vec())), "after the first byte the status stands");
    }
}
