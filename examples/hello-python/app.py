"""Hello, Kindling: a handler that completes a prompt with a model the host keeps warm.

POST /hello {"prompt": "...", "max_tokens": 32, "temperature": 0, "seed": 1, "stream": false}
"""

import kindling
from kindling import Request, Response, llm


def handle(req: Request) -> Response:
    body = req.json()
    prompt = body.get("prompt", "Once upon a time")
    p = kindling.params(
        max_tokens=int(body.get("max_tokens", 32)),
        temperature=float(body.get("temperature", 0.0)),
        top_p=float(body.get("top_p", 1.0)),
        seed=body.get("seed"),
        stop=body.get("stop"),
    )
    model = llm.load(body.get("model", "tiny"))
    if body.get("stream") or req.query.get("stream") == "1":
        return Response(200, {"content-type": "text/plain; charset=utf-8"}, kindling.stream(model, prompt, p))
    out = model.generate(prompt, p)
    return Response.json({
        "model": model.name(),
        "text": out.text,
        "finish_reason": out.finish_reason.name.lower(),
        "usage": {"prompt_tokens": out.usage.prompt_tokens, "completion_tokens": out.usage.completion_tokens},
    })


IncomingHandler = kindling.serve(handle)
