// Hello, Kindling, in JavaScript: the same contract as examples/hello-python.
// POST /hello-js {"prompt": "...", "max_tokens": 32, "temperature": 0, "seed": 1, "stream": false}

import { serve, Response, llm, params, call, stream } from "./kindling.js";

export const incomingHandler = serve((req) => {
  const body = req.json();
  const prompt = body.prompt ?? "Once upon a time";
  const p = params({
    maxTokens: body.max_tokens ?? 32,
    temperature: body.temperature ?? 0,
    topP: body.top_p ?? 1,
    seed: body.seed,
    stop: body.stop ?? [],
  });
  const model = call(() => llm.load(body.model ?? "tiny"));
  if (body.stream) {
    return new Response(200, { "content-type": "text/plain; charset=utf-8" }, stream(model, prompt, p));
  }
  const out = call(() => model.generate(prompt, p));
  return Response.json({
    model: model.name(),
    text: out.text,
    finish_reason: out.finishReason,
    usage: { prompt_tokens: out.usage.promptTokens, completion_tokens: out.usage.completionTokens },
  });
});
