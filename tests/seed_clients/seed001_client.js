// Seed 001 (seeds/001-notifications-websocket.md), run against herald. The seed gives the
// URL `ws://host:port/ws/notifications?token=JWT_TOKEN` and snippets for reconnection,
// heartbeat, error handling and notification display; those are copied as written. The
// seed calls but does not show `connectNotifications` and the UI helpers: the harness
// supplies them (lines marked "harness:").
const { host, accessToken, onCommand } = require("./harness.js");

let ws; // harness: the seed's snippets use a global `ws`

// harness: the connect function the seed's reconnection snippet calls.
function connectNotifications() {
  ws = new WebSocket(`ws://${host}/ws/notifications?token=${accessToken}`);
  ws.onopen = () => console.log("harness: open");
  ws.onmessage = (event) => {
    const data = JSON.parse(event.data);
    if (data.action === "pong") {
      console.log("harness: pong received");
    } else if (data.channel === "notifications") {
      showNotification(data.title, data.message, data.type);
    } else {
      console.log(`harness: other message ${event.data}`);
    }
  };

  // ---- seed 001: "3. Error handling" ----------------------------------------------
  ws.onerror = (error) => {
      console.error('WebSocket error:', error);
      // Don't close immediately, wait for onclose
  };

  ws.onclose = (event) => {
      if (event.code === 1008) {
          console.error('❌ Authentication failed, get new token');
          // Refresh token and reconnect
      } else {
          console.log('🔌 Connection closed, reconnecting...');
          reconnectNotifications();
      }
  };
}

// ---- seed 001: "1. Automatic reconnection" ----------------------------------------
let reconnectInterval = 1000; // Start with 1 second
const maxReconnectInterval = 30000; // Maximum 30 seconds

function reconnectNotifications() {
    setTimeout(() => {
        console.log('🔄 Attempting to reconnect...');
        connectNotifications();
        reconnectInterval = Math.min(reconnectInterval * 2, maxReconnectInterval);
    }, reconnectInterval);
}

// harness: UI helpers the seed's showNotification calls.
function getIconForType(type) { return `icon-${type}`; }
function displayInAppNotification(n) { console.log(`harness: displayInAppNotification ${JSON.stringify(n)}`); }
function saveNotificationToHistory(n) { console.log(`harness: saveNotificationToHistory ${n.title}`); }

// ---- seed 001: "4. Notification management in UI" ---------------------------------
function showNotification(title, message, type) {
    // Use browser notification API
    if ('Notification' in window && Notification.permission === 'granted') {
        new Notification(title, {
            body: message,
            icon: getIconForType(type),
            tag: 'hermes-notification'
        });
    }
    
    // Display in UI (toast, banner, etc.)
    displayInAppNotification({ title, message, type });
    
    // Save to local history
    saveNotificationToHistory({ title, message, type, timestamp: Date.now() });
}

connectNotifications();

// ---- seed 001: "2. Periodic heartbeat" --------------------------------------------
setInterval(() => {
    if (ws.readyState === WebSocket.OPEN) {
        ws.send(JSON.stringify({ action: 'ping' }));
    }
}, 30000);

// harness: seed 001's "Acknowledge notification receipt" message.
onCommand("ack", () => {
  ws.send(JSON.stringify({ action: "ack", notification_id: "optional_notification_id" }));
});
