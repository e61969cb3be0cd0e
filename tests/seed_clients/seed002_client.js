// Seed 002 (seeds/002-notifications-api-reference.md), run against herald. The seed's
// connection example (TypeScript that is also plain JavaScript) and its handler example are
// copied as written, host changed (localhost:8000 -> herald). The seed describes but does
// not show `wsService`; the harness supplies a minimal one that sends exactly the seed's
// subscribe/unsubscribe messages (lines marked "harness:").
const { host, onCommand } = require("./harness.js");

// ---- seed 002: "Authentication" example --------------------------------------------
const token = localStorage.getItem('access_token')
const url = `ws://${host}/ws/notifications/?token=${encodeURIComponent(token)}`
const ws = new WebSocket(url)

// harness: the seed's wsService (subscribe/unsubscribe send the seed's request bodies).
const handlers = {};
const wsService = {
  subscribe: (projectId) => ws.send(JSON.stringify({ type: "subscribe_project", project_id: projectId })),
  unsubscribe: (projectId) => ws.send(JSON.stringify({ type: "unsubscribe_project", project_id: projectId })),
  on: (type, fn) => { (handlers[type] = handlers[type] || []).push(fn); },
  off: (type, fn) => { handlers[type] = (handlers[type] || []).filter((f) => f !== fn); },
  isConnected: () => ws.readyState === WebSocket.OPEN,
};
ws.onmessage = (event) => {
  if (event.data === "pong") {
    console.log("harness: pong");
    return;
  }
  const data = JSON.parse(event.data);
  console.log(`harness: received ${event.data}`);
  (handlers[data.type] || []).forEach((fn) => fn(data));
};
ws.onopen = () => {
  console.log("harness: open");
  // ---- seed 002: "Subscribe to Project" example -----------------------------------
  wsService.subscribe(123) // Sends above message
  ws.send("ping"); // harness: the pong proves the subscription was processed
};
ws.onerror = () => console.log("harness: error event");
ws.onclose = (event) => console.log(`harness: closed ${event.code}`);
onCommand("unsubscribe", () => {
  // ---- seed 002: "Unsubscribe from Project" example -------------------------------
  wsService.unsubscribe(123) // Sends above message
  ws.send("ping"); // harness
});

// ---- seed 002: "Notification Received" frontend handler ---------------------------
wsService.on('notification_received', (data) => {
  // Data structure as above
  console.log(`${data.title}: ${data.message}`)
})
