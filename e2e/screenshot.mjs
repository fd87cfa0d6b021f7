// Renders docs/demo.png: the demo page with a live chat. Run: node e2e/screenshot.mjs
// (after `cargo build`; needs redis-server and chromium, as the tests do).

import path from "node:path";
import { fileURLToPath } from "node:url";
import { randomUUID } from "node:crypto";
import { startRedis, startServer, launchBrowser, sleep } from "./harness.mjs";

const out = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../docs/demo.png");
const lines = [
  ["Mina", "the drop at 2:14 was unreal"], ["Jae", "replay that part pls"], ["Leo", "hello from Lisbon"],
  ["Sora", "audio is perfect now"], ["Mina", "LET'S GO"], ["Ana", "first time here, this is smooth"],
  ["Kai", "chat is flying and nothing lags"], ["Jae", "that solo though"], ["Leo", "who else is watching on mobile?"],
  ["Sora", "me, on the train"], ["Ana", "can we get the setlist?"], ["Kai", "+1 setlist"],
];

const redis = await startRedis();
const server = await startServer({ REDIS_URL: `redis://127.0.0.1:${redis.port}`, INSTANCE_ID: "chat-sync-1" });
const browser = await launchBrowser();
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 640 } });
  const room = randomUUID();
  await page.goto(server.url(`/#${room}`));
  await page.waitForSelector("#state.live");
  await page.fill("#nickname", "Ann");
  for (let round = 0; round < 3; round++) {
    const batch = lines.map(([nickname, message], i) => JSON.stringify({
      id: nickname, nickname, message, createdAt: `2026-11-24T20:1${round}:${String(10 + i * 4).padStart(2, "0")}.000`,
    }));
    await redis.publish(room, batch.slice(round * 4, round * 4 + 4));
    await sleep(400);
  }
  await page.fill("#message", "Great show everyone!");
  await sleep(300);
  await page.screenshot({ path: out });
  console.log(`wrote ${out}`);
} finally {
  await browser.close();
  await server.stop();
  redis.stop();
}
