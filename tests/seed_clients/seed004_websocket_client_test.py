"""Seed 004's test client, run against herald.

seeds/004-realtime-api.md ("Testing") documents a Python client,
    python websocket_client_test.py <your_jwt_token> [workspace_id]
but does not include its source; none of seeds 000/001/002/004 contains Python client code.
This script implements that documented interface with the libraries the seeds' Python
examples use (`websocket-client`, imported as `websocket`, and `requests`): it connects to
ws://<host>/ws/notifications (and ws://<host>/ws/tasks/<workspace_id> when given), sends a
task event through POST /api/v1/realtime/events/task with the token, as the seed's
frontend example does, and prints what arrives. Host/port come from HERALD_HOST.

Exit status 0 when the notification (and the workspace task update) arrived in the seed-004
shape, 1 otherwise.
"""
import json
import os
import sys

import requests
import websocket

host = os.environ.get("HERALD_HOST", "localhost:5000")


def expect_notification(ws, label, title, action):
    data = json.loads(ws.recv())
    print(f"{label} received: {json.dumps(data, sort_keys=True)}", flush=True)
    ok = (
        data.get("type") == "notification"
        and isinstance(data.get("notification_id"), int)
        and data.get("title") == title
        and data.get("content") == f"Task '{title}' was {action}"
        and data.get("notification_type") == "task"
        and data.get("data", {}).get("action") == action
    )
    if not ok:
        print(f"{label}: unexpected message", flush=True)
    return ok


def main():
    if len(sys.argv) < 2:
        print("usage: websocket_client_test.py <your_jwt_token> [workspace_id]")
        return 2
    token = sys.argv[1]
    workspace_id = int(sys.argv[2]) if len(sys.argv) > 2 else None

    notifications = websocket.create_connection(f"ws://{host}/ws/notifications?token={token}", timeout=5)
    print("connected to /ws/notifications", flush=True)
    tasks = None
    if workspace_id is not None:
        tasks = websocket.create_connection(f"ws://{host}/ws/tasks/{workspace_id}?token={token}", timeout=5)
        print(f"connected to /ws/tasks/{workspace_id}", flush=True)

    # Heartbeat in the seed-001/004 style: {"action": "ping"} -> {"action": "pong"}.
    notifications.send(json.dumps({"action": "ping"}))
    pong = json.loads(notifications.recv())
    print(f"heartbeat answer: {json.dumps(pong)}", flush=True)
    if pong != {"action": "pong"}:
        return 1

    body = {"task_id": 456, "title": "Python Task", "action": "completed"}
    if workspace_id is not None:
        body["workspace_id"] = workspace_id
    response = requests.post(
        f"http://{host}/api/v1/realtime/events/task",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        json=body,
        timeout=5,
    )
    print(f"event response: {response.status_code} {json.dumps(response.json(), sort_keys=True)}", flush=True)
    if response.status_code != 200:
        return 1

    ok = expect_notification(notifications, "notification", "Python Task", "completed")
    if tasks is not None:
        ok = expect_notification(tasks, "workspace task", "Python Task", "completed") and ok
        tasks.close()
    notifications.close()
    print("done" if ok else "failed", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
