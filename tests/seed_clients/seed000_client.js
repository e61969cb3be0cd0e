// Seed 000 (seeds/000-notifications-api.md, "Client Implementation"), run against herald.
// The seed's snippets are copied as written; only the URL (wss://api.example.com -> ws://
// herald) and the token (from HERALD_TOKEN) are changed. Lines marked "harness:" are not
// seed text: stubs for the app functions the seed calls, and hooks the test drives.
const { host, onCommand } = require("./harness.js");

// harness: the application functions the seed's handler calls.
function updateTaskStatus(data) { console.log(`harness: updateTaskStatus ${JSON.stringify(data)}`); }
function updateDeviceStatus(data) { console.log(`harness: updateDeviceStatus ${JSON.stringify(data)}`); }
function showApprovalRequest(data) { console.log(`harness: showApprovalRequest ${JSON.stringify(data)}`); }

// ---- seed 000: "Basic Connection" --------------------------------------------------
const token = process.env.HERALD_TOKEN;
const ws = new WebSocket(
  `ws://${host}/v1/notifications/ws/notifications?token=${token}`
);

ws.onopen = function (event) {
  console.log("Connected to notifications");
};

ws.onmessage = function (event) {
  const message = JSON.parse(event.data);
  handleNotification(message);
};

ws.onclose = function (event) {
  console.log("Disconnected:", event.code, event.reason);
  // Implement reconnection logic
};

// ---- seed 000: "Message Handling" --------------------------------------------------
function handleNotification(message) {
  switch (message.type) {
    case "connected":
      console.log("Connection confirmed");
      break;
    case "task_update":
      updateTaskStatus(message.data);
      break;
    case "device_status":
      updateDeviceStatus(message.data);
      break;
    case "approval_needed":
      showApprovalRequest(message.data);
      break;
    case "heartbeat":
      // Connection is alive
      break;
  }
}

// harness: the seed's "Heartbeat Implementation" replaces ws.onmessage, so the test turns
// it on only after the notification handler above has been exercised.
onCommand("heartbeat", function installHeartbeat() {
  // ---- seed 000: "Heartbeat Implementation" ----------------------------------------
  // Send ping every 25 seconds
  setInterval(() => {
    if (ws.readyState === WebSocket.OPEN) {
      ws.send("ping");
    }
  }, 25000);

  ws.onmessage = function (event) {
    if (event.data === "pong") {
      console.log("Heartbeat received");
      return;
    }
    // Handle other messages...
  };
});

// ---- seed 000: "Reconnection Logic" -----------------------------------------------
function connectWithRetry() {
  const ws = new WebSocket(
    `ws://${host}/v1/notifications/ws/notifications?token=${token}`
  );

  ws.onclose = function (event) {
    if (event.code !== 1000) {
      // Not normal closure
      setTimeout(connectWithRetry, 5000); // Retry after 5 seconds
    }
  };

  return ws;
}

// harness: open a second, self-reconnecting connection.
onCommand("reconnecting", () => {
  const retrying = connectWithRetry();
  retrying.addEventListener("open", () => console.log("harness: retrying socket open"));
  retrying.addEventListener("close", (e) => console.log(`harness: retrying socket closed ${e.code}`));
});
