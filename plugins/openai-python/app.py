"""An OpenAI-compatible endpoint as a Kindling handler.

POST /v1/chat/completions and /v1/completions, with `stream: true` as server-sent events and usage
counts; the model's own chat template renders chat messages. Deploy it with kindling.toml next to
this file and point any OpenAI client at http://HOST/v1.
"""

import json
import time
import uuid

import kindling
from kindling import LlmError, Request, Response, llm

FINISH = {"STOP": "stop", "LENGTH": "length"}


def openai_error(status: int, message: str, kind: str = "invalid_request_error", code=None) -> Response:
    return Response.json({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def sampling(body: dict) -> "llm.Params":
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    temperature = body.get("temperature")
    return kindling.params(
        max_tokens=int(max_tokens),
        temperature=1.0 if temperature is None else float(temperature),
        top_p=float(body.get("top_p") or 1.0),
        seed=body.get("seed"),
        stop=stop,
    )


def sse(obj) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def usage(u) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def complete(body: dict, chat: bool) -> Response:
    name = body.get("model")
    if not isinstance(name, str):
        return openai_error(400, "'model' is required")
    model = llm.load(name)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return openai_error(400, "'messages' must be a non-empty list")
        prompt = model.apply_chat_template([
            llm.Message(role=str(m.get("role", "user")), content=str(m.get("content") or "")) for m in messages
        ])
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return openai_error(400, "'prompt' must be a string")
    p = sampling(body)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return Response(200, {"content-type": "text/event-stream", "cache-control": "no-cache"},
                        stream_events(model, prompt, p, rid, created, name, chat, include_usage))

    out = model.generate(prompt, p)
    finish = FINISH[out.finish_reason.name]
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": finish,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": out.text, "finish_reason": finish, "logprobs": None}
    return Response.json({"id": rid, "object": kind, "created": created, "model": name, "choices": [choice],
                          "usage": usage(out.usage)})


def stream_events(model, prompt, p, rid, created, name, chat, include_usage):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_or_text, finish=None):
        if chat:
            choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta_or_text, "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": kind, "created": created, "model": name, "choices": [choice]}

    try:
        tokens = model.generate_stream(prompt, p)
    except kindling.Err as e:  # noqa: reported in-band, headers are already out
        yield sse({"error": {"message": str(LlmError(e.value)), "type": "server_error"}})
        return
    with tokens:
        if chat:
            yield sse(chunk({"role": "assistant", "content": ""}))
        while True:
            try:
                piece = tokens.next()
            except kindling.Err as e:
                yield sse({"error": {"message": str(LlmError(e.value)), "type": "server_error"}})
                return
            if piece is None:
                break
            yield sse(chunk({"content": piece} if chat else piece))
        reason, u = tokens.finish()
    yield sse(chunk({} if chat else "", FINISH[reason.name]))
    if include_usage:
        yield sse({"id": rid, "object": kind, "created": created, "model": name, "choices": [], "usage": usage(u)})
    yield "data: [DONE]\n\n"


def handle(req: Request) -> Response:
    if req.method == "GET" and req.path.rstrip("/") == "/v1/models":
        return Response.json({"object": "list", "data": []})
    if req.method != "POST":
        return openai_error(405, f"{req.method} is not supported here")
    body = req.json()
    if not isinstance(body, dict):
        return openai_error(400, "request body must be a JSON object")
    path = req.path.rstrip("/")
    if path == "/v1/chat/completions":
        return complete(body, chat=True)
    if path == "/v1/completions":
        return complete(body, chat=False)
    return openai_error(404, f"unknown endpoint {req.path}", code="not_found")


IncomingHandler = kindling.serve(handle)
