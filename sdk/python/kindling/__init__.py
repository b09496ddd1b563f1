"""Kindling guest SDK for Python handlers (built with componentize-py).

A handler is a function from `Request` to `Response`; `serve` turns it into the
`IncomingHandler` class componentize-py looks for::

    import kindling
    from kindling import Request, Response, llm

    def handle(req: Request) -> Response:
        model = llm.load("tiny")
        out = model.generate("Hello", kindling.params(max_tokens=16))
        return Response.text(out.text)

    IncomingHandler = kindling.serve(handle)

A `Response` body may be bytes, str, or an iterable of them; an iterable is written and
flushed piece by piece, so tokens from `stream()` reach the client as they are generated.
"""

import json as _json
import sys
import traceback
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union
from urllib.parse import parse_qs, urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import llm
from wit_world.imports import types as _http
from wit_world.imports.streams import StreamError_Closed

__all__ = ["Err", "Request", "Response", "LlmError", "llm", "params", "serve", "stream"]

# wasi:io output streams accept at most 4096 bytes per blocking write.
_WRITE_CHUNK = 4096

Body = Union[bytes, str, Iterable[Union[bytes, str]]]


class Request:
    """An incoming HTTP request with its body already read."""

    def __init__(self, method: str, path_with_query: str, headers: List[Tuple[str, bytes]], body: bytes):
        self.method = method
        parts = urlsplit(path_with_query)
        self.path = parts.path
        self.query: Dict[str, str] = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.headers: Dict[str, str] = {k.lower(): v.decode("latin-1") for k, v in headers}
        self.body = body

    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self):
        """The body parsed as JSON; raises ValueError (answered with 400) when it is not."""
        if not self.body:
            return {}
        try:
            return _json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None


class Response:
    def __init__(self, status: int = 200, headers: Optional[Dict[str, str]] = None, body: Body = b""):
        self.status = status
        self.headers = dict(headers or {})
        self.body = body

    @staticmethod
    def text(text: str, status: int = 200) -> "Response":
        return Response(status, {"content-type": "text/plain; charset=utf-8"}, text)

    @staticmethod
    def json(value, status: int = 200) -> "Response":
        return Response(status, {"content-type": "application/json"}, _json.dumps(value) + "\n")


class BadRequest(Exception):
    """Raise to answer 400 with this message."""


class LlmError(Exception):
    """A `kindling:llm` error, with its error code (`prompt_too_long`) and the HTTP status it maps to."""

    # KINDLING-ERROR-CODES: the table in runtime/server/src/error_code.rs; its tests check this copy.
    STATUS = {
        "model_not_allowed": 403,
        "model_not_found": 404,
        "invalid_params": 400,
        "prompt_too_long": 413,
        "overloaded": 503,
        "runtime_error": 500,
    }
    # KINDLING-ERROR-CODES (end)

    def __init__(self, error):
        kind = type(error).__name__.removeprefix("Error_")  # ModelNotAllowed
        self.code = "".join("_" + c.lower() if c.isupper() else c for c in kind).lstrip("_")
        self.message = getattr(error, "value", str(error))
        self.status = self.STATUS.get(self.code, 500)
        super().__init__(f"{self.code}: {self.message}")


def params(max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
           seed: Optional[int] = None, stop: Optional[List[str]] = None) -> llm.Params:
    """Sampling parameters; temperature 0 is greedy decoding."""
    return llm.Params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=list(stop or []))


def stream(model: llm.Model, prompt: str, p: llm.Params) -> Iterator[str]:
    """Yields text pieces as the model produces them."""
    try:
        tokens = model.generate_stream(prompt, p)
    except Err as e:
        raise LlmError(e.value) from None
    with tokens:
        while True:
            try:
                piece = tokens.next()
            except Err as e:
                raise LlmError(e.value) from None
            if piece is None:
                return
            yield piece


def _read_request(request: _http.IncomingRequest) -> Request:
    method = request.method()
    name = type(method).__name__.removeprefix("Method_").upper()
    if name == "OTHER":
        name = method.value
    path = request.path_with_query() or "/"
    headers = request.headers().entries()
    body = bytearray()
    incoming = request.consume()
    with incoming.stream() as s:
        while True:
            try:
                body += s.blocking_read(65536)
            except Err as e:
                if isinstance(e.value, StreamError_Closed):
                    break
                raise
    _http.IncomingBody.finish(incoming)
    return Request(name, path, headers, bytes(body))


def _pieces(body: Body) -> Iterator[bytes]:
    if isinstance(body, (bytes, bytearray)):
        yield bytes(body)
    elif isinstance(body, str):
        yield body.encode("utf-8")
    else:
        for piece in body:
            yield piece.encode("utf-8") if isinstance(piece, str) else bytes(piece)


def _settle(response: Response) -> Tuple[Response, Iterator[bytes]]:
    """The response and its body's pieces, with the first one already produced: a body that fails
    before its first byte (a stream whose prompt is too long) is still answered with its error."""
    pieces = _pieces(response.body)
    try:
        first = next(pieces, None)
    except Exception as e:
        response = _error_response(e)
        pieces = _pieces(response.body)
        first = next(pieces, None)
    head = [] if first is None else [first]
    return response, _chain(head, pieces)


def _chain(head: List[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from head
    yield from rest


def _send(response_out: _http.ResponseOutparam, response: Response) -> None:
    response, pieces = _settle(response)
    fields = _http.Fields.from_list([(k.lower(), v.encode("latin-1")) for k, v in response.headers.items()])
    outgoing = _http.OutgoingResponse(fields)
    outgoing.set_status_code(response.status)
    body = outgoing.body()
    _http.ResponseOutparam.set(response_out, Ok(outgoing))
    with body.write() as out:
        for piece in pieces:
            for i in range(0, len(piece), _WRITE_CHUNK):
                out.blocking_write_and_flush(piece[i:i + _WRITE_CHUNK])
    _http.OutgoingBody.finish(body, None)


def _error_response(e: Exception) -> Response:
    if isinstance(e, LlmError):
        return Response.json({"error": {"code": e.code, "message": e.message}}, e.status)
    if isinstance(e, BadRequest):
        return Response.json({"error": {"code": "bad_request", "message": str(e)}}, 400)
    if isinstance(e, Err) and type(e.value).__module__.endswith("llm"):
        return _error_response(LlmError(e.value))
    traceback.print_exc(file=sys.stderr)
    return Response.json({"error": {"code": "handler_error", "message": f"{type(e).__name__}: {e}"}}, 500)


def serve(handle):
    """Wraps `handle(Request) -> Response` as the component's wasi:http incoming handler."""

    class IncomingHandler(exports.IncomingHandler):
        def handle(self, request: _http.IncomingRequest, response_out: _http.ResponseOutparam) -> None:
            try:
                response = handle(_read_request(request))
            except Exception as e:  # every failure becomes an HTTP answer, never a trap
                response = _error_response(e)
            try:
                _send(response_out, response)
            except Exception as e:
                # Headers may already be out; all that is left is to say why in the logs.
                traceback.print_exc(file=sys.stderr)

    return IncomingHandler


def _warm_up() -> None:
    """Runs the pure-Python paths of a request once while the component is being built.

    componentize-py snapshots the interpreter after importing the app, and every invocation starts
    from that snapshot in a fresh instance. Whatever the first request would initialise lazily
    (codec lookups, parser caches, JSON encoders) is done here, once, instead of per request.
    """
    req = Request("POST", "/warm/up?a=1&b=2", [("Content-Type", b"application/json")], b'{"x": [1, "y"]}')
    req.json()
    req.text()
    for response in (Response.json({"error": {"code": "bad_request", "message": "m"}}), Response.text("t")):
        [(k.lower(), v.encode("latin-1")) for k, v in response.headers.items()]
        list(_pieces(response.body))
    "x".encode("utf-8").decode("utf-8")


_warm_up()
