"""frontend: renders the backend's inventory, fetched through the mesh."""

import http.client
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BACKEND = os.environ["MESHSHIELD_CALL_BACKEND"]  # 127.0.0.1:<port of frontend's sidecar>


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        host, port = BACKEND.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/inventory")
        inventory = conn.getresponse().read().decode()
        body = f"inventory via the mesh: {inventory}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", int(os.environ["MESHSHIELD_PORT"])), Handler).serve_forever()
