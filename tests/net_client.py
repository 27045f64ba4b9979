#!/usr/bin/env python3
"""The client side of the network tests: talks to the Linux guest's services (see
images/README-linux.md) from a client namespace, checks every byte, and prints one result line.
Exit status 0 when everything checked out, 1 otherwise (with the reason on stdout).

  net_client.py ADDR echo LINES       request/response on port 7: LINES lines, each answered
  net_client.py ADDR sink BYTES       BYTES pseudo-random bytes to port 9, then the count and
                                      CRC-32 it answers are compared with ours
  net_client.py ADDR source BYTES     BYTES from port 19, compared with "1\\n2\\n3\\n..."
  net_client.py ADDR http             GET / on port 80
  net_client.py ADDR talk SECONDS     echo requests back to back for SECONDS on one connection,
                                      each answer checked; a progress line on stderr each second;
                                      the result gives the longest wait for an answer (max_ms)
Timeouts are long (the guest kernel is emulated; a failover may pause the connection).
"""
import random, socket, sys, time, zlib

TIMEOUT = 120


def connect(addr, port):
    s = socket.create_connection((addr, port), timeout=TIMEOUT)
    s.settimeout(TIMEOUT)
    return s


def recv_all(s):
    out = bytearray()
    while True:
        b = s.recv(65536)
        if not b:
            return bytes(out)
        out += b


def exchange(s, what, i):
    """One echo request on `s`: sends line `i`, reads the answer up to its newline and checks
    it. Returns the failure as text, or None."""
    line = f'request {i} {random.getrandbits(64):016x}\n'.encode()
    s.sendall(line)
    got = b''
    while not got.endswith(b'\n'):
        b = s.recv(4096)
        if not b:
            return f'FAIL {what}: connection closed after {i} answers'
        got += b
    if got != line:
        return f'FAIL {what}: request {i}: sent {line!r}, got {got!r}'
    return None


def percentiles(lat):
    """The 50th and 99th percentiles of the latencies `lat` (sorted in place)."""
    lat.sort()
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def talk(s, start, secs, lat):
    """Echo requests back to back on `s` for `secs` seconds (see the module doc)."""
    i, shown = 0, start
    while time.time() - start < secs:
        t0 = time.time()
        failed = exchange(s, 'talk', i)
        if failed:
            print(failed)
            return 1
        lat.append(time.time() - t0)
        i += 1
        if time.time() - shown >= 1:
            shown = time.time()
            print(f'talk: {i} answers, last {lat[-1] * 1e3:.0f} ms', file=sys.stderr, flush=True)
    p50, p99 = percentiles(lat)
    print(f'OK talk {i} lines in {time.time() - start:.1f} s p50_ms={p50 * 1e3:.1f} '
          f'p99_ms={p99 * 1e3:.1f} max_ms={lat[-1] * 1e3:.0f}')
    return 0


def main():
    addr, what = sys.argv[1], sys.argv[2]
    start = time.time()
    if what == 'echo':
        n = int(sys.argv[3])
        s = connect(addr, 7)
        lat = []
        for i in range(n):
            t0 = time.time()
            failed = exchange(s, 'echo', i)
            if failed:
                print(failed)
                return 1
            lat.append(time.time() - t0)
        p50, p99 = percentiles(lat)
        print(f'OK echo {n} lines in {time.time() - start:.1f} s p50_ms={p50 * 1e3:.1f} p99_ms={p99 * 1e3:.1f}')
    elif what == 'talk':
        secs = float(sys.argv[3])
        s = connect(addr, 7)
        lat = []
        try:
            return talk(s, start, secs, lat)
        except OSError as e:
            print(f'FAIL talk: {e} after {len(lat)} answers, {time.time() - start:.1f} s in')
            return 1
    elif what == 'sink':
        n = int(sys.argv[3])
        data = random.randbytes(n)
        s = connect(addr, 9)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s).decode().split()
        want = [str(n), f'{zlib.crc32(data):08x}']
        if answer != want:
            print(f'FAIL sink: answered {answer}, expected {want}')
            return 1
        print(f'OK sink {n} bytes in {time.time() - start:.1f} s')
    elif what == 'source':
        n = int(sys.argv[3])
        s = connect(addr, 19)
        s.sendall(f'{n}\n'.encode())
        got = recv_all(s)
        want = b''.join(f'{i}\n'.encode() for i in range(1, n + 1))[:n]
        while len(want) < n:
            want = b''.join(f'{i}\n'.encode() for i in range(1, 2 * n + 1))[:n]
        if got != want:
            bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            print(f'FAIL source: {len(got)} bytes, expected {n}; first difference at byte {bad}')
            return 1
        print(f'OK source {n} bytes in {time.time() - start:.1f} s')
    elif what == 'http':
        s = connect(addr, 80)
        s.sendall(b'GET / HTTP/1.0\r\n\r\n')
        got = recv_all(s)
        if b'ftvmm guest' not in got:
            print(f'FAIL http: {got[:200]!r}')
            return 1
        print('OK http')
    else:
        print(f'unknown request {what}')
        return 2
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (OSError, ValueError) as e:
        print(f'FAIL {sys.argv[2]}: {e}')
        sys.exit(1)
