//! `GET /`: a self-contained demo page (no external assets): paste a token, connect, watch
//! notifications arrive, publish one.

pub const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>herald demo</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; margin: 1rem 0; }
  input, select, textarea, button { font: inherit; }
  input[type=text], textarea { width: 100%; box-sizing: border-box; }
  textarea { height: 5rem; font-family: ui-monospace, monospace; }
  #log { background: #111; color: #cfc; font-family: ui-monospace, monospace; font-size: 13px;
         padding: .75rem; border-radius: 6px; height: 18rem; overflow: auto; white-space: pre-wrap; }
  .status { font-weight: 600; }
</style>
</head>
<body>
<h1>herald</h1>
<p>Paste a token (dev mode prints one at start-up; otherwise <code>herald token --sub USER</code>),
connect, then publish a notification to yourself.</p>
<fieldset>
  <legend>Connect</legend>
  <label>Token <input type="text" id="token" placeholder="eyJ..." autocomplete="off"></label>
  <p><label>Path
    <select id="path">
      <option value="/ws">/ws (seed 003)</option>
      <option value="/ws/notifications">/ws/notifications (seeds 001, 004)</option>
      <option value="/ws/notifications/">/ws/notifications/ (seed 002)</option>
      <option value="/v1/notifications/ws/notifications">/v1/notifications/ws/notifications (seed 000)</option>
    </select></label>
  <button id="connect">Connect</button> <button id="disconnect" disabled>Disconnect</button>
  <span class="status" id="status">disconnected</span></p>
</fieldset>
<fieldset>
  <legend>Publish</legend>
  <label>User id <input type="text" id="user" placeholder="the token's user"></label>
  <label>Message <textarea id="message">{"type":"notification","payload":{"title":"hi"}}</textarea></label>
  <button id="publish">Publish</button> <span id="result"></span>
</fieldset>
<div id="log"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let socket = null;
function log(line) {
  const el = $("log");
  el.textContent += new Date().toISOString().slice(11, 23) + "  " + line + "\n";
  el.scrollTop = el.scrollHeight;
}
function userOf(token) {
  try {
    const claims = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return String(claims.sub ?? claims.user_id ?? "");
  } catch (e) { return ""; }
}
$("token").addEventListener("input", () => { if (!$("user").value) $("user").value = userOf($("token").value.trim()); });
$("connect").onclick = () => {
  const token = $("token").value.trim();
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  socket = new WebSocket(scheme + location.host + $("path").value + "?token=" + encodeURIComponent(token));
  $("status").textContent = "connecting";
  socket.onopen = () => { $("status").textContent = "connected"; $("connect").disabled = true; $("disconnect").disabled = false; log("open"); };
  socket.onmessage = (event) => log("<- " + event.data);
  socket.onclose = (event) => {
    $("status").textContent = "disconnected"; $("connect").disabled = false; $("disconnect").disabled = true;
    log("closed " + event.code + (event.reason ? " " + event.reason : ""));
  };
};
$("disconnect").onclick = () => socket && socket.close(1000);
$("publish").onclick = async () => {
  let message;
  try { message = JSON.parse($("message").value); } catch (e) { $("result").textContent = "message is not JSON"; return; }
  const response = await fetch("/publish", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Authorization": "Bearer " + $("token").value.trim() },
    body: JSON.stringify({ user_id: $("user").value.trim(), message }),
  });
  $("result").textContent = response.status + " " + await response.text();
};
</script>
</body>
</html>
"#;
