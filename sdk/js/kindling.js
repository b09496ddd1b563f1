// Kindling guest SDK for JavaScript handlers (built with componentize-js).
//
//   import { serve, Response, llm, params } from "kindling";
//   export const incomingHandler = serve((req) => {
//     const model = llm.load("tiny");
//     return Response.json({ text: model.generate("Hello", params({ maxTokens: 16 })).text });
//   });
//
// A Response body may be a string, a Uint8Array, or an iterable of them; an iterable is written
// and flushed piece by piece, so `stream(...)` sends tokens as the model produces them.

import * as llmImport from "kindling:llm/llm@0.1.0";
import { Fields, IncomingBody, OutgoingBody, OutgoingResponse, ResponseOutparam } from "wasi:http/types@0.2.12";

export const llm = llmImport;

// wasi:io output streams accept at most 4096 bytes per blocking write.
const WRITE_CHUNK = 4096;
const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

// The error code and HTTP status of each kindling:llm error.
// KINDLING-ERROR-CODES: the table in runtime/server/src/error_code.rs; its tests check this copy.
const LLM_STATUS = {
  "model_not_allowed": 403,
  "model_not_found": 404,
  "invalid_params": 400,
  "prompt_too_long": 413,
  "overloaded": 503,
  "runtime_error": 500,
};
// KINDLING-ERROR-CODES (end)

export class LlmError extends Error {
  constructor(payload) {
    const code = payload.tag.replaceAll("-", "_");
    super(`${code}: ${payload.val}`);
    this.code = code;
    this.detail = String(payload.val);
    this.status = LLM_STATUS[code] ?? 500;
  }
}

export class BadRequest extends Error {}

export class Request {
  constructor(method, pathWithQuery, headers, body) {
    const url = new URL(pathWithQuery, "http://handler");
    this.method = method;
    this.path = url.pathname;
    this.query = Object.fromEntries(url.searchParams);
    this.headers = Object.fromEntries(headers.map(([k, v]) => [k.toLowerCase(), new TextDecoder().decode(v)]));
    this.body = body;
  }

  text() {
    try {
      return decoder.decode(this.body);
    } catch {
      throw new BadRequest("request body is not valid UTF-8");
    }
  }

  json() {
    if (this.body.length === 0) return {};
    try {
      return JSON.parse(this.text());
    } catch (e) {
      throw new BadRequest(`request body is not valid JSON: ${e.message}`);
    }
  }
}

export class Response {
  constructor(status = 200, headers = {}, body = "") {
    this.status = status;
    this.headers = headers;
    this.body = body;
  }

  static text(text, status = 200) {
    return new Response(status, { "content-type": "text/plain; charset=utf-8" }, text);
  }

  static json(value, status = 200) {
    return new Response(status, { "content-type": "application/json" }, JSON.stringify(value) + "\n");
  }
}

/** Sampling parameters; temperature 0 is greedy decoding. */
export function params({ maxTokens = 64, temperature = 0, topP = 1, seed = undefined, stop = [] } = {}) {
  return { maxTokens, temperature, topP, seed: seed === undefined ? undefined : BigInt(seed), stop };
}

/** Calls a kindling:llm function, turning its error variant into an LlmError. */
export function call(fn) {
  try {
    return fn();
  } catch (e) {
    if (e && e.payload && typeof e.payload.tag === "string") throw new LlmError(e.payload);
    throw e;
  }
}

/** Yields text pieces as the model produces them. */
export function* stream(model, prompt, p) {
  const tokens = call(() => model.generateStream(prompt, p));
  for (;;) {
    const piece = call(() => tokens.next());
    if (piece === undefined || piece === null) return;
    yield piece;
  }
}

function readRequest(request) {
  const method = request.method();
  const name = method.tag === "other" ? method.val : method.tag.toUpperCase();
  const headers = request.headers().entries();
  const incoming = request.consume();
  const input = incoming.stream();
  const parts = [];
  let total = 0;
  for (;;) {
    let chunk;
    try {
      chunk = input.blockingRead(65536n);
    } catch (e) {
      if (e && e.payload && e.payload.tag === "closed") break;
      throw e;
    }
    parts.push(chunk);
    total += chunk.length;
  }
  input[Symbol.dispose]?.();
  IncomingBody.finish(incoming);
  const body = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    body.set(p, at);
    at += p.length;
  }
  return new Request(name, request.pathWithQuery() ?? "/", headers, body);
}

function* pieces(body) {
  if (typeof body === "string") yield encoder.encode(body);
  else if (body instanceof Uint8Array) yield body;
  else for (const p of body) yield typeof p === "string" ? encoder.encode(p) : p;
}

// The response and its body's pieces with the first one already produced: a body that fails
// before its first byte (a stream whose prompt is too long) is still answered with its error.
function settle(response) {
  let it = pieces(response.body);
  let first;
  try {
    first = it.next();
  } catch (e) {
    response = errorResponse(e);
    it = pieces(response.body);
    first = it.next();
  }
  const rest = it;
  function* all() {
    if (!first.done) yield first.value;
    yield* rest;
  }
  return [response, all()];
}

function send(responseOut, handled) {
  const [response, bodyPieces] = settle(handled);
  const fields = Fields.fromList(Object.entries(response.headers).map(([k, v]) => [k.toLowerCase(), encoder.encode(v)]));
  const outgoing = new OutgoingResponse(fields);
  outgoing.setStatusCode(response.status);
  const body = outgoing.body();
  ResponseOutparam.set(responseOut, { tag: "ok", val: outgoing });
  const out = body.write();
  for (const piece of bodyPieces) {
    for (let i = 0; i < piece.length; i += WRITE_CHUNK) {
      out.blockingWriteAndFlush(piece.subarray(i, i + WRITE_CHUNK));
    }
  }
  out[Symbol.dispose]?.();
  OutgoingBody.finish(body, undefined);
}

function errorResponse(e) {
  if (e instanceof LlmError) return Response.json({ error: { code: e.code, message: e.detail } }, e.status);
  if (e instanceof BadRequest) return Response.json({ error: { code: "bad_request", message: e.message } }, 400);
  console.error(e && e.stack ? e.stack : String(e));
  return Response.json({ error: { code: "handler_error", message: String(e) } }, 500);
}

/** Wraps `handle(Request) -> Response` as the component's wasi:http incoming handler. */
export function serve(handle) {
  return {
    handle(request, responseOut) {
      let response;
      try {
        response = handle(readRequest(request));
      } catch (e) {
        response = errorResponse(e);
      }
      try {
        send(responseOut, response);
      } catch (e) {
        console.error(e && e.stack ? e.stack : String(e));
      }
    },
  };
}
