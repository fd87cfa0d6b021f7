#!/usr/bin/env python3
"""What the attacks of the hardening audit cost now, measured against the release binary
on loopback (not in CI): half-sent requests held open, half-sent requests closed at a
steady rate, and connect-and-close churn over new session ids. Prints one line each.
    cargo build --release && python3 scripts/hostile.py
"""
import asyncio, json, os, socket, subprocess, sys, time, uuid, urllib.request

BIN = os.environ.get("CHAT_SYNC_BIN", "target/release/chat-sync")
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def ready(port):
    try:
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5))
    except Exception:
        return None


def start(env):
    port = free_port()
    proc = subprocess.Popen([BIN], env={**os.environ, "PORT": str(port), "BIND_ADDR": "127.0.0.1",
                                        "RUST_LOG": "error", **env})
    for _ in range(200):
        if ready(port):
            return proc, port
        time.sleep(0.05)
    sys.exit("chat-sync did not start")


async def hold_half_sent(port, n, seconds):
    writers = []
    for _ in range(n):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"G"); await w.drain(); writers.append(w)
    await asyncio.sleep(seconds)
    for w in writers:
        w.close()


async def half_sent_and_close(port, rate, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"G"); await w.drain(); w.close()
        except OSError:
            pass
        await asyncio.sleep(1 / rate)


async def churn(port, seconds):
    counts, end = {}, time.monotonic() + seconds
    while time.monotonic() < end:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"GET /api/v1/chats/sse-connect/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await w.drain()
        status = (await r.readline()).split(b" ")[1:2]
        counts[status[0].decode() if status else "?"] = counts.get(status[0].decode() if status else "?", 0) + 1
        w.close()
    return counts


def main():
    proc, port = start({"HEADER_TIMEOUT_MS": "30000"})
    try:
        pid = proc.pid
        c0 = cpu_seconds(pid); time.sleep(5); idle = (cpu_seconds(pid) - c0) / 5
        print(f"idle: {idle * 100:.1f}% of a core, {fds(pid)} fds")

        c0 = cpu_seconds(pid)
        asyncio.run(hold_half_sent(port, 1000, 10))
        held = (cpu_seconds(pid) - c0) / 10
        print(f"1,000 connections holding a half-sent request for 10 s: {held * 100:.1f}% of a core")
        time.sleep(1)

        asyncio.run(half_sent_and_close(port, 150, 10))
        time.sleep(1)
        r = ready(port)
        print(f"150/s send 'G' and close, for 10 s; 1 s later: {r['pendingConnections']} pending, {fds(pid)} fds")

        counts = asyncio.run(churn(port, 5))
        time.sleep(1)
        r = ready(port)
        print(f"connect-and-close on new session ids from one address for 5 s: answers {counts}; "
              f"1 s later {r['sessions']} sessions live (MAX_SESSIONS 10,000)")
    finally:
        proc.terminate(); proc.wait()


if __name__ == "__main__":
    main()
