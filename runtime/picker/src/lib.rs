//! Kindling's endpoint picker: an Envoy external processor (ext_proc, gRPC over HTTP/2) that
//! speaks the Gateway API Inference Extension's endpoint-picker protocol. For each request it
//! names the nodes to try, best first: the primary in the `x-gateway-destination-endpoint`
//! header, the whole ordered list in dynamic metadata `envoy.lb` / the same key, which Envoy's
//! `override_host` load-balancing policy reads (retries go down the list). llm-d's picker
//! speaks the same protocol, so either can stand in front of Kindling nodes.
//!
//! Envoy sends request headers (and, in BUFFERED body mode, the body, so an OpenAI-style
//! `"model"` can narrow the choice); everything else is answered with CONTINUE.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use prost::Message;

pub mod ext_proc;
pub mod nodes;
pub mod pick;

use ext_proc::processing_request::Request as In;
use ext_proc::processing_response::Response as Out;
use ext_proc::{CommonReply, CommonResponse, HeaderMutation, ProcessingRequest, ProcessingResponse};
pub use nodes::Nodes;
pub use pick::Policy;

pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
pub const METADATA_NAMESPACE: &str = "envoy.lb";
const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";
/// Bodies past this are not parsed for a model name (the deployment's models count instead).
const MAX_BODY_PEEK: usize = 1 << 20;
/// One gRPC message may not be larger than this.
const MAX_MESSAGE: usize = 16 << 20;

pub struct PickerConfig {
    /// Kindling nodes as `host:port`: addresses, or DNS names resolved at every scrape (a
    /// headless service names every pod). Picks name them as `ip:port`, as Envoy knows hosts.
    pub nodes: Vec<String>,
    /// The nodes' admin token: the picker reads their `/metrics` and `/admin/deployments`.
    pub admin_token: Option<String>,
    pub scrape_every: Duration,
    pub policy: Policy,
}

/// One request's ext_proc stream: what has been seen of it so far.
#[derive(Default)]
struct Exchange {
    path: String,
    host: Option<String>,
    json: bool,
    body: Vec<u8>,
}

struct Picker {
    nodes: Nodes,
    policy: Policy,
    rotation: AtomicUsize,
    stats: Stats,
}

/// What the picker has decided, for its `/metrics`.
#[derive(Default)]
struct Stats {
    /// Requests routed, by where the primary endpoint holds the model: device, pool, disk, or
    /// not registered there.
    routed: [std::sync::atomic::AtomicU64; 4],
    /// Requests the picker had no opinion on (Envoy balanced them itself).
    unrouted: std::sync::atomic::AtomicU64,
}

const TIERS: [&str; 4] = ["device", "pool", "disk", "none"];

impl Picker {
    fn new(nodes: Nodes, policy: Policy) -> Self {
        Self { nodes, policy, rotation: AtomicUsize::new(0), stats: Stats::default() }
    }

    /// Prometheus text: routing decisions and the nodes' health as last scraped.
    fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kindling_picker_routed_total Requests routed, by the primary endpoint's tier for the model."
        );
        let _ = writeln!(out, "# TYPE kindling_picker_routed_total counter");
        for (tier, n) in TIERS.iter().zip(&self.stats.routed) {
            let _ = writeln!(out, "kindling_picker_routed_total{{tier=\"{tier}\"}} {}", n.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP kindling_picker_unrouted_total Requests left to Envoy's own balancing (unknown deployment, no healthy node)."
        );
        let _ = writeln!(out, "# TYPE kindling_picker_unrouted_total counter");
        let _ = writeln!(out, "kindling_picker_unrouted_total {}", self.stats.unrouted.load(Ordering::Relaxed));
        let nodes = self.nodes.snapshot();
        let healthy = nodes.iter().filter(|n| n.state.healthy).count();
        let _ = writeln!(out, "# HELP kindling_picker_nodes Nodes as last scraped.");
        let _ = writeln!(out, "# TYPE kindling_picker_nodes gauge");
        let _ = writeln!(out, "kindling_picker_nodes{{state=\"healthy\"}} {healthy}");
        let _ = writeln!(out, "kindling_picker_nodes{{state=\"unhealthy\"}} {}", nodes.len() - healthy);
        out
    }

    fn decide(&self, ex: &Exchange) -> Vec<String> {
        let model = ex.json.then(|| model_of(&ex.body)).flatten();
        let req = pick::RequestInfo { path: &ex.path, host: ex.host.as_deref(), model: model.as_deref() };
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        let ranked = pick::ranked(&self.nodes.snapshot(), &req, &self.policy, rotation);
        tracing::debug!(path = %ex.path, model = ?model, endpoints = ?ranked, "picked");
        match ranked.first() {
            Some((_, tier)) => self.stats.routed[tier.map_or(3, |t| t as usize)].fetch_add(1, Ordering::Relaxed),
            None => self.stats.unrouted.fetch_add(1, Ordering::Relaxed),
        };
        ranked.into_iter().map(|(address, _)| address).collect()
    }

    /// The reply to one message of the stream.
    fn reply(&self, ex: &mut Exchange, message: ProcessingRequest) -> ProcessingResponse {
        let cont = || CommonReply { response: Some(CommonResponse::default()) };
        let response = match message.request {
            Some(In::RequestHeaders(h)) => {
                for header in h.headers.map(|m| m.headers).unwrap_or_default() {
                    match header.key.as_str() {
                        ":path" => ex.path = header.text(),
                        ":authority" => ex.host = Some(header.text()),
                        "content-type" => ex.json = header.text().starts_with("application/json"),
                        _ => {}
                    }
                }
                if !h.end_of_stream {
                    // The body follows; pick once it is here.
                    return ProcessingResponse { response: Some(Out::RequestHeaders(cont())), dynamic_metadata: None };
                }
                return self.routed(Out::RequestHeaders, ex);
            }
            Some(In::RequestBody(b)) => {
                if ex.body.len() < MAX_BODY_PEEK {
                    ex.body.extend_from_slice(&b.body[..b.body.len().min(MAX_BODY_PEEK - ex.body.len())]);
                }
                if b.end_of_stream {
                    return self.routed(Out::RequestBody, ex);
                }
                Out::RequestBody(cont())
            }
            Some(In::ResponseHeaders(_)) => Out::ResponseHeaders(cont()),
            Some(In::ResponseBody(_)) => Out::ResponseBody(cont()),
            Some(In::RequestTrailers(_)) => Out::RequestTrailers(Default::default()),
            Some(In::ResponseTrailers(_)) | None => Out::ResponseTrailers(Default::default()),
        };
        ProcessingResponse { response: Some(response), dynamic_metadata: None }
    }

    /// CONTINUE carrying the picked endpoints: the primary as a header, all of them in order as
    /// `envoy.lb` metadata. No endpoints: plain CONTINUE (Envoy balances on its own).
    fn routed(&self, kind: fn(CommonReply) -> Out, ex: &Exchange) -> ProcessingResponse {
        let picked = self.decide(ex);
        let Some(primary) = picked.first() else {
            return ProcessingResponse {
                response: Some(kind(CommonReply { response: Some(CommonResponse::default()) })),
                dynamic_metadata: None,
            };
        };
        let mutation = HeaderMutation {
            set_headers: vec![ext_proc::set_header(DESTINATION_HEADER, primary)],
            remove_headers: vec![],
        };
        ProcessingResponse {
            response: Some(kind(CommonReply {
                response: Some(CommonResponse { header_mutation: Some(mutation), ..Default::default() }),
            })),
            dynamic_metadata: Some(ext_proc::metadata(METADATA_NAMESPACE, DESTINATION_HEADER, &picked.join(","))),
        }
    }
}

/// The `"model"` of a JSON object body, if any.
fn model_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.model
}

/// Takes one length-prefixed gRPC message off the front of `buf`, when a whole one is there.
fn take_message(buf: &mut BytesMut) -> Result<Option<Bytes>, String> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err("compressed gRPC messages are not supported".into());
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(format!("gRPC message of {len} bytes is over the {MAX_MESSAGE} limit"));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

/// The next whole `ProcessingRequest` at the front of `buf`, if one has arrived.
fn next_request(buf: &mut BytesMut) -> Result<Option<ProcessingRequest>, String> {
    match take_message(buf)? {
        Some(bytes) => ProcessingRequest::decode(bytes).map(Some).map_err(|e| format!("bad ProcessingRequest: {e}")),
        None => Ok(None),
    }
}

fn frame(message: &impl Message) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.encoded_len());
    out.put_u8(0);
    out.put_u32(message.encoded_len() as u32);
    message.encode(&mut out).expect("buffer has room");
    out.freeze()
}

fn trailers(status: u32, message: &str) -> Frame<Bytes> {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", status.into());
    if let Ok(v) = http::HeaderValue::from_str(message) {
        t.insert("grpc-message", v);
    }
    Frame::trailers(t)
}

type GrpcBody = StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// One `Process` stream: replies in order, then `grpc-status` trailers.
fn process(picker: Arc<Picker>, req: Request<Incoming>) -> Response<GrpcBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
    let unimplemented = req.uri().path() != PROCESS_PATH;
    tokio::spawn(async move {
        if unimplemented {
            let _ = tx.send(Ok(trailers(12, "only ExternalProcessor/Process is served"))).await;
            return;
        }
        let mut body = req.into_body();
        let mut buf = BytesMut::new();
        let mut exchange = Exchange::default();
        let status = 'stream: loop {
            match body.frame().await {
                None => break (0, String::new()),
                Some(Err(e)) => break (1, format!("stream: {e}")),
                Some(Ok(f)) => {
                    let Ok(data) = f.into_data() else { continue };
                    buf.extend_from_slice(&data);
                }
            }
            loop {
                match next_request(&mut buf) {
                    Ok(None) => break,
                    Ok(Some(m)) => {
                        let reply = picker.reply(&mut exchange, m);
                        if tx.send(Ok(Frame::data(frame(&reply)))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => break 'stream (3, e),
                }
            }
        };
        let _ = tx.send(Ok(trailers(status.0, &status.1))).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(Box::pin(stream) as futures_util::stream::BoxStream<'static, _>))
        .expect("valid response")
}

/// Answers every HTTP/1 request on `listener` with the picker's metrics.
async fn serve_metrics(listener: tokio::net::TcpListener, picker: Arc<Picker>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let picker = picker.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let text = picker.render_metrics();
                async move {
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(http_body_util::Full::new(Bytes::from(text)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

/// Serves ext_proc on `listener` (and, with `metrics`, Prometheus text on that listener) until
/// `shutdown` resolves, scraping the nodes meanwhile.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    config: PickerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    anyhow::ensure!(!config.nodes.is_empty(), "the picker needs at least one --node");
    let nodes = Nodes::new();
    nodes.spawn_scraper(config.nodes.clone(), config.scrape_every, config.admin_token.clone());
    let picker = Arc::new(Picker::new(nodes, config.policy));
    if let Some(metrics) = metrics {
        tokio::spawn(serve_metrics(metrics, picker.clone()));
    }
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let picker = picker.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let picker = picker.clone();
                async move { Ok::<_, Infallible>(process(picker, req)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(peer = %peer, error = %e, "ext_proc connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ext_proc::{HeaderMap, HeaderValue, HttpBody, HttpHeaders};
    use nodes::{DeploymentInfo, Node, NodeState, Tier};

    fn picker() -> Picker {
        let nodes = Nodes::new();
        let node = |address: &str, tier| Node {
            address: address.into(),
            state: NodeState {
                healthy: true,
                tiers: [("m".to_string(), tier)].into(),
                deployments: vec![DeploymentInfo {
                    name: "chat".into(),
                    routes: vec!["/chat".into()],
                    models: vec!["m".into()],
                }],
                ..Default::default()
            },
        };
        *nodes.inner_for_tests() = vec![node("n1:1", Tier::Disk), node("n2:2", Tier::Device)];
        Picker::new(nodes, Policy { imbalance: 8.0, kv_ceiling: 0.9, domain: None })
    }

    fn headers(path: &str, end_of_stream: bool) -> ProcessingRequest {
        let h =
            |k: &str, v: &str| HeaderValue { key: k.into(), value: String::new(), raw_value: v.as_bytes().to_vec() };
        ProcessingRequest {
            request: Some(In::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap { headers: vec![h(":path", path), h("content-type", "application/json")] }),
                end_of_stream,
            })),
        }
    }

    fn destination(reply: &ProcessingResponse) -> Option<(String, String)> {
        let common = match reply.response.as_ref()? {
            Out::RequestHeaders(c) | Out::RequestBody(c) => c.response.as_ref()?,
            _ => return None,
        };
        let header = common.header_mutation.as_ref()?.set_headers[0].header.as_ref()?.text();
        let Some(ext_proc::value::Kind::StructValue(lb)) =
            &reply.dynamic_metadata.as_ref()?.fields[METADATA_NAMESPACE].kind
        else {
            return None;
        };
        let Some(ext_proc::value::Kind::StringValue(list)) = &lb.fields[DESTINATION_HEADER].kind else { return None };
        Some((header, list.clone()))
    }

    #[test]
    fn a_bodyless_request_is_routed_at_its_headers() {
        let p = picker();
        let reply = p.reply(&mut Exchange::default(), headers("/chat", true));
        assert_eq!(destination(&reply), Some(("n2:2".into(), "n2:2,n1:1".into())));
        let unknown = p.reply(&mut Exchange::default(), headers("/elsewhere", true));
        assert_eq!(destination(&unknown), None, "no opinion on an unknown deployment");
        let metrics = p.render_metrics();
        assert!(metrics.contains("kindling_picker_routed_total{tier=\"device\"} 1\n"), "{metrics}");
        assert!(metrics.contains("kindling_picker_unrouted_total 1\n"), "{metrics}");
        assert!(metrics.contains("kindling_picker_nodes{state=\"healthy\"} 2\n"), "{metrics}");
    }

    #[test]
    fn a_request_with_a_body_is_routed_once_the_body_is_in() {
        let p = picker();
        let mut ex = Exchange::default();
        let first = p.reply(&mut ex, headers("/chat", false));
        assert!(matches!(first.response, Some(Out::RequestHeaders(_))) && destination(&first).is_none());
        let body = ProcessingRequest {
            request: Some(In::RequestBody(HttpBody {
                body: br#"{"model":"m","prompt":"hi"}"#.to_vec(),
                end_of_stream: true,
            })),
        };
        let reply = p.reply(&mut ex, body);
        assert!(matches!(reply.response, Some(Out::RequestBody(_))));
        assert_eq!(destination(&reply).unwrap().0, "n2:2");
    }

    #[test]
    fn grpc_framing_round_trips_and_refuses_oversized_messages() {
        let reply = ProcessingResponse::default();
        let mut buf = BytesMut::from(&frame(&reply)[..]);
        buf.extend_from_slice(&[0, 0, 0]);
        assert!(take_message(&mut buf).unwrap().is_some());
        assert!(take_message(&mut buf).unwrap().is_none(), "a partial header waits for more bytes");
        let mut huge = BytesMut::from(&[0u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(take_message(&mut huge).is_err());
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert!(take_message(&mut compressed).is_err());
    }
}
