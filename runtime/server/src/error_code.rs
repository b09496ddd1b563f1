//! Every error code a client of Kindling can see, with its HTTP status: the one table the server
//! answers from. The guest SDKs (Python, JavaScript, Rust) and the README's table are checked
//! against it by the tests below, so a code has one spelling everywhere.

use http::StatusCode;

/// Who puts a code in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The server itself (routing, admission, the admin API).
    Server,
    /// A guest SDK, for a `kindling:llm` error variant of the same name.
    Llm,
    /// A guest SDK, for a handler's own failure.
    Sdk,
}

macro_rules! error_codes {
    ($($variant:ident = $code:literal, $status:ident, $origin:ident, $meaning:literal;)*) => {
        /// An error code; `as_str` is its spelling on the wire.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode { $($variant,)* }

        impl ErrorCode {
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            pub fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status,)* }
            }

            pub fn origin(self) -> Origin {
                match self { $(ErrorCode::$variant => Origin::$origin,)* }
            }

            /// One line for the README's table.
            pub fn meaning(self) -> &'static str {
                match self { $(ErrorCode::$variant => $meaning,)* }
            }
        }
    };
}

error_codes! {
    BadRequest = "bad_request", BAD_REQUEST, Server, "malformed request (JSON, multipart, UTF-8); also raised by a handler's BadRequest";
    InvalidManifest = "invalid_manifest", BAD_REQUEST, Server, "the manifest does not parse or breaks a rule";
    InvalidComponent = "invalid_component", BAD_REQUEST, Server, "not a component, or one that imports what Kindling lacks or lacks the handler export";
    InvalidModel = "invalid_model", BAD_REQUEST, Server, "a checkpoint that does not open, or a split it cannot take";
    UnknownModel = "unknown_model", BAD_REQUEST, Server, "a model name that is not registered";
    LimitOverCeiling = "limit_over_ceiling", BAD_REQUEST, Server, "a manifest limit over the server's ceiling";
    Unauthorized = "unauthorized", UNAUTHORIZED, Server, "missing or wrong credentials";
    Forbidden = "forbidden", FORBIDDEN, Server, "operator-only endpoint";
    ModelNotGranted = "model_not_granted", FORBIDDEN, Server, "a tenant's manifest lists a model not granted to it";
    QuotaExceeded = "quota_exceeded", FORBIDDEN, Server, "the tenant has its quota of deployments";
    NotFound = "not_found", NOT_FOUND, Server, "no such deployment, model, tenant or admin endpoint";
    NoRoute = "no_route", NOT_FOUND, Server, "no deployment serves the path (or the caller may not call it)";
    BodyTimeout = "body_timeout", REQUEST_TIMEOUT, Server, "the request body did not arrive in time";
    Exists = "exists", CONFLICT, Server, "a tenant of that name exists";
    RouteConflict = "route_conflict", CONFLICT, Server, "a route equal to, or nested with, another owner's";
    NameTaken = "name_taken", CONFLICT, Server, "a deployment name someone else owns";
    BodyTooLarge = "body_too_large", PAYLOAD_TOO_LARGE, Server, "a request body over the limit";
    TooManyRequests = "too_many_requests", TOO_MANY_REQUESTS, Server, "the deployment is at max_concurrency (Retry-After)";
    Internal = "internal", INTERNAL_SERVER_ERROR, Server, "a host failure";
    Storage = "storage", INTERNAL_SERVER_ERROR, Server, "the data dir could not be written";
    HandlerTrapped = "handler_trapped", INTERNAL_SERVER_ERROR, Server, "the handler trapped (or hit its memory limit)";
    HandlerNoResponse = "handler_no_response", BAD_GATEWAY, Server, "the handler returned without a response";
    NoCapacity = "no_capacity", SERVICE_UNAVAILABLE, Server, "every instance slot is busy (Retry-After)";
    ShuttingDown = "shutting_down", SERVICE_UNAVAILABLE, Server, "the server is draining (Retry-After)";
    HandlerTimeout = "handler_timeout", GATEWAY_TIMEOUT, Server, "the handler ran past timeout_ms";
    ModelNotAllowed = "model_not_allowed", FORBIDDEN, Llm, "the manifest (or the tenant's grants) does not allow the model";
    ModelNotFound = "model_not_found", NOT_FOUND, Llm, "no such model is registered";
    InvalidParams = "invalid_params", BAD_REQUEST, Llm, "sampling parameters out of range, or an empty prompt";
    PromptTooLong = "prompt_too_long", PAYLOAD_TOO_LARGE, Llm, "the prompt does not fit the model's context";
    Overloaded = "overloaded", SERVICE_UNAVAILABLE, Llm, "the model's queue, the deployment's max_generations or the invocation's 16 generations are full";
    RuntimeError = "runtime_error", INTERNAL_SERVER_ERROR, Llm, "the model failed to load or to generate";
    HandlerError = "handler_error", INTERNAL_SERVER_ERROR, Sdk, "the handler raised an uncaught exception";
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;

    fn read(relative: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(relative);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Every `"code": status` pair (or `(status, "code"` in Rust) in `text`.
    fn status_pairs(text: &str) -> BTreeMap<String, u16> {
        let mut pairs = BTreeMap::new();
        let words: Vec<&str> = text.split(|c: char| c.is_whitespace() || c == ',').filter(|w| !w.is_empty()).collect();
        for w in words.windows(2) {
            let code = |s: &str| {
                let s = s.trim_matches(|c| c == '"' || c == ':' || c == '(' || c == ')');
                (!s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')).then(|| s.to_string())
            };
            let status = |s: &str| s.trim_matches(|c| c == '(' || c == ')').parse::<u16>().ok();
            let pair = if w[0].starts_with('"') && w[0].ends_with("\":") {
                code(w[0]).zip(status(w[1]))
            } else if w[0].starts_with('(') && w[1].starts_with('"') {
                code(w[1]).zip(status(w[0]))
            } else {
                None
            };
            if let Some((c, s)) = pair {
                pairs.insert(c, s);
            }
        }
        pairs
    }

    fn expected(origins: &[Origin]) -> BTreeMap<String, u16> {
        ErrorCode::ALL
            .iter()
            .filter(|c| origins.contains(&c.origin()))
            .map(|c| (c.as_str().to_string(), c.status().as_u16()))
            .collect()
    }

    #[test]
    fn codes_are_unique_and_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{} twice", c.as_str());
            assert!(c.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{}", c.as_str());
        }
    }

    #[test]
    fn every_sdk_maps_each_llm_error_to_the_tables_code_and_status() {
        let llm = expected(&[Origin::Llm]);
        for sdk in ["sdk/python/kindling/__init__.py", "sdk/js/kindling.js", "sdk/rust/src/lib.rs"] {
            let text = read(sdk);
            let block = text.split("KINDLING-ERROR-CODES").nth(1).unwrap_or_else(|| panic!("{sdk}: no table"));
            assert_eq!(status_pairs(block), llm, "{sdk}'s table of llm errors");
            // Codes the SDK writes itself (`"code": "..."`, `code: "..."`) are the table's too.
            for rest in text.split("code").skip(1) {
                let rest = rest.trim_start_matches(['"', ':', ' ']);
                if let Some(literal) = rest.strip_prefix('"').and_then(|r| r.split('"').next())
                    && !literal.is_empty()
                    && literal.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                {
                    assert!(
                        ErrorCode::ALL.iter().any(|c| c.as_str() == literal),
                        "{sdk} writes unknown code {literal}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_readme_table_is_this_table() {
        let readme = read("README.md");
        let section = readme.split("### Error codes").nth(1).expect("README has an Error codes section");
        let rows: BTreeMap<String, u16> = section
            .lines()
            .skip_while(|l| !l.starts_with("| `"))
            .take_while(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells[1].trim_matches('`').to_string(), cells[2].parse().expect("status"))
            })
            .collect();
        assert_eq!(rows, expected(&[Origin::Server, Origin::Llm, Origin::Sdk]));
    }
}
