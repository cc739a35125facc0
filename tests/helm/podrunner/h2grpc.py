"""Many unary gRPC calls at once over h2c, each one's grpc-status checked: load for spreading
calls over replicas and for certificate rotation under load. Protobuf messages are encoded by
hand (strings, integers and nested messages are all these requests need)."""

import socket
import threading
import time

import h2.config
import h2.connection
import h2.events

from . import net


def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def message(*fields):
    """Encodes (number, value) pairs: str and bytes length-delimited, int as a varint, a tuple
    of pairs as a nested message."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            out += _varint(number << 3) + _varint(value)
        else:
            if isinstance(value, tuple):
                value = message(*value)
            elif isinstance(value, str):
                value = value.encode()
            out += _varint(number << 3 | 2) + _varint(len(value)) + value
    return bytes(out)


class Call:
    def __init__(self, path, body):
        self.path, self.body = path, body
        self.status = None
        self.error = None
        self.data = b""
        self.started = self.ended = None


def _run_connection(address, authority, calls, concurrency, timeout):
    pending = list(calls)
    open_streams = {}
    sock = None
    try:
        sock = socket.create_connection(address, timeout=timeout)
        sock.settimeout(timeout)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        conn.increment_flow_control_window(16 * 1024 * 1024)
        sock.sendall(conn.data_to_send())
        while pending or open_streams:
            while pending and len(open_streams) < concurrency:
                call = pending.pop(0)
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":path", call.path),
                                           (":authority", authority), ("content-type", "application/grpc"),
                                           ("te", "trailers"), ("grpc-timeout", f"{int(timeout)}S")])
                conn.send_data(stream, b"\x00" + len(call.body).to_bytes(4, "big") + call.body, end_stream=True)
                call.started = time.monotonic()
                open_streams[stream] = call
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            for event in conn.receive_data(data):
                call = open_streams.get(getattr(event, "stream_id", None))
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and call:
                    for name, value in event.headers:
                        if name == "grpc-status":
                            call.status = int(value)
                        elif name == "grpc-message":
                            call.error = value
                elif isinstance(event, h2.events.DataReceived) and call:
                    call.data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and call:
                    call.ended = time.monotonic()
                    del open_streams[event.stream_id]
                elif isinstance(event, h2.events.StreamReset) and call:
                    call.error = f"stream reset (error code {event.error_code})"
                    del open_streams[event.stream_id]
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise ConnectionError(f"GOAWAY (error code {event.error_code})")
            sock.sendall(conn.data_to_send())
    except Exception as e:
        for call in list(open_streams.values()) + pending:
            call.error = call.error or f"{type(e).__name__}: {e}"
    finally:
        if sock:
            sock.close()


def run_calls(netns, address, authority, calls, connections=1, concurrency=8, timeout=20):
    """Sends the calls from the named namespace over `connections` h2c connections to address
    (ip, port), up to `concurrency` in flight on each. Fills in each call's status."""
    shares = [calls[i::connections] for i in range(connections)]
    threads = [threading.Thread(target=net.in_netns, args=(netns, _run_connection, address, authority, share, concurrency, timeout),
                                kwargs={"timeout": timeout * (len(share) + 2)}, daemon=True)
               for share in shares if share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return calls
