// Seed 004 (seeds/004-realtime-api.md, "Implementation Examples / Frontend (JavaScript)"),
// run against herald. Copied as written; only the host (localhost:5000 -> herald) and the
// token (from HERALD_TOKEN) are changed. The relative fetch('/api/...') resolves against
// herald's address, as it would in a page served by herald (see harness.js).
const { host, onCommand } = require("./harness.js");

// harness: the UI function the seed calls.
function showNotification(title, content, type) {
  console.log(`harness: showNotification ${title} | ${content} | ${type}`);
}

// ---- seed 004 ----------------------------------------------------------------------
// Connect to notifications WebSocket
const token = process.env.HERALD_TOKEN;
const notificationSocket = new WebSocket(`ws://${host}/ws/notifications?token=${token}`);

notificationSocket.onopen = () => {
  console.log('Connected to notification websocket');
};

notificationSocket.onmessage = (event) => {
  const data = JSON.parse(event.data);
  console.log('Notification received:', data);
  
  // Handle notification (e.g., display in UI)
  showNotification(data.title, data.content, data.notification_type);
};

notificationSocket.onclose = () => {
  console.log('Disconnected from notification websocket');
};

// Send a task event
async function sendTaskEvent(taskId, title, action) {
  const response = await fetch('/api/v1/realtime/events/task', {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json',
      'Authorization': `Bearer ${token}`
    },
    body: JSON.stringify({
      task_id: taskId,
      title: title,
      action: action
    })
  });
  
  const result = await response.json();
  console.log('Event sent:', result);
}
// ---- end of seed 004 ---------------------------------------------------------------

onCommand("send", () => {
  sendTaskEvent(456, "Task Title", "updated").catch((e) => console.log(`harness: sendTaskEvent failed ${e}`));
});
