"""A handler that misbehaves on purpose, one way per path, for the limits tests."""

import os
import time

import kindling
from kindling import Request, Response
from wit_world.imports import outgoing_handler
from wit_world.imports import types as http


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
    if what == "streams":
        # Opens streams without reading them until the host refuses one.
        model = kindling.llm.load(req.query.get("model", "tiny"))
        held, refusal = [], None
        while len(held) < int(req.query.get("n", "64")):
            try:
                held.append(model.generate_stream("Once", kindling.params(max_tokens=8)))
            except Exception as e:  # noqa: BLE001 - the refusal is what the test reads
                refusal = type(getattr(e, "value", e)).__name__ + ": " + str(getattr(getattr(e, "value", e), "value", e))
                break
        return Response.json({"opened": len(held), "refusal": refusal})
    if what == "escape":
        return Response.json({"attempts": escape_attempts(), "environ": dict(os.environ)})
    return Response.text("ok\n")


def escape_attempts():
    """Tries to reach outside the sandbox; each entry says what happened ("allowed: ..." or the error)."""

    def read_file():
        with open("/etc/passwd") as f:
            return f.read(64)

    def write_file():
        with open("/tmp/kindling-escape", "w") as f:
            return f.write("x")

    def open_socket():
        import socket

        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", 22))
        return "connected"

    def outgoing_http():
        request = http.OutgoingRequest(http.Fields())
        request.set_scheme(http.Scheme_Http())
        request.set_authority("127.0.0.1:9")
        request.set_path_with_query("/")
        future = outgoing_handler.handle(request, None)
        future.subscribe().block()
        outcome = future.get().value  # option<result<result<response, error-code>>>
        if isinstance(outcome, kindling.Err):
            raise RuntimeError(repr(outcome.value))
        return outcome.value

    attempts = {}
    for name, attempt in [
        ("read_file", read_file),
        ("write_file", write_file),
        ("list_root", lambda: os.listdir("/")),
        ("socket", open_socket),
        ("outgoing_http", outgoing_http),
    ]:
        try:
            attempts[name] = "allowed: " + repr(attempt())[:200]
        except BaseException as e:  # noqa: BLE001 - any refusal is the point
            attempts[name] = type(e).__name__ + ": " + repr(getattr(e, "value", e))[:200]
    return attempts


IncomingHandler = kindling.serve(handle)
