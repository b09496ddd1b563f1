"""A handler that misbehaves on purpose, one way per path, for the limits tests."""

import os
import time

import kindling
from kindling import Request, Response


def handle(req: Request) -> Response:
    what = req.path.rsplit("/", 1)[-1]
    if what == "loop":
        while True:
            pass
    if what == "memory":
        hog = []
        while True:
            hog.append(bytearray(8 << 20))
    if what == "exit":
        os._exit(3)  # the guest traps out of the handler
    if what == "sleep":
        time.sleep(float(req.query.get("s", "1")))
        return Response.text("slept\n")
    if what == "big":
        return Response(200, {"content-type": "application/octet-stream"}, (b"x" * 65536 for _ in range(64)))
    if what == "headers":
        return Response.json(req.headers)
    if what == "echo":
        return Response.json({"bytes": len(req.body)})
    return Response.text("ok\n")


IncomingHandler = kindling.serve(handle)
