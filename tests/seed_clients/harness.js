// Test harness shared by the seed client scripts (this file is NOT seed text).
//
// It gives the seeds' browser-style snippets what a browser page served by herald would
// have, so the snippets themselves run unchanged except for host/port/token:
//   * HERALD_HOST (host:port) and HERALD_TOKEN from the environment;
//   * `window` and `localStorage` (the token stored as `access_token`);
//   * `fetch` resolving relative URLs against the page's origin (herald's address);
//   * SEED_TIME_SCALE: the seeds' setTimeout/setInterval delays are multiplied by it,
//     so a "every 30 seconds" heartbeat runs in test time (0.01 => 300 ms);
//   * commands from the test on stdin, one per line: onCommand(name, fn).
// Node 20 provides the global WebSocket with `node --experimental-websocket`.
"use strict";

const host = process.env.HERALD_HOST;
const accessToken = process.env.HERALD_TOKEN;
if (!host || accessToken === undefined) {
  console.error("harness: HERALD_HOST and HERALD_TOKEN must be set");
  process.exit(2);
}

const scale = Number(process.env.SEED_TIME_SCALE || "1");
const realSetTimeout = globalThis.setTimeout;
const realSetInterval = globalThis.setInterval;
globalThis.setTimeout = (fn, ms, ...args) => realSetTimeout(fn, (ms || 0) * scale, ...args);
globalThis.setInterval = (fn, ms, ...args) => realSetInterval(fn, (ms || 0) * scale, ...args);

globalThis.window = globalThis;
const storage = { access_token: accessToken };
globalThis.localStorage = {
  getItem: (k) => (k in storage ? storage[k] : null),
  setItem: (k, v) => { storage[k] = String(v); },
  removeItem: (k) => { delete storage[k]; },
};

const origin = `http://${host}/`;
const realFetch = globalThis.fetch;
globalThis.fetch = (input, init) => realFetch(new URL(String(input), origin), init);

const commands = {};
function onCommand(name, fn) {
  commands[name] = fn;
}
let buffered = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  buffered += chunk;
  let nl;
  while ((nl = buffered.indexOf("\n")) >= 0) {
    const line = buffered.slice(0, nl).trim();
    buffered = buffered.slice(nl + 1);
    if (!line) continue;
    if (line === "exit") process.exit(0);
    const fn = commands[line];
    if (!fn) {
      console.log(`harness: unknown command ${line}`);
      continue;
    }
    try {
      fn();
    } catch (e) {
      console.log(`harness: command ${line} threw ${e && e.stack}`);
    }
  }
});
// The test kills us; never linger if it vanished.
process.stdin.on("end", () => process.exit(0));
realSetTimeout(() => {
  console.log("harness: giving up after 60 s");
  process.exit(1);
}, 60000).unref();

process.on("uncaughtException", (e) => {
  console.log(`harness: uncaught ${e && e.stack}`);
  process.exit(1);
});

module.exports = { host, accessToken, onCommand };
