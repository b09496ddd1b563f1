//! The subset of Envoy's `envoy.service.ext_proc.v3` messages an endpoint picker reads and
//! writes, with the field numbers of Envoy's protos (`external_processor.proto`,
//! `config/core/v3/base.proto`, `google/protobuf/struct.proto`). Protobuf skips fields a
//! reader does not know, so this subset interoperates with the full messages.

use std::collections::BTreeMap;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessingRequest {
    #[prost(oneof = "processing_request::Request", tags = "2, 3, 4, 5, 6, 7")]
    pub request: Option<processing_request::Request>,
}

pub mod processing_request {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        #[prost(message, tag = "2")]
        RequestHeaders(super::HttpHeaders),
        #[prost(message, tag = "3")]
        ResponseHeaders(super::HttpHeaders),
        #[prost(message, tag = "4")]
        RequestBody(super::HttpBody),
        #[prost(message, tag = "5")]
        ResponseBody(super::HttpBody),
        #[prost(message, tag = "6")]
        RequestTrailers(super::HttpTrailers),
        #[prost(message, tag = "7")]
        ResponseTrailers(super::HttpTrailers),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpHeaders {
    #[prost(message, optional, tag = "1")]
    pub headers: Option<HeaderMap>,
    #[prost(bool, tag = "3")]
    pub end_of_stream: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    /// Envoy sends (and reads) values here; `value` is the older field.
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

impl HeaderValue {
    pub fn text(&self) -> String {
        if self.raw_value.is_empty() {
            self.value.clone()
        } else {
            String::from_utf8_lossy(&self.raw_value).into_owned()
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpBody {
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub end_of_stream: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpTrailers {
    #[prost(message, optional, tag = "1")]
    pub trailers: Option<HeaderMap>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessingResponse {
    #[prost(oneof = "processing_response::Response", tags = "1, 2, 3, 4, 5, 6")]
    pub response: Option<processing_response::Response>,
    /// Namespaced metadata for Envoy (`envoy.lb` carries the picked endpoints).
    #[prost(message, optional, tag = "8")]
    pub dynamic_metadata: Option<Struct>,
}

pub mod processing_response {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Response {
        #[prost(message, tag = "1")]
        RequestHeaders(super::CommonReply),
        #[prost(message, tag = "2")]
        ResponseHeaders(super::CommonReply),
        #[prost(message, tag = "3")]
        RequestBody(super::CommonReply),
        #[prost(message, tag = "4")]
        ResponseBody(super::CommonReply),
        #[prost(message, tag = "5")]
        RequestTrailers(super::TrailersResponse),
        #[prost(message, tag = "6")]
        ResponseTrailers(super::TrailersResponse),
    }
}

/// `HeadersResponse` and `BodyResponse`: both are `{ CommonResponse response = 1; }`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommonReply {
    #[prost(message, optional, tag = "1")]
    pub response: Option<CommonResponse>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TrailersResponse {
    #[prost(message, optional, tag = "1")]
    pub header_mutation: Option<HeaderMutation>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CommonResponse {
    /// 0: CONTINUE.
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(message, optional, tag = "2")]
    pub header_mutation: Option<HeaderMutation>,
    #[prost(bool, tag = "5")]
    pub clear_route_cache: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMutation {
    #[prost(message, repeated, tag = "1")]
    pub set_headers: Vec<HeaderValueOption>,
    #[prost(string, repeated, tag = "2")]
    pub remove_headers: Vec<String>,
}

/// `append_action` 2: OVERWRITE_IF_EXISTS_OR_ADD.
pub const OVERWRITE_IF_EXISTS_OR_ADD: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValueOption {
    #[prost(message, optional, tag = "1")]
    pub header: Option<HeaderValue>,
    #[prost(int32, tag = "3")]
    pub append_action: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Struct {
    #[prost(btree_map = "string, message", tag = "1")]
    pub fields: BTreeMap<String, Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(oneof = "value::Kind", tags = "3, 5")]
    pub kind: Option<value::Kind>,
}

pub mod value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(string, tag = "3")]
        StringValue(String),
        #[prost(message, tag = "5")]
        StructValue(super::Struct),
    }
}

/// A header to set, replacing any of the same name.
pub fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_string(), value: String::new(), raw_value: value.as_bytes().to_vec() }),
        append_action: OVERWRITE_IF_EXISTS_OR_ADD,
    }
}

/// `{namespace: {key: value}}` as dynamic metadata.
pub fn metadata(namespace: &str, key: &str, value: &str) -> Struct {
    let inner = Struct {
        fields: [(key.to_string(), Value { kind: Some(value::Kind::StringValue(value.to_string())) })].into(),
    };
    Struct { fields: [(namespace.to_string(), Value { kind: Some(value::Kind::StructValue(inner)) })].into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Bytes as protoc encodes `ProcessingRequest{request_headers{headers{headers{key:":path",
    /// raw_value:"/a"}}, end_of_stream:true}}`, written out by field number and wire type.
    #[test]
    fn decodes_envoys_wire_format() {
        let header_value = [&[0x0a, 5][..], b":path", &[0x1a, 2], b"/a"].concat();
        let header_map = [&[0x0a, header_value.len() as u8][..], &header_value].concat();
        let http_headers = [&[0x0a, header_map.len() as u8][..], &header_map, &[0x18, 1]].concat();
        let request = [&[0x12, http_headers.len() as u8][..], &http_headers].concat();
        let decoded = ProcessingRequest::decode(request.as_slice()).unwrap();
        let Some(processing_request::Request::RequestHeaders(h)) = decoded.request else { panic!("{decoded:?}") };
        assert!(h.end_of_stream);
        let headers = h.headers.unwrap().headers;
        assert_eq!((headers[0].key.as_str(), headers[0].text().as_str()), (":path", "/a"));
    }

    #[test]
    fn metadata_nests_namespace_then_key() {
        let m = metadata("envoy.lb", "x-gateway-destination-endpoint", "127.0.0.1:1,127.0.0.1:2");
        let round = Struct::decode(m.encode_to_vec().as_slice()).unwrap();
        let Some(value::Kind::StructValue(inner)) = &round.fields["envoy.lb"].kind else { panic!() };
        let Some(value::Kind::StringValue(v)) = &inner.fields["x-gateway-destination-endpoint"].kind else { panic!() };
        assert_eq!(v, "127.0.0.1:1,127.0.0.1:2");
    }
}
