"""Persistent redis clients for failover tests.

Opens N connections to HOST:PORT and keeps them: each connection, in turn,
sends INCR on one of K shared keys and waits for the reply. Counts the INCRs
whose reply arrived, per key. Never reconnects: a reset, a close or a reply
that does not arrive within the timeout is an error. Stops after COUNT
rounds or when STOPFILE exists; writes progress (acknowledged INCRs) to
PROGRESS; prints the counts and errors as JSON on stdout.

usage: incr_clients.py HOST PORT N K COUNT PROGRESS STOPFILE
"""
import json
import os
import random
import socket
import sys
import time

host, port, n, k, count, progress, stopfile = sys.argv[1:8]
port, n, k, count = int(port), int(n), int(k), int(count)
conns = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conns.append((s, s.getsockname()))
acked = {f"key{j}": 0 for j in range(k)}
errors = []
max_wait = 0.0
done = 0
rng = random.Random(7)
deadline = time.time() + 600
for r in range(count):
    if os.path.exists(stopfile) or time.time() > deadline or errors:
        break
    for i, (s, local) in enumerate(conns):
        key = f"key{rng.randrange(k)}"
        cmd = f"*2\r\n$4\r\nINCR\r\n${len(key)}\r\n{key}\r\n".encode()
        t = time.time()
        try:
            s.sendall(cmd)
            buf = b""
            while not buf.endswith(b"\r\n"):
                chunk = s.recv(64)
                if not chunk:
                    raise ConnectionError("connection closed by the server")
                buf += chunk
            if not buf.startswith(b":"):
                raise ValueError(f"unexpected reply {buf!r}")
            if s.getsockname() != local:
                raise ValueError("socket changed")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            errors.append(f"connection {i}: {type(e).__name__}: {e}")
            break
        max_wait = max(max_wait, time.time() - t)
        acked[key] += 1
        done += 1
    if r % 10 == 0:
        with open(progress + ".tmp", "w") as f:
            f.write(str(done))
        os.replace(progress + ".tmp", progress)
with open(progress + ".tmp", "w") as f:
    f.write(str(done))
os.replace(progress + ".tmp", progress)
print(json.dumps({"acked": acked, "errors": errors, "done": done, "max_wait_ms": int(max_wait * 1000)}))
