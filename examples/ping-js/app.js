// The smallest useful handler, in JavaScript: answers "pong" without touching a model.
// `kindling bench invoke` times it to show what an invocation itself costs.
// GET /ping-js -> pong

import { serve, Response } from "./kindling.js";

export const incomingHandler = serve(() => Response.text("pong\n"));
