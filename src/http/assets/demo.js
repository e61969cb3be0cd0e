// The demo page's script (inlined into / and allowed by its hash in the page's CSP).
// Everything from the network is shown with textContent, never parsed as HTML.
import { Herald, tokenUser } from "/herald.js";

const LOG_CAP = 200;
const $ = (id) => document.getElementById(id);
const logList = $("log");

let client = null; // the page's one connection
let clientFor = ""; // the token and path it was made with
let attempts = 0;
let reconnects = 0;
let received = 0;

// ------------------------------------------------------------------- log

// Entries wait here and are added in one batch per frame: a burst of notifications is one
// layout, and never more than LOG_CAP new nodes.
let pending = [];
let unannounced = 0;
let flushScheduled = false;

function log(kind, text) {
  pending.push({ kind, text: new Date().toISOString().slice(11, 23) + "  " + text });
  if (pending.length > LOG_CAP) pending = pending.slice(-LOG_CAP);
  if (!flushScheduled) {
    flushScheduled = true;
    requestAnimationFrame(flush);
    setTimeout(flush, 250); // a hidden tab gets no animation frames
  }
}

function flush() {
  if (!flushScheduled) return;
  flushScheduled = false;
  const following = logList.scrollHeight - logList.scrollTop - logList.clientHeight < 40;
  const batch = document.createDocumentFragment();
  for (const { kind, text } of pending) {
    const item = document.createElement("li");
    item.className = kind;
    item.textContent = text;
    batch.append(item);
  }
  pending = [];
  logList.append(batch);
  for (let excess = logList.childElementCount - LOG_CAP; excess > 0; excess--) logList.firstElementChild.remove();
  if (following) logList.scrollTop = logList.scrollHeight;
  $("received").textContent = String(received);
  if (unannounced) {
    $("announce").textContent =
      (unannounced === 1 ? "1 new notification" : unannounced + " new notifications") + ", " + received + " in all";
    unannounced = 0;
  }
}

// ------------------------------------------------------------------- connection

function setState(text, state) {
  $("state").textContent = text;
  $("state").dataset.state = state;
}

function describe(status) {
  const parts = [];
  if (status.status) parts.push("HTTP " + status.status);
  if (status.code) parts.push("close " + status.code);
  return (parts.length ? "(" + parts.join(", ") + ") " : "") + (status.reason || "");
}

function onStatus(status) {
  switch (status.state) {
    case "connecting":
      if (attempts++ > 0) reconnects++;
      $("reconnects").textContent = String(reconnects);
      setState("connecting (" + status.transport + ")", "connecting");
      break;
    case "open":
      setState("open (" + status.transport + ")", "open");
      log("status", "open (" + status.transport + ")");
      break;
    case "resumed":
      log("status", "resumed: " + status.replayed + " replayed" + (status.complete ? "" : ", some were no longer kept"));
      break;
    case "closed":
      $("last-close").textContent = status.code + (status.reason ? " " + status.reason : "");
      log("status", "closed " + status.code + (status.reason ? " " + status.reason : ""));
      break;
    case "refused":
      $("last-close").textContent = "refused " + describe(status);
      log("error", "refused " + describe(status));
      break;
    case "fallback":
      log("status", "falling back to Server-Sent Events: " + status.reason);
      break;
    case "reconnecting":
      setState("reconnecting in " + (status.delay / 1000).toFixed(1) + " s", "reconnecting");
      log("status", "reconnecting in " + (status.delay / 1000).toFixed(1) + " s");
      break;
    case "stopped":
      setState("stopped: " + status.reason, "stopped");
      log(status.reason === "closed by the client" ? "status" : "error", "stopped: " + status.reason);
      $("disconnect").disabled = true;
      break;
  }
}

function onMessage(message) {
  received++;
  unannounced++;
  log("in", "<- " + (typeof message === "string" ? message : JSON.stringify(message)));
}

// Connect is idempotent: while a connection made with the same token and path is alive, a
// second click (or Enter) does nothing; a different token or path replaces it.
$("connect-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  const path = $("path").value;
  const wanted = path + " " + token;
  if (client && client.state !== "stopped" && clientFor === wanted) return;
  if (client) client.close();
  attempts = 0;
  clientFor = wanted;
  client = new Herald(location.origin + path, { token, onMessage, onStatus });
  $("disconnect").disabled = false;
});

$("disconnect").addEventListener("click", () => {
  if (client) client.close();
  client = null;
  setState("not connected", "idle");
});

// The publish form's user follows the token pasted above.
$("token").addEventListener("input", () => {
  $("user").value = tokenUser($("token").value.trim());
});

// ------------------------------------------------------------------- publish

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("publish-form").requestSubmit();
  }
});

$("publish-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = $("result");
  const show = (text, kind) => {
    result.textContent = text;
    result.className = kind;
  };
  show("publishing…", "");
  let message;
  try {
    message = JSON.parse($("message").value);
  } catch {
    show("the message is not JSON", "error");
    return;
  }
  try {
    const response = await fetch("/publish", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: "Bearer " + $("token").value.trim() },
      body: JSON.stringify({ user_id: $("user").value.trim(), message }),
      signal: AbortSignal.timeout(10000),
    });
    show(response.status + " " + (await response.text()), response.ok ? "ok" : "error");
  } catch (error) {
    show("publish failed: herald is unreachable (" + error.message + ")", "error");
  }
});
