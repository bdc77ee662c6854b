# A TCP echo server on loopback: serves one client at a time with select(),
# echoes each line upper-cased, and exits after the given number of clients.
import select, socket, sys, time, random

port, clients = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(8)
print("listening", flush=True)
served = 0
total = 0
while served < clients:
    conn, addr = srv.accept()
    buf = b""
    while True:
        r, _, _ = select.select([conn], [], [], 5.0)
        if not r:
            break
        data = conn.recv(4096)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            total += len(line)
            conn.sendall(line.upper() + b" " + str(random.randint(0, 99)).encode() + b"\n")
    conn.close()
    served += 1
print("served", served, "bytes", total, "at", round(time.time()))
