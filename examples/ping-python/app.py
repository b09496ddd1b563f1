"""The smallest useful handler: answers "pong" without touching a model. `kindling bench invoke`
times it to show what an invocation itself costs (instantiate, run, respond).

GET /ping-python -> pong
"""

import kindling
from kindling import Request, Response


def handle(req: Request) -> Response:
    return Response.text("pong\n")


IncomingHandler = kindling.serve(handle)
