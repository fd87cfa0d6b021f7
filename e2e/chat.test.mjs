// End-to-end: the demo page in headless Chromium, reading the real server's stream
// with the browser's own EventSource.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { randomUUID } from "node:crypto";
import {
  startRedis, startServer, startProxy, launchBrowser, waitFor, sleep, chat, shown, freePort,
} from "./harness.mjs";

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

// Every test below runs against a server that compresses (Chromium's EventSource asks
// for gzip by itself) and one that does not: the page must see the same either way.
const MODES = [
  { label: "gzip", env: { COMPRESSION: "true" }, encoding: "gzip" },
  { label: "plain", env: { COMPRESSION: "false" }, encoding: undefined },
];

async function openPage(url) {
  const page = await browser.newPage();
  // How the browser received each stream, and any stream it could not decode.
  page.streams = { encodings: [], broken: [] };
  page.on("response", (r) => {
    if (r.url().includes("/sse-connect/") && r.status() === 200) {
      page.streams.encodings.push(r.headers()["content-encoding"]);
    }
  });
  page.on("requestfailed", (r) => {
    const error = r.failure()?.errorText || "";
    if (r.url().includes("/sse-connect/") && !error.includes("ERR_ABORTED")) {
      page.streams.broken.push(error);
    }
  });
  await page.goto(url);
  await page.waitForSelector("#state.live");
  return page;
}

/** Every stream the page opened came as `mode` says, and each ended cleanly. */
function assertStreams(page, mode) {
  assert.ok(page.streams.encodings.length > 0, "the page opened a stream");
  for (const encoding of page.streams.encodings) assert.equal(encoding, mode.encoding);
  assert.deepEqual(page.streams.broken, [], "no stream failed to decode or ended broken");
}

for (const mode of MODES) test(`500 messages published to Redis appear in the page in order, exactly once (${mode.label})`, async () => {
  const redis = await startRedis();
  const server = await startServer({ REDIS_URL: `redis://127.0.0.1:${redis.port}`, ...mode.env });
  try {
    const room = randomUUID();
    const page = await openPage(server.url(`/#${room}`));
    const sent = Array.from({ length: 500 }, (_, i) => chat(i));
    await redis.publish(room, sent);
    await page.waitForFunction(() => document.querySelectorAll(".msg").length >= 500);
    // A marker published now arrives after anything still due, so a duplicate of the
    // 500 would show before it: the check waits on the marker, not on a timer.
    await redis.publish(room, [chat(500)]);
    await page.waitForFunction(() => document.querySelectorAll(".msg").length >= 501);
    assert.deepEqual(await shown(page), [...sent, chat(500)]);
    assert.equal(await page.textContent("#total"), "501");
    if (mode.encoding) {
      // The page shows what compression saved, from the server's metrics.
      await page.waitForFunction(() => /^\d+%$/.test(document.querySelector("#saved").textContent));
      assert.ok(parseInt(await page.textContent("#saved"), 10) > 50, "chat compresses well");
    }
    assertStreams(page, mode);
    await page.close();
  } finally {
    await server.stop();
    redis.stop();
  }
});

for (const mode of MODES) test(`a cut connection resumes with Last-Event-ID; a restarted server resets history (${mode.label})`, async () => {
  const redis = await startRedis();
  const env = { REDIS_URL: `redis://127.0.0.1:${redis.port}`, CLIENT_RETRY_MS: "200", ...mode.env };
  let server = await startServer(env);
  const proxy = await startProxy(server.port);
  try {
    const room = randomUUID();
    const page = await openPage(proxy.url(`/#${room}`));
    const sent = [];
    for (let i = 0; i < 300; i++) {
      sent.push(chat(i));
      await redis.publish(room, [chat(i)]);
      if (i === 100 || i === 200) proxy.cut();
      await sleep(4);
    }
    await page.waitForFunction((n) => document.querySelectorAll(".msg").length >= n, 300);
    sent.push(chat(300));
    await redis.publish(room, [chat(300)]);
    await page.waitForFunction((n) => document.querySelectorAll(".msg").length >= n, 301);
    assert.deepEqual(await shown(page), sent, "every message exactly once, in order, across two cuts");
    assert.ok(proxy.connections() >= 3, "the browser reconnected by itself");

    // Restart the server on the same port: the old event ids mean nothing to it.
    await server.stop();
    server = await startServer(env, server.port);
    await page.waitForFunction(() => [...document.querySelectorAll(".notice")]
      .some((n) => n.textContent.includes("History was reset")));
    await page.waitForSelector("#state.live");
    await redis.publish(room, [chat(1000)]);
    await page.waitForFunction(() => document.querySelectorAll(".msg").length >= 302);
    assert.equal((await shown(page)).at(-1), chat(1000), "live again after the reset");
    // The cuts broke two streams on purpose; the one the restart ended closed cleanly.
    page.streams.broken = page.streams.broken.filter((e) => !e.includes("ERR_EMPTY_RESPONSE")
      && !e.includes("ERR_CONNECTION_RESET") && !e.includes("ERR_INCOMPLETE_CHUNKED_ENCODING")
      && !e.includes("ERR_CONNECTION_CLOSED"));
    assertStreams(page, mode);
    await page.close();
  } finally {
    proxy.close();
    await server.stop();
    redis.stop();
  }
});

for (const mode of MODES) test(`_END shows the session ended and the browser stops reconnecting (${mode.label})`, async () => {
  const redis = await startRedis();
  const server = await startServer({ REDIS_URL: `redis://127.0.0.1:${redis.port}`, CLIENT_RETRY_MS: "200", ...mode.env });
  try {
    const room = randomUUID();
    const page = await openPage(server.url(`/#${room}`));
    await redis.publish(room, [chat(1)]);
    await page.waitForSelector(".msg");
    const connects = await server.metric("chat_sync_sse_connects_total");
    assert.ok(connects >= 1, "the page's connect was counted");
    await redis.publish(`${room}_END`, [JSON.stringify({ id: room, deletedAt: "2026-11-24T11:00:00" })]);
    await page.waitForSelector("#state.ended");
    assert.match(await page.textContent("#chat"), /This session has ended/);
    assert.equal(await page.evaluate(() => source.readyState), 2, "the page's stream is closed for good");
    assert.equal(await server.metric("chat_sync_sse_connects_total"), connects, "no reconnect after the end");
    // A browser that lands on the ended session anyway (a stream the page did not close
    // itself, as a reconnect would) is answered 204, and EventSource gives up for good:
    // CLOSED is final, so no timer is needed to see that it never comes back.
    await page.evaluate((id) => { window.late = new EventSource(`api/v1/chats/sse-connect/${id}`); }, room);
    await page.waitForFunction(() => window.late.readyState === EventSource.CLOSED);
    assert.equal(await server.metric("chat_sync_sse_connects_total"), connects + 1, "one attempt, answered 204");
    assert.equal(await server.metric("chat_sync_connections"), 0);
    assertStreams(page, mode);
    await page.close();
  } finally {
    await server.stop();
    redis.stop();
  }
});

for (const mode of MODES) test(`the mobile mode shows at most 20 per batch and what it skipped; a joining page shows recent chat (${mode.label})`, async () => {
  const redis = await startRedis();
  const server = await startServer({ REDIS_URL: `redis://127.0.0.1:${redis.port}`, ...mode.env });
  try {
    const room = randomUUID();
    const page = await openPage(server.url(`/#${room}`));
    await page.selectOption("#mode", "interval_ms=1000&max_batch=20");
    await page.waitForSelector("#state.live");
    const sent = Array.from({ length: 200 }, (_, i) => chat(i));
    await redis.publish(room, sent);
    await page.waitForFunction((last) => [...document.querySelectorAll(".msg")]
      .some((e) => e.dataset.payload === last), sent.at(-1));
    const got = await shown(page);
    const skipped = parseInt(await page.textContent("#skipped"), 10);
    assert.ok(skipped > 0, "200 messages at once, 20 a second at most: some were skipped");
    assert.equal(got.length + skipped, 200, "every message either shown or counted as skipped");
    // What is shown is the published order with gaps, each gap marked where it is.
    let at = 0;
    for (const payload of got) at = sent.indexOf(payload, at) + 1;
    assert.equal(at, 200, "shown in order, none twice");
    assert.ok(await page.$(".notice.skip"), "the gap is marked in the chat");
    assertStreams(page, mode);

    // A page that joins now (every batch) starts with the last 50 messages.
    const joining = await openPage(server.url(`/#${room}`));
    await joining.waitForFunction(() => document.querySelectorAll(".msg").length >= 50);
    assert.deepEqual(await shown(joining), sent.slice(150));
    await Promise.all([page.close(), joining.close()]);
  } finally {
    await server.stop();
    redis.stop();
  }
});

/** A page on another origin that subscribes to `streamUrl` with EventSource. */
async function foreignOrigin(streamUrl) {
  const html = `<!doctype html><script>
    const es = new EventSource(${JSON.stringify(streamUrl)});
    es.onopen = () => { document.body.dataset.open = "1"; };
    es.onmessage = (e) => { document.body.dataset.got = e.data; };
    es.onerror = () => { document.body.dataset.error = "1"; };
  </script><body></body>`;
  const server = http.createServer((_, res) => { res.setHeader("content-type", "text/html"); res.end(html); });
  const port = await freePort();
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  return { origin: `http://localhost:${port}`, close: () => server.close() };
}

test("a page on another origin can subscribe when CORS allows it, not otherwise", async () => {
  const redis = await startRedis();
  for (const [allowed, expectData] of [["*", true], ["https://only.example", false]]) {
    const server = await startServer({ REDIS_URL: `redis://127.0.0.1:${redis.port}`, CORS_ALLOWED_ORIGINS: allowed });
    const room = randomUUID();
    const other = await foreignOrigin(server.url(`/api/v1/chats/sse-connect/${room}`));
    try {
      const page = await browser.newPage();
      await page.goto(`${other.origin}/`);
      if (expectData) {
        await waitFor("the stream is open server-side", async () => (await server.metric("chat_sync_connections")) >= 1);
        await redis.publish(room, [chat(7)]);
        await page.waitForFunction(() => document.body.dataset.got);
        assert.deepEqual(JSON.parse(await page.evaluate(() => document.body.dataset.got)), [chat(7)]);
      } else {
        // The server answers; the browser drops the response for lack of CORS headers
        // (and closes the connection, which the server notices at once).
        await waitFor("the browser connected", async () => (await server.metric("chat_sync_sse_connects_total")) >= 1);
        await redis.publish(room, [chat(7)]);
        await page.waitForFunction(() => document.body.dataset.error);
        // A CORS failure fails the EventSource for good (CLOSED): nothing can arrive after.
        await page.waitForFunction(() => es.readyState === EventSource.CLOSED);
        assert.equal(await page.evaluate(() => document.body.dataset.got), undefined, "the browser refused the stream");
      }
      await page.close();
    } finally {
      other.close();
      await server.stop();
    }
  }
  redis.stop();
});
