"""backend: a JSON API on 127.0.0.1:$MESHSHIELD_PORT (only its sidecar reaches it)."""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INVENTORY = {"tea": 12, "scones": 4}
# From the CAS, through `meshshield run` (dev up generates it for local use).
HAS_DB_PASSWORD = bool(os.environ.get("DB_PASSWORD"))
print(f"backend: database password {'received' if HAS_DB_PASSWORD else 'MISSING'}",
      flush=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(INVENTORY).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", int(os.environ["MESHSHIELD_PORT"])), Handler).serve_forever()
