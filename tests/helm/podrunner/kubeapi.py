"""A stand-in for the one piece of the Kubernetes API the chart's pods call: TokenReview.

A projected token here is "token:<namespace>:<serviceaccount>:<audience>" (what the stand-in
kubelets write); a review answers with that ServiceAccount when it asks for the token's own
audience. Shared by test_identity_live.py and the pod runner.
"""

import http.server
import json
import ssl
import subprocess
import threading


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def token(namespace, serviceaccount, audience):
    return f"token:{namespace}:{serviceaccount}:{audience}"


def parse_token(text):
    """(namespace, serviceaccount, audience) of a stand-in token, or None."""
    parts = text.split(":", 3)  # the audience may hold colons (a URL)
    if len(parts) == 4 and parts[0] == "token":
        return parts[1], parts[2], parts[3]
    return None


class TokenReviewApi:
    """HTTPS POST /apis/authentication.k8s.io/v1/tokenreviews on host:port (port 0: any free one).

    `authorised(bearer)` decides whether a caller may create TokenReviews; by default only the
    bearer `own_token` may (the pod runner checks the rendered RBAC instead)."""

    def __init__(self, workdir, host="127.0.0.1", port=0, authorised=None):
        self.dir = workdir
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=api-ca", "-days", "1", cwd=workdir)
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "api.key", "-out", "api.csr", "-subj", "/CN=kubernetes", cwd=workdir)
        (workdir / "ext").write_text(f"subjectAltName=IP:{host},DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", "api.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "api.pem", "-days", "1", "-extfile", "ext", cwd=workdir)
        self.ca_file = workdir / "ca.pem"
        self.own_token = "issuer-own-token"
        self.authorised = authorised or (lambda bearer: bearer == self.own_token)
        self.reviews = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ok_path = self.path == "/apis/authentication.k8s.io/v1/tokenreviews"
                header = self.headers.get("Authorization", "")
                authorised = header.startswith("Bearer ") and api.authorised(header.removeprefix("Bearer "))
                spec = body.get("spec", {})
                api.reviews.append({"path_ok": ok_path, "authorised": authorised, "spec": spec})
                parsed = parse_token(spec.get("token", ""))
                if not (ok_path and authorised):
                    return self.answer(401, {"kind": "Status", "code": 401})
                if parsed and spec.get("audiences") == [parsed[2]]:
                    status = {"authenticated": True, "audiences": [parsed[2]],
                              "user": {"username": f"system:serviceaccount:{parsed[0]}:{parsed[1]}"}}
                else:
                    status = {"authenticated": False, "error": "invalid bearer token"}
                self.answer(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})

            def answer(self, code, doc):
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(workdir / "api.pem", workdir / "api.key")
        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.host, self.port = host, self.server.server_port
        self.url = f"https://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
