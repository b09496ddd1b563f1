"""Drives a Kindling OpenAI-compatible deployment with the official `openai` client and prints
what it got as one JSON object, for tests/e2e.rs to check.

usage: openai_client_check.py BASE_URL MODEL
"""

import json
import sys

from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key="unused-by-kindling", max_retries=0, timeout=60)
messages = [{"role": "user", "content": "Tell me about the lighthouse."}]
out = {}

chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
out["chat"] = {"text": chat.choices[0].message.content, "finish": chat.choices[0].finish_reason,
               "usage": chat.usage.model_dump(), "object": chat.object}

pieces, finish, usage = [], None, None
stream = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
for event in stream:
    if event.usage:
        usage = event.usage.model_dump()
    for choice in event.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
out["chat_stream"] = {"pieces": pieces, "text": "".join(pieces), "finish": finish, "usage": usage}

comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
out["completion"] = {"text": comp.choices[0].text, "finish": comp.choices[0].finish_reason,
                     "usage": comp.usage.model_dump()}
pieces = [e.choices[0].text for e in client.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                                                                temperature=0, stream=True) if e.choices]
out["completion_stream"] = {"text": "".join(pieces), "pieces": len(pieces)}

try:
    client.chat.completions.create(model="not-allowed", messages=messages, max_tokens=4)
    out["error"] = None
except Exception as e:  # the client raises on 4xx
    out["error"] = {"type": type(e).__name__, "status": getattr(e, "status_code", None)}
print(json.dumps(out))
