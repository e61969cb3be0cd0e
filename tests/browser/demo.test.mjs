// The demo page at / and /herald.js in a real browser (Debian's chromium, headless, through
// puppeteer-core), against the herald that tests/browser.rs started. Run by that test, which
// passes the ports and secrets in the environment and answers `@control stop|start` lines on
// stdin (herald stopped with SIGTERM, started again on the same port).
//
// One check per line, `ok` or `FAIL`, then a summary line; the exit code is 1 when any check failed.

import { execFile } from "node:child_process";
import { createHmac } from "node:crypto";
import net from "node:net";
import readline from "node:readline";
import puppeteer from "puppeteer-core";

const PORT = Number(process.env.HERALD_PORT);
const REDIS_PORT = Number(process.env.REDIS_PORT);
const SECRET = process.env.HERALD_TEST_SECRET;
const API_KEY = process.env.HERALD_TEST_API_KEY;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const BASE = `http://127.0.0.1:${PORT}`;
if (!PORT || !REDIS_PORT || !SECRET || !API_KEY) {
  console.error("run by tests/browser.rs: HERALD_PORT, REDIS_PORT, HERALD_TEST_SECRET, HERALD_TEST_API_KEY");
  process.exit(2);
}

// ------------------------------------------------------------------------------ plumbing

const pendingReplies = [];
readline.createInterface({ input: process.stdin }).on("line", (line) => pendingReplies.shift()?.(line));

/** Asks tests/browser.rs to `stop` or `start` herald; resolves once it is done. */
function control(command) {
  return new Promise((resolve, reject) => {
    pendingReplies.push((reply) => (reply === "ok" ? resolve() : reject(new Error(`${command}: ${reply}`))));
    process.stdout.write(`@control ${command}\n`);
  });
}

const b64url = (text) => Buffer.from(text).toString("base64url");
function jwt(claims, secret = SECRET) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const signature = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${signature}`;
}
const now = () => Math.floor(Date.now() / 1000);
const tokenFor = (sub, ttl = 3600) => jwt({ sub, iat: now(), exp: now() + ttl });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let userSeq = 0;
/** A user id no other check uses, so that checks cannot see each other's notifications. */
const freshUser = (what) => `${what}-${process.pid}-${++userSeq}`;

async function api(path, body) {
  const response = await fetch(BASE + path, {
    method: "POST",
    headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(10000),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${path} answered ${response.status}: ${text}`);
  return JSON.parse(text);
}
const publish = (user, payload) => api("/publish", { user_id: user, message: { type: "notification", payload } });

async function metrics() {
  const response = await fetch(BASE + "/metrics", { signal: AbortSignal.timeout(5000) });
  return response.json();
}

function redisCli(...args) {
  return new Promise((resolve) => {
    execFile("redis-cli", ["-p", String(REDIS_PORT), ...args], { timeout: 5000 }, (error, stdout, stderr) =>
      resolve({ error, stdout: String(stdout), stderr: String(stderr) }),
    );
  });
}

// Each check that needs history or SSE first probes for it, so a missing capability fails
// with a clear reason instead of a timeout.
async function historyProbe() {
  const { error, stdout } = await redisCli("FUNCTION", "LIST");
  if (error) return `redis-cli FUNCTION LIST failed (${error.message})`;
  return stdout.includes("herald_publish") ? null : "herald loaded no herald_publish function (no history yet)";
}

async function sseProbe() {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 5000);
  try {
    const response = await fetch(`${BASE}/sse?token=${tokenFor(freshUser("probe"))}`, {
      headers: { Accept: "text/event-stream" },
      signal: controller.signal,
    });
    const type = response.headers.get("content-type") || "";
    return response.status === 200 && type.startsWith("text/event-stream")
      ? null
      : `GET /sse answered ${response.status} ${type} (no SSE yet)`;
  } catch (error) {
    return `GET /sse failed: ${error.message}`;
  } finally {
    controller.abort();
    clearTimeout(timer);
  }
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

// ------------------------------------------------------------------------------ the page

const browser = await puppeteer.launch({
  executablePath: CHROMIUM,
  headless: true,
  // The test runs as root in CI, where chromium's sandbox cannot start.
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  protocolTimeout: 30000,
});

/**
 * Opens the demo page in a fresh browser context (its own localStorage). Counts the
 * WebSockets the page makes and collects console errors, uncaught exceptions and failed
 * responses.
 */
async function openDemo({ origin = BASE, viewport = { width: 1000, height: 800 } } = {}) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  await page.setViewport(viewport);
  const problems = { console: [], exceptions: [], responses: [] };
  page.on("console", (message) => {
    if (message.type() === "error") problems.console.push(message.text());
  });
  page.on("pageerror", (error) => problems.exceptions.push(String(error.message || error)));
  page.on("response", (response) => {
    if (response.status() >= 400) problems.responses.push(`${response.status()} ${response.url()}`);
  });
  await page.evaluateOnNewDocument(() => {
    const Native = window.WebSocket;
    window.__sockets = [];
    window.WebSocket = class extends Native {
      constructor(...args) {
        super(...args);
        window.__sockets.push(this);
      }
    };
  });
  await page.goto(origin + "/", { waitUntil: "load" });
  return { page, problems, close: () => context.close() };
}

async function setToken(page, token) {
  // As a paste does: the value changes, then one input event.
  await page.$eval(
    "#token",
    (input, value) => {
      input.value = value;
      input.dispatchEvent(new Event("input", { bubbles: true }));
    },
    token,
  );
}

async function connect(page, token, path = "/ws") {
  await setToken(page, token);
  await page.select("#path", path);
  await page.click("#connect");
}

const text = (page, id) => page.$eval(`#${id}`, (element) => element.textContent);

async function waitFor(page, what, predicate, arg, timeout = 10000) {
  try {
    await page.waitForFunction(predicate, { timeout, polling: 50 }, arg);
  } catch {
    const state = await text(page, "state").catch(() => "?");
    const log = await text(page, "log").catch(() => "?");
    throw new Error(`timed out waiting for ${what} (state: ${state}; log: ${log.slice(-1500)})`);
  }
}
const waitState = (page, state, timeout) =>
  waitFor(page, `state ${state}`, (s) => document.getElementById("state").dataset.state === s, state, timeout);
const waitLog = (page, needle, timeout) =>
  waitFor(page, `"${needle}" in the log`, (n) => document.getElementById("log").textContent.includes(n), needle, timeout);
const countInLog = (page, needle) =>
  page.$eval("#log", (log, n) => log.textContent.split(n).length - 1, needle);

async function connected(user, options = {}) {
  const demo = await openDemo(options);
  await connect(demo.page, tokenFor(user), options.path);
  await waitState(demo.page, "open");
  return demo;
}

// ------------------------------------------------------------------------------ checks

const results = { passed: 0, failed: 0 };
async function check(name, body) {
  const started = Date.now();
  try {
    const missing = await body();
    if (typeof missing === "string") {
      // Every capability a check probes for is part of herald now: its absence is a failure.
      results.failed++;
      console.log(`FAIL ${name}: ${missing}`);
    } else {
      results.passed++;
      console.log(`ok   ${name} (${Date.now() - started} ms)`);
    }
  } catch (error) {
    results.failed++;
    console.log(`FAIL ${name}: ${error && error.stack ? error.stack : error}`);
  }
}

await check("the page connects and receives a published notification", async () => {
  const user = freshUser("receive");
  const demo = await connected(user);
  const answer = await publish(user, { title: "hello from the test" });
  assert(answer.sent === true, `publish: ${JSON.stringify(answer)}`);
  await waitLog(demo.page, "hello from the test");
  assert((await text(demo.page, "received")) === "1", "the received counter should say 1");
  await demo.close();
});

await check("no console error on load (the favicon is served)", async () => {
  const user = freshUser("favicon");
  const demo = await connected(user);
  await publish(user, { title: "one" });
  await waitLog(demo.page, "one");
  // The favicon request is made after load; give it a moment to fail if it would.
  await sleep(300);
  const { console: errors, exceptions, responses } = demo.problems;
  assert(
    errors.length === 0 && exceptions.length === 0 && responses.length === 0,
    `errors: ${JSON.stringify({ errors, exceptions, responses })}`,
  );
  const icon = await fetch(BASE + "/favicon.ico");
  assert(icon.status === 200, `/favicon.ico answered ${icon.status}`);
  await demo.close();
});

for (const path of ["/ws", "/ws/notifications/"]) {
  await check(`a refused token on ${path} shows why, not just 1006, and is not retried`, async () => {
    const demo = await openDemo();
    await connect(demo.page, jwt({ sub: "mallory", exp: now() + 3600 }, "not-the-secret"), path);
    await waitState(demo.page, "stopped");
    const lastClose = await text(demo.page, "last-close");
    const state = await text(demo.page, "state");
    assert(/invalid or expired token/i.test(lastClose), `last close shows "${lastClose}"`);
    assert(/token refused/i.test(state), `state shows "${state}"`);
    const sockets = await demo.page.evaluate(() => window.__sockets.length);
    await sleep(2500); // past the first backoff step: nothing more may be tried
    const later = await demo.page.evaluate(() => window.__sockets.length);
    assert(later === sockets, `sockets went from ${sockets} to ${later}: a refused token was retried`);
    await demo.close();
  });
}

await check("an expired token is refused with its reason", async () => {
  const demo = await openDemo();
  await connect(demo.page, jwt({ sub: "late", exp: now() - 60 }), "/ws");
  await waitState(demo.page, "stopped");
  const lastClose = await text(demo.page, "last-close");
  assert(/expired/i.test(lastClose), `last close shows "${lastClose}"`);
  await demo.close();
});

await check("two quick clicks on Connect open one socket; Disconnect closes it", async () => {
  const user = freshUser("double");
  const demo = await openDemo();
  await setToken(demo.page, tokenFor(user));
  await Promise.all([demo.page.click("#connect"), demo.page.click("#connect")]);
  await demo.page.keyboard.press("Enter"); // focus is on the button: a third "click"
  await waitState(demo.page, "open");
  await publish(user, { title: "once" });
  await waitLog(demo.page, "once");
  await sleep(200);
  const sockets = await demo.page.evaluate(() => window.__sockets.length);
  assert(sockets === 1, `${sockets} sockets were opened`);
  assert((await countInLog(demo.page, '"once"')) === 1, "the notification was shown more than once");
  await demo.page.click("#disconnect");
  await waitFor(demo.page, "every socket closed", () => window.__sockets.every((s) => s.readyState === 3));
  await demo.close();
});

await check("after a restart (close 1001) the page reconnects and receives again", async () => {
  const user = freshUser("restart");
  const demo = await connected(user);
  await control("stop");
  await waitLog(demo.page, "closed 1001 server shutdown");
  await control("start");
  await waitState(demo.page, "open", 20000);
  assert(Number(await text(demo.page, "reconnects")) >= 1, "no reconnect was counted");
  await publish(user, { title: "after the restart" });
  await waitLog(demo.page, "after the restart");
  await demo.close();
});

await check("a publish while herald is down shows an error and clears the old result", async () => {
  const user = freshUser("down");
  const demo = await connected(user);
  await demo.page.click("#publish");
  await waitFor(demo.page, "a publish result", () => document.getElementById("result").textContent.startsWith("200"));
  await control("stop");
  try {
    await demo.page.click("#publish");
    await waitFor(demo.page, "the publish error", () => /unreachable/.test(document.getElementById("result").textContent));
    const result = await text(demo.page, "result");
    assert(!result.includes("sent"), `the old result is still shown: ${result}`);
    assert(demo.problems.exceptions.length === 0, `uncaught: ${demo.problems.exceptions.join("; ")}`);
  } finally {
    await control("start");
  }
  await waitState(demo.page, "open", 20000);
  await demo.close();
});

await check("the user id follows a newly pasted token, so the next publish is allowed", async () => {
  const first = freshUser("paste-a");
  const second = freshUser("paste-b");
  const demo = await openDemo();
  await setToken(demo.page, tokenFor(first));
  assert((await demo.page.$eval("#user", (u) => u.value)) === first, "the user id did not follow the first token");
  await setToken(demo.page, tokenFor(second));
  assert((await demo.page.$eval("#user", (u) => u.value)) === second, "the user id did not follow the second token");
  await demo.page.click("#publish");
  await waitFor(demo.page, "a publish result", () => /^\d{3} /.test(document.getElementById("result").textContent));
  const result = await text(demo.page, "result");
  assert(result.startsWith("200 "), `publish with the pasted token answered: ${result}`);
  await demo.close();
});

await check("no horizontal scroll at 375 px", async () => {
  const user = freshUser("narrow");
  const demo = await connected(user, { viewport: { width: 375, height: 700, isMobile: true } });
  await publish(user, { title: "w".repeat(250), url: "https://example.com/" + "x".repeat(120) });
  await waitLog(demo.page, "wwww");
  await demo.page.select("#path", "/v1/notifications/ws/notifications");
  await demo.page.click("#publish");
  await waitFor(demo.page, "a publish result", () => document.getElementById("result").textContent.startsWith("200"));
  const width = await demo.page.evaluate(() => document.documentElement.scrollWidth);
  assert(width <= 375, `the page is ${width} px wide at a 375 px viewport`);
  await demo.close();
});

await check("the log is capped, appends without re-rendering, and shows 2,000 notifications fast", async () => {
  const user = freshUser("burst");
  const demo = await connected(user);
  await publish(user, { title: "first" });
  await waitLog(demo.page, "first");
  const firstEntry = await demo.page.$("#log li:last-child");
  await publish(user, { title: "second" });
  await waitLog(demo.page, "second");
  assert(
    await firstEntry.evaluate((entry) => entry.isConnected),
    "an existing log entry was replaced when a new one arrived (the log is re-rendered)",
  );
  const started = Date.now();
  for (let batch = 0; batch < 2; batch++) {
    const items = Array.from({ length: 1000 }, (_, i) => ({
      user_id: user,
      message: { type: "notification", payload: { n: `burst-${batch * 1000 + i}.` } },
    }));
    await api("/publish/batch", { items });
  }
  await waitLog(demo.page, "burst-1999.", 30000);
  const elapsed = Date.now() - started;
  const entries = await demo.page.$eval("#log", (log) => log.childElementCount);
  assert(entries <= 200, `${entries} log entries: the log is not capped`);
  await waitFor(demo.page, "2,002 received", () => document.getElementById("received").textContent === "2002");
  console.log(`     2,000 notifications published and displayed in ${elapsed} ms`);
  await demo.close();
});

await check("Enter submits both forms", async () => {
  const user = freshUser("enter");
  const demo = await openDemo();
  await setToken(demo.page, tokenFor(user));
  await demo.page.focus("#token");
  await demo.page.keyboard.press("Enter");
  await waitState(demo.page, "open");
  await demo.page.focus("#message");
  await demo.page.keyboard.press("Enter");
  await waitFor(demo.page, "a publish result", () => document.getElementById("result").textContent.startsWith("200"));
  await waitLog(demo.page, '"hi"');
  await demo.page.$eval("#result", (r) => (r.textContent = ""));
  await demo.page.focus("#user");
  await demo.page.keyboard.press("Enter");
  await waitFor(demo.page, "a publish result", () => document.getElementById("result").textContent.startsWith("200"));
  await demo.close();
});

await check("an aria-live region announces new notifications", async () => {
  const user = freshUser("live");
  const demo = await connected(user);
  const region = await demo.page.$("[aria-live]");
  assert(region, "no aria-live region");
  const before = await region.evaluate((r) => r.textContent);
  await publish(user, { title: "announce me" });
  await waitLog(demo.page, "announce me");
  await waitFor(demo.page, "an announcement", () => /new notification/.test(document.querySelector("[aria-live]").textContent));
  const after = await region.evaluate((r) => r.textContent);
  assert(after !== before && after.includes("1 in all"), `announcement: "${after}"`);
  await demo.close();
});

await check("a payload is shown as text, never as HTML", async () => {
  const user = freshUser("xss");
  const demo = await connected(user);
  await publish(user, { title: "<img src=x onerror=window.__xss=1><b>bold</b>" });
  await waitLog(demo.page, "<img src=x onerror=window.__xss=1><b>bold</b>");
  const html = await demo.page.$eval("#log", (log) => ({ img: log.querySelectorAll("img, b").length }));
  assert(html.img === 0, "the payload became elements");
  assert(!(await demo.page.evaluate(() => window.__xss)), "the payload ran");
  await demo.close();
});

await check("herald.js: getToken() refreshes the token before exp, without an expiry close", async () => {
  const user = freshUser("refresh");
  const demo = await openDemo();
  const statuses = await demo.page.evaluate(
    async ({ short, long }) => {
      const { Herald } = await import("/herald.js");
      const seen = [];
      const tokens = [long];
      const client = new Herald("", {
        token: short,
        getToken: () => tokens.shift() || long,
        onStatus: (s) => seen.push(s.state + (s.code ? " " + s.code + " " + s.reason : "")),
      });
      await new Promise((resolve) => setTimeout(resolve, 4500)); // the short token lives 3 s
      const state = client.state;
      client.close();
      return { seen, state };
    },
    { short: jwt({ sub: user, iat: now(), exp: now() + 3 }), long: tokenFor(user) },
  );
  assert(statuses.seen.includes("refreshing"), `no refresh: ${statuses.seen.join(", ")}`);
  assert(!statuses.seen.some((s) => s.startsWith("closed")), `a close was seen: ${statuses.seen.join(", ")}`);
  assert(statuses.state === "open", `state after the refresh: ${statuses.state} (${statuses.seen.join(", ")})`);
  await demo.close();
});

await check("herald.js: ack(id) sends {action:ack, stream_id}", async () => {
  const user = freshUser("ack");
  const demo = await openDemo();
  const before = (await metrics()).messages.acked;
  const sent = await demo.page.evaluate(async (token) => {
    const { Herald } = await import("/herald.js");
    const frames = [];
    const send = WebSocket.prototype.send;
    WebSocket.prototype.send = function (data) {
      frames.push(data);
      return send.call(this, data);
    };
    const client = await new Promise((resolve) => {
      const c = new Herald("", { token, onStatus: (s) => s.state === "open" && resolve(c) });
    });
    const ok = client.ack("q7kz2m4t:42");
    return { ok, frames, client: (globalThis.__client = client) && true };
  }, tokenFor(user));
  assert(sent.ok, "ack() returned false on an open connection");
  assert(
    sent.frames.includes(JSON.stringify({ action: "ack", stream_id: "q7kz2m4t:42" })),
    `frames sent: ${sent.frames.join(" ")}`,
  );
  let after = before;
  for (let i = 0; i < 40 && after === before; i++) {
    await sleep(50);
    after = (await metrics()).messages.acked;
  }
  assert(after === before + 1, `messages.acked went from ${before} to ${after}`);
  await demo.page.evaluate(() => globalThis.__client.close());
  await demo.close();
});

// ---------------------------------------------------------------- history and SSE

await check("nothing is lost across a restart, and the position survives a page reload", async () => {
  const missing = await historyProbe();
  if (missing) return missing;
  const user = freshUser("resume");
  const demo = await connected(user);
  await publish(user, { title: "before the restart" });
  await waitLog(demo.page, "before the restart");
  await waitFor(demo.page, "a stored position", () =>
    Object.keys(localStorage).some((key) => key.startsWith("herald:since:")),
  );
  await control("stop");
  try {
    await waitLog(demo.page, "closed 1001 server shutdown");
    const message = JSON.stringify({ type: "notification", payload: { title: "while herald was down" } });
    const fcall = await redisCli("FCALL", "herald_publish", "1", `user_noti:${user}`, message);
    assert(!fcall.error && !/ERR/.test(fcall.stdout), `FCALL herald_publish: ${fcall.stdout} ${fcall.stderr}`);
  } finally {
    await control("start");
  }
  await waitLog(demo.page, "while herald was down", 20000);
  assert((await countInLog(demo.page, "before the restart")) === 1, "a notification was shown twice");

  // The page goes away; a notification arrives; the page comes back and connects again.
  await demo.page.click("#disconnect");
  await publish(user, { title: "while the page was closed" });
  await demo.page.reload({ waitUntil: "load" });
  await connect(demo.page, tokenFor(user));
  await waitLog(demo.page, "while the page was closed", 10000);
  await demo.close();
});

await check("falls back to Server-Sent Events when WebSocket upgrades are refused, and resumes on it", async () => {
  // Not gated: herald serves /sse, so a missing one is a failure, not a skip.
  const missing = await sseProbe();
  assert(!missing, missing);
  const proxy = await refusingProxy(PORT);
  try {
    const user = freshUser("sse");
    const demo = await openDemo({ origin: `http://127.0.0.1:${proxy.address().port}` });
    await connect(demo.page, tokenFor(user));
    await waitState(demo.page, "open", 15000);
    const state = await text(demo.page, "state");
    assert(state.includes("sse"), `state: ${state}`);
    await publish(user, { title: "over SSE" });
    await waitLog(demo.page, "over SSE");

    // Over SSE as over a WebSocket: the `stream_id` seen last is `since` on the next
    // attempt, so what was published while herald was down arrives once herald is back.
    const missingHistory = await historyProbe();
    if (!missingHistory) {
      await control("stop");
      try {
        await waitLog(demo.page, "event stream ended");
        const message = JSON.stringify({ type: "notification", payload: { title: "sse: missed while down" } });
        const fcall = await redisCli("FCALL", "herald_publish", "1", `user_noti:${user}`, message);
        assert(!fcall.error && !/ERR/.test(fcall.stdout), `FCALL herald_publish: ${fcall.stdout} ${fcall.stderr}`);
      } finally {
        await control("start");
      }
      await waitLog(demo.page, "sse: missed while down", 20000);
      await waitLog(demo.page, "resumed: 1 replayed");
      const after = await text(demo.page, "state");
      assert(after.includes("sse"), `state after the restart: ${after}`);
      assert((await countInLog(demo.page, "over SSE")) === 1, "a notification was shown twice");
      await publish(user, { title: "live again" });
      await waitLog(demo.page, "live again");
    }
    await demo.close();
  } finally {
    proxy.close();
  }
});

/** A TCP proxy to herald that answers every WebSocket upgrade 403 and passes the rest. */
function refusingProxy(target) {
  const server = net.createServer((client) => {
    let head = Buffer.alloc(0);
    const onData = (chunk) => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf("\r\n\r\n");
      if (end < 0) {
        if (head.length > 16384) client.destroy();
        return;
      }
      client.off("data", onData);
      if (/^upgrade:\s*websocket/im.test(head.subarray(0, end).toString("latin1"))) {
        client.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      const upstream = net.connect(target, "127.0.0.1", () => {
        upstream.write(head);
        client.pipe(upstream);
        upstream.pipe(client);
      });
      upstream.on("error", () => client.destroy());
      client.on("error", () => upstream.destroy());
    };
    client.on("data", onData);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

await browser.close();
console.log(`browser: ${results.passed} passed, ${results.failed} failed`);
process.exit(results.failed ? 1 : 0);
