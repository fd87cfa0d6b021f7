// The end-to-end harness: a real redis-server and the real chat-sync binary on free
// loopback ports, a TCP proxy the tests can cut, and Debian's Chromium driven by
// playwright-core (a test tool's own browser download does not work offline).

import { spawn } from "node:child_process";
import net from "node:net";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const BIN = process.env.CHAT_SYNC_BIN || path.join(root, "target/debug/chat-sync");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` until it returns a truthy value; fails after `ms`. */
export async function waitFor(what, check, ms = 30000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(25);
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** A minimal RESP client: enough to PUBLISH (pipelined) and PING. */
export class Redis {
  constructor(port) { this.port = port; }

  static encode(args) {
    let out = `*${args.length}\r\n`;
    for (const a of args) out += `$${Buffer.byteLength(String(a))}\r\n${a}\r\n`;
    return out;
  }

  /** Sends the commands in one write; resolves with the number of replies once all arrived. */
  send(commands) {
    return new Promise((resolve, reject) => {
      const socket = net.connect(this.port, "127.0.0.1");
      let replies = 0, buffered = "";
      socket.on("error", reject);
      socket.on("data", (chunk) => {
        buffered += chunk.toString();
        const lines = buffered.split("\r\n");
        buffered = lines.pop();
        replies += lines.filter((l) => /^[:+\-]/.test(l)).length;
        if (replies >= commands.length) { socket.end(); resolve(replies); }
      });
      socket.write(commands.map(Redis.encode).join(""));
    });
  }

  publish(channel, payloads) {
    return this.send(payloads.map((p) => ["PUBLISH", channel, p]));
  }
}

export async function startRedis() {
  for (let attempt = 0; attempt < 10; attempt++) {
    const port = await freePort();
    const proc = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "",
      "--appendonly", "no", "--loglevel", "warning"], { stdio: "ignore" });
    let exited = false;
    proc.on("exit", () => { exited = true; });
    const redis = new Redis(port);
    try {
      await waitFor("redis answers", async () => !exited && (await redis.send([["PING"]]).catch(() => 0)) === 1, 15000);
      redis.stop = () => proc.kill("SIGKILL");
      return redis;
    } catch (_) {
      proc.kill("SIGKILL");
    }
  }
  throw new Error("could not start redis-server");
}

/** The chat-sync binary; `port` fixed so a restart comes back on the same address. */
export async function startServer(env, port) {
  port = port || (await freePort());
  const proc = spawn(BIN, [], {
    env: { PATH: process.env.PATH, BIND_ADDR: "127.0.0.1", PORT: String(port), RUST_LOG: "warn", ...env },
    stdio: ["ignore", "ignore", "inherit"],
  });
  let exited = false;
  const done = new Promise((r) => proc.on("exit", () => { exited = true; r(); }));
  await waitFor("chat-sync is ready", async () => {
    if (exited) throw new Error("chat-sync exited at start");
    return get(`http://127.0.0.1:${port}/readyz`).then((r) => r.status === 200, () => false);
  });
  return {
    port,
    url: (p = "/") => `http://127.0.0.1:${port}${p}`,
    async stop() { proc.kill("SIGTERM"); await done; },
    async metric(series) {
      const text = (await get(`http://127.0.0.1:${port}/metrics`)).body;
      const line = text.split("\n").find((l) => l.startsWith(series + " "));
      if (!line) throw new Error(`no ${series} in /metrics`);
      return Number(line.split(" ").pop());
    },
  };
}

export function get(url) {
  return new Promise((resolve, reject) => {
    http.get(url, (res) => {
      let body = "";
      res.on("data", (c) => { body += c; });
      res.on("end", () => resolve({ status: res.statusCode, body }));
    }).on("error", reject);
  });
}

/** A TCP proxy whose connections the test can cut, as a flaky network would. */
export async function startProxy(targetPort) {
  const sockets = new Set();
  let connections = 0;
  const server = net.createServer((client) => {
    connections++;
    const upstream = net.connect(targetPort, "127.0.0.1");
    sockets.add(client); sockets.add(upstream);
    const close = () => { client.destroy(); upstream.destroy(); sockets.delete(client); sockets.delete(upstream); };
    client.on("error", close); upstream.on("error", close);
    client.on("close", close); upstream.on("close", close);
    client.pipe(upstream); upstream.pipe(client);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  return {
    port,
    url: (p = "/") => `http://127.0.0.1:${port}${p}`,
    connections: () => connections,
    cut() { for (const s of sockets) s.destroy(); sockets.clear(); },
    close() { this.cut(); server.close(); },
  };
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

/** The chat payload the tests publish, numbered. */
export function chat(i, nickname = "viewer") {
  return JSON.stringify({ id: `p-${nickname}`, nickname, profileImgUrl: "", message: `hello ${i}`,
    createdAt: "2026-11-24T10:15:30.123", seq: i });
}

/** The payloads shown in the page, in DOM order. */
export function shown(page) {
  return page.$$eval(".msg", (els) => els.map((e) => e.dataset.payload));
}
