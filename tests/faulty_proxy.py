"""A fault-injecting HTTP proxy on 127.0.0.1 for the BigQuery sink's tests.

Forwards every request to an upstream HTTP server (the emulator) unless told to fail:

    proxy = FaultyProxy("http://127.0.0.1:9050").start()
    proxy.fail_next(3, 503)                 # the next 3 matching requests answer 503
    proxy.fail_next(2, 429, forward=True)   # then 2 forwarded, but answered 429
    proxy.fail_always(503)                  # an outage, until heal()
    proxy.fail_after(5, 503)                # 5 more matching requests pass, then an outage
    ...
    proxy.stop()

``forward=True`` models a lost response: the upstream did the work, the client sees an error
and retries, so only idempotent writes (insertIds) keep the data free of duplicates.
Failures apply to requests whose path contains ``path_contains`` (default ``insertAll``, the
streaming inserts; ``""`` for all); everything else passes. Error bodies are shaped like Google's JSON errors.
"""

from __future__ import annotations

import collections
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "trailers",
  "transfer-encoding",
  "upgrade",
  "content-length",
}
_REASONS = {
  429: ("rateLimitExceeded", "RESOURCE_EXHAUSTED"),
  500: ("backendError", "INTERNAL"),
  502: ("badGateway", "UNAVAILABLE"),
  503: ("backendError", "UNAVAILABLE"),
  504: ("backendError", "DEADLINE_EXCEEDED"),
}


class FaultyProxy:
  def __init__(
    self, upstream: str, host: str = "127.0.0.1", port: int = 0, path_contains: str = "insertAll"
  ):
    parts = urlsplit(upstream)
    self._upstream = (parts.hostname, parts.port or 80)
    self._lock = threading.Lock()
    self._queue: collections.deque = collections.deque()  # (status, forward) for the next requests
    self._outage: int | None = None  # status of every matching request until heal()
    self._pass_first = 0  # matching requests let through before the outage starts
    self._path_contains = path_contains
    self.requests = 0  # every request seen
    self.matching = 0  # requests whose path matched
    self.failed = 0  # answers replaced by an error
    self.forwarded_then_failed = 0
    proxy = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fail_with, forward = proxy._decide(self.path)
        if fail_with is None or forward:
          status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
        if fail_with is not None:
          status, headers, data = (
            fail_with,
            [("Content-Type", "application/json")],
            _error_body(fail_with),
          )
        self.send_response(status)
        for k, v in headers:
          if k.lower() not in _HOP_BY_HOP:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    self._server = ThreadingHTTPServer((host, port), Handler)
    self._server.daemon_threads = True
    self._thread = threading.Thread(
      target=self._server.serve_forever, name="faulty-proxy", daemon=True
    )

  @property
  def endpoint(self) -> str:
    host, port = self._server.server_address[:2]
    return f"http://{host}:{port}"

  def start(self) -> FaultyProxy:
    self._thread.start()
    return self

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=10)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  # -- what to do

  def fail_next(self, n: int, status: int = 503, *, forward: bool = False) -> None:
    """Queues n failures for the next matching requests (queued after earlier fail_next calls)."""
    with self._lock:
      self._queue.extend([(status, forward)] * n)

  def fail_always(self, status: int = 503) -> None:
    """An outage: every matching request fails (after any queued failures) until heal()."""
    self.fail_after(0, status)

  def fail_after(self, ok: int, status: int = 503) -> None:
    """Lets `ok` more matching requests through, then fails every one of them until heal()."""
    with self._lock:
      self._outage, self._pass_first = status, ok

  def heal(self) -> None:
    with self._lock:
      self._queue.clear()
      self._outage, self._pass_first = None, 0

  def pending_failures(self) -> int:
    with self._lock:
      return len(self._queue)

  def _decide(self, path: str) -> tuple[int | None, bool]:
    with self._lock:
      self.requests += 1
      if self._path_contains not in path:
        return None, False
      self.matching += 1
      if self._queue:
        status, forward = self._queue.popleft()
      elif self._outage is not None and self._pass_first > 0:
        self._pass_first -= 1
        return None, False
      elif self._outage is not None:
        status, forward = self._outage, False
      else:
        return None, False
      self.failed += 1
      self.forwarded_then_failed += forward
      return status, forward

  def _forward(self, method: str, path: str, headers, body: bytes):
    conn = http.client.HTTPConnection(*self._upstream, timeout=60)
    try:
      out = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
      out["Content-Length"] = str(len(body))
      conn.request(method, path, body=body, headers=out)
      resp = conn.getresponse()
      return resp.status, resp.getheaders(), resp.read()
    except OSError as e:
      return 502, [("Content-Type", "application/json")], _error_body(502, f"upstream: {e}")
    finally:
      conn.close()


def _error_body(status: int, message: str | None = None) -> bytes:
  reason, code_name = _REASONS.get(status, ("backendError", "UNAVAILABLE"))
  message = message or f"injected by the faulty proxy: HTTP {status}"
  return json.dumps(
    {
      "error": {
        "code": status,
        "message": message,
        "status": code_name,
        "errors": [{"reason": reason, "message": message, "domain": "global"}],
      }
    }
  ).encode()


class TcpProxy:
  """A TCP relay on 127.0.0.1 that can be cut: an outage for HTTP and gRPC alike.

      proxy = TcpProxy("127.0.0.1", 9060).start()   # proxy.address -> '127.0.0.1:PORT'
      proxy.outage()     # every open connection is reset, new ones are refused at once
      proxy.heal()       # connections pass again
      proxy.stop()

  The emulator's Storage Write API is gRPC (HTTP/2), which an HTTP proxy cannot fault;
  cutting the byte stream is what a network outage or a restarted front end does.
  """

  def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1"):
    import socket

    self._upstream = (upstream_host, upstream_port)
    self._listener = socket.create_server((host, 0))
    self._lock = threading.Lock()
    self._down = False
    self._open: set = set()
    self._stopped = False
    self.connections = 0  # connections relayed
    self.refused = 0  # connections cut or refused during an outage
    self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)

  @property
  def address(self) -> str:
    host, port = self._listener.getsockname()[:2]
    return f"{host}:{port}"

  @property
  def endpoint(self) -> str:
    return f"http://{self.address}"

  def start(self) -> TcpProxy:
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stopped = True
    self._listener.close()
    self._cut_all()
    self._thread.join(timeout=10)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  def outage(self) -> None:
    with self._lock:
      self._down = True
    self._cut_all()

  def heal(self) -> None:
    with self._lock:
      self._down = False

  @property
  def is_down(self) -> bool:
    return self._down

  def _cut_all(self) -> None:
    import socket

    with self._lock:
      sockets, self._open = list(self._open), set()
    for s in sockets:
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
      s.close()

  def _accept(self) -> None:
    import socket

    while not self._stopped:
      try:
        client, _ = self._listener.accept()
      except OSError:
        return
      with self._lock:
        down = self._down
      if down:
        self.refused += 1
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # an RST: the client sees the connection refused or reset
        continue
      try:
        upstream = socket.create_connection(self._upstream, timeout=10)
        upstream.settimeout(None)
      except OSError:
        client.close()
        continue
      with self._lock:
        self._open.update((client, upstream))
      self.connections += 1
      for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

  def _pump(self, src, dst) -> None:
    import socket

    try:
      while True:
        data = src.recv(65536)
        if not data:
          break
        dst.sendall(data)
    except OSError:
      pass
    finally:
      for s in (src, dst):
        try:
          s.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass
      with self._lock:
        self._open.discard(src)
        self._open.discard(dst)
