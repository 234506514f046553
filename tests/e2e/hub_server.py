"""A local Hugging Face hub for `dsv3-worker download`: one model repository served in the hub's
file API layout, as huggingface.co serves it.

- `GET /api/models/{repo}/revision/{rev}`: the commit and the file list.
- `GET /{repo}/resolve/{rev}/{file}`: a small file with its git blob id as `ETag`; an LFS file
  (`*.safetensors`) as a redirect to a content host, with its sha256 as `X-Linked-Etag`.
- `GET /cdn/{file}`: the bytes, honouring `Range`.

Faults for the tests: a token the repository requires, files whose first transfer is cut
halfway (the client must resume), files served with one byte changed (the client must
refuse them), and a delay before each transfer. Every request is logged as (path, Range header)."""

import hashlib
import http.server
import json
import os
import threading
import time

COMMIT = "3f1c0e5d2a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d"


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    def __init__(self, source_dir, repo="dsv3-test/tiny", extra_files=None, token=None):
        self.repo = repo
        self.token = token
        self.files = {}
        for name in sorted(os.listdir(source_dir)):
            with open(os.path.join(source_dir, name), "rb") as f:
                self.files[name] = f.read()
        self.files.update(extra_files or {})
        self.cut = set()
        self.corrupt = set()
        self.delay = 0.0
        self.requests = []
        self.lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with hub.lock:
                    hub.requests.append((self.path, self.headers.get("Range")))
                hub.handle(self)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hangs up on a cut transfer is the point of the test

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def body_requests(self, name):
        """Range headers of the transfers of `name` (metadata probes, bytes=0-0, left out)."""
        with self.lock:
            return [r for p, r in self.requests if p.split("?")[0] == "/cdn/" + name and r != "bytes=0-0"]

    # --- the hub's API ---

    def handle(self, h):
        path = h.path.split("?")[0]
        if path.startswith("/cdn/"):
            return self.serve_bytes(h, path[len("/cdn/"):])
        if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self.reply(h, 401, b'{"error":"Invalid credentials"}', {"X-Error-Code": "GatedRepo"})
        info = f"/api/models/{self.repo}/revision/"
        resolve = f"/{self.repo}/resolve/"
        if path.startswith(info):
            if not self.known_revision(path[len(info):]):
                return self.reply(h, 404, b'{"error":"Revision Not Found"}', {"X-Error-Code": "RevisionNotFound"})
            listing = {"sha": COMMIT, "siblings": [{"rfilename": n} for n in self.files]}
            return self.reply(h, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"})
        if path.startswith(resolve):
            revision, _, name = path[len(resolve):].partition("/")
            if not self.known_revision(revision) or name not in self.files:
                return self.reply(h, 404, b'{"error":"Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            data = self.files[name]
            headers = {"X-Repo-Commit": COMMIT}
            if name.endswith(".safetensors"):
                headers |= {
                    "Location": f"{self.url}/cdn/{name}?signature=x",
                    "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_id(b"lfs pointer " + name.encode())}"',
                }
                return self.reply(h, 302, b"", headers)
            headers["ETag"] = f'"{git_blob_id(data)}"'
            return self.serve_range(h, data, headers, cut=False)
        return self.reply(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})

    def known_revision(self, revision):
        return revision in ("main", COMMIT)

    def serve_bytes(self, h, name):
        if name not in self.files:
            return self.reply(h, 404, b"", {})
        if self.delay and h.headers.get("Range") != "bytes=0-0":
            time.sleep(self.delay)
        data = self.files[name]
        if name in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        cut = False
        with self.lock:
            if name in self.cut and h.headers.get("Range") != "bytes=0-0":
                self.cut.discard(name)
                cut = True
        return self.serve_range(h, data, {}, cut)

    def serve_range(self, h, data, headers, cut):
        start, end = 0, len(data) - 1
        spec = h.headers.get("Range")
        status = 200
        if spec and spec.startswith("bytes="):
            first, _, last = spec[len("bytes="):].partition("-")
            start = int(first)
            end = int(last) if last else len(data) - 1
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
        body = data[start:end + 1]
        if not cut:
            return self.reply(h, status, body, headers)
        # Promise the whole range, send half, and drop the connection.
        h.send_response(status)
        for k, v in (headers | {"Content-Length": str(len(body))}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body[: len(body) // 2])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(2)

    @staticmethod
    def reply(h, status, body, headers):
        h.send_response(status)
        for k, v in (headers | {"Content-Length": str(len(body))}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
