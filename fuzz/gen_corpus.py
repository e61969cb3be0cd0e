#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (checked in; rerun after changing this).

Tokens are HS256 with the fuzz secret (fuzz/src/lib.rs SECRET) and expire in 2100, so the
upgrade and jwt seeds reach the code behind a valid signature.
"""
import base64, hashlib, hmac, json, os, struct

SECRET = b"herald-fuzz-secret"
EXP = 4102444800  # 2100-01-01
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(claims, alg="HS256", secret=SECRET):
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    signing = f"{head}.{body}".encode()
    if alg == "none":
        return f"{head}.{body}."
    sig = hmac.new(secret, signing, hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


USER = token({"sub": "user123", "exp": EXP})
NUMERIC = token({"sub": 42, "exp": EXP, "scope": "publish"})
TOPICS = token({"user_id": "alice", "exp": EXP, "topics": ["project:*", "focus-session:s1", "workspace:12"]})
EXPIRED = token({"sub": "user123", "exp": 1000000000})
NONE = token({"sub": "user123", "exp": EXP}, alg="none")
WRONG = token({"sub": "user123", "exp": EXP}, secret=b"other")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def upgrade(path, extra="", key="dGhlIHNhbXBsZSBub25jZQ==", method="GET"):
    return (f"{method} {path} HTTP/1.1\r\nHost: herald.example:8081\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n")


# --- http_request and upgrade: real requests ---------------------------------------------
requests = {
    "upgrade_query_token": upgrade(f"/ws?token={USER}"),
    "upgrade_bearer_origin": upgrade("/ws", f"Authorization: Bearer {USER}\r\nOrigin: https://app.example\r\n"),
    "upgrade_bad_origin": upgrade(f"/ws?token={USER}", "Origin: https://evil.example\r\n"),
    "upgrade_seed000": upgrade(f"/v1/notifications/ws/notifications?token={USER}"),
    "upgrade_seed001_expired": upgrade(f"/ws/notifications?token={EXPIRED}"),
    "upgrade_seed002_none_alg": upgrade(f"/ws/notifications/?token={NONE}"),
    "upgrade_project_topic": upgrade(f"/ws/project/7?token={TOPICS}"),
    "upgrade_focus_session": upgrade(f"/ws/focus-session/s1?token={TOPICS}", "Origin: http://localhost:3000/\r\n"),
    "upgrade_tasks_pct": upgrade(f"/ws/tasks/1%322?token={TOPICS}&x=1"),
    "upgrade_wrong_secret": upgrade(f"/ws?token={WRONG}"),
    "upgrade_no_token": upgrade("/ws"),
    "upgrade_bad_key": upgrade(f"/ws?token={USER}", key="short"),
    "plain_get_ws": "GET /ws HTTP/1.1\r\nHost: h\r\n\r\n",
    "health": "GET /health HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n",
    "metrics_prom": "GET /metrics HTTP/1.1\r\nAccept: text/plain;q=1, application/json;q=0.5\r\n\r\n",
    "head_root": "HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "publish": ('POST /publish HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer fuzz-api-key\r\nContent-Type: application/json\r\n'
                'Content-Length: 76\r\n\r\n{"user_id":"user123","message":{"type":"notification","payload":{"t":"hi"}}}'),
    "notify_user_token": ('POST /notify HTTP/1.1\r\nAuthorization: Bearer ' + NUMERIC + '\r\nContent-Length: 63\r\n\r\n'
                          '{"user_id":"42","title":"t","message":"m","type":"info","x":1}'),
    "disconnect": 'POST /api/disconnect HTTP/1.1\r\nAuthorization: Bearer fuzz-api-key\r\nContent-Length: 20\r\n\r\n{"user_id":"user12"}',
    "event_task": ('POST /api/v1/realtime/events/task HTTP/1.1\r\nAuthorization: Bearer fuzz-api-key\r\nContent-Length: 57\r\n\r\n'
                   '{"task_id":1,"workspace_id":2,"action":"created","x":[]}'),
    "chunked": "POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "pipelined": "GET /health HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
}
for name, req in requests.items():
    write("upgrade", name, req)
for name in ["upgrade_query_token", "upgrade_bearer_origin", "upgrade_tasks_pct", "health", "metrics_prom",
             "head_root", "publish", "chunked", "pipelined", "plain_get_ws"]:
    write("http_request", name, requests[name])
write("http_request", "dup_content_length", "POST /p HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na")
write("http_request", "lf_only", "GET /ws?token=a%2Eb+c HTTP/1.1\nHost: h\nConnection: keep-alive, Upgrade\n\n")
write("http_request", "partial_body", "POST /publish HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")


# --- ws_frames: 4 config bytes then masked client frames -----------------------------------
def frame(b0, payload, mask=b"\x37\xfa\x21\x3d"):
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload)
    if n <= 125:
        head = bytes([b0, 0x80 | n])
    elif n <= 0xFFFF:
        head = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


CFG = bytes([124, 3, 0x5a, 0x11])  # max message 512, bound 4
ws = {
    "text_ping": frame(0x81, "ping"),
    "action_ping_ack": frame(0x81, '{"action":"ping"}') + frame(0x81, '{"action":"ack","notification_id":3}'),
    "subscribe": frame(0x81, '{"type":"subscribe","topic":"project:7"}') + frame(0x81, '{"type":"unsubscribe","topic":"project:7"}'),
    "fragmented": frame(0x01, '{"type":"pi') + frame(0x89, "x") + frame(0x80, 'ng"}'),
    "ping_pong_close": frame(0x89, "hello") + frame(0x8A, "") + frame(0x88, struct.pack(">H", 1000) + b"bye"),
    "subscribe_project": frame(0x81, '{"type":"subscribe_project","project_id":7}'),
    "too_big": frame(0x81, "a" * 600),
    "ext_len_126": frame(0x81, '{"type":"x","p":"' + "b" * 200 + '"}'),
    "binary": frame(0x82, b"\x00\x01"),
    "unmasked": bytes([0x81, 0x02]) + b"hi",
    "bad_utf8": frame(0x81, b"\xff\xfe"),
    "many_small": b"".join(frame(0x81, '{"type":"ping"}') for _ in range(20)),
}
for name, data in ws.items():
    write("ws_frames", name, CFG + data)
write("ws_frames", "small_limit_bound1", bytes([0, 0, 1, 1]) + frame(0x81, "ping") * 5)

# --- client_json ----------------------------------------------------------------------------
client = [
    "ping", " ping\n", '{"action":"ping"}', '{"type":"ping"}', '{"action":"ack","notification_id":"n1"}',
    '{"type":"subscribe","topic":"project:1"}', '{"type":"unsubscribe","topic":"workspace:2"}',
    '{"type":"subscribe_project","project_id":7}', '{"type":"unsubscribe_project","project_id":"12"}',
    '{"cursor":{"x":1,"y":2.5},"type":"cursor_move"}', '["ping"]', '{broken', 'hello',
    '{"type":"subscribe","topic":7}', '{"type":"subscribe_project","project_id":1.5}',
    '{"type":"ping","type":"subscribe"}', '{"a":"\\u00e9\\ud83d\\ude00"}',
]
for i, c in enumerate(client):
    write("client_json", f"msg{i:02}", c)

# --- notification: 2 bytes max, clock, exclusion shape, message ----------------------------
notes = [
    '{"type":"notification","payload":{"title":"hi"}}',
    '{"type":"task_update","data":{"task_id":1,"status":"done"}}  \n',
    '{ "type" : "x", "timestamp": "2020-01-01T00:00:00.000Z" }',
    '{"type":"x","payload":{"timestamp":1}}',
    '{"type":"notification_received","project_id":2,"message":"\\u00e9\\n","n":-1.5e3,"ok":true,"z":null}',
    '{"type":7}', '["type"]', 'not json', '{"payload":{}}',
    '{"type":"focus_session_update","session_id":"s1","sender_id":"42","data":{"cursor":1}}',
    '{"type":"x","_herald":{"exclude_users":["u1"]}}',
]
for i, n in enumerate(notes):
    shape = [0, 1, 2, 3, 0x13][i % 5]
    write("notification", f"note{i:02}", bytes([0xf0, 0x01, i, shape]) + n.encode())
write("notification", "strip_embedded",
      bytes([0xf0, 0x01, 0, 0]) + b'{"type":"x","timestamp":"t","_herald":{"exclude_users":["u1","7"],"origin":"abc:1:5:9"}}')

# --- query_token: query \n authorization \n path -------------------------------------------
qt = [
    f"token={USER}\nBearer {USER}\n/ws",
    "token=a%2Eb+c&x=1\nbearer  k \n/ws/project/7",
    "x=1&token=%zz&token=ok\nBasic dXNlcjpw\n/ws/tasks/12",
    "token=\nBearer\n/ws/focus-session/s%2F1",
    "a=%E2%82%AC&token=%F0%9F%98%80\nBEARER tok en\n/v1/notifications/ws/notifications",
    "%74oken=v\n\n/ws/notifications/",
    "token=%+f\nBearer x\n/ws/tenant/" + "a" * 130,
]
for i, q in enumerate(qt):
    write("query_token", f"q{i:02}", q)

# --- jwt ------------------------------------------------------------------------------------
for name, t in {"user": USER, "numeric_publish": NUMERIC, "topics": TOPICS, "expired": EXPIRED, "alg_none": NONE,
                "wrong_secret": WRONG, "garbage": "a.b.c", "two_parts": USER.rsplit(".", 1)[0]}.items():
    write("jwt", name, t)
for i in range(6):
    write("jwt", f"structured{i}", bytes([i, 0, i * 3 % 5, 0, 1, 0, i % 8, 0, 0, 0, 0, 0, i % 6, 0, 1, 0, 0, 0, 0, 0]))

# --- claims: the choices fuzz_targets/claims.rs draws, each a little-endian u16 -------------
# Order: exp, nbf, iat (time shapes 0-25), sub, user_id (id shapes 0-17), scope (0-10),
# topics (0-4), aud (0-6), iss (0-4), duplicate exp (0 = yes, then a time shape); then the
# loop tick (u32 + byte), a raw exp (8 bytes), a clock offset (8 bytes + u32), a clock
# before the epoch (u16) and the minted lifetime (0 = Duration::MAX).
def choices(*values):
    return b"".join(struct.pack("<H", v) for v in values)


def claims_tail(tick=0, raw_exp=b"\xff" * 8, offset=b"\x00" * 8, ttl=0):
    return struct.pack("<IB", tick, 0) + raw_exp + offset + struct.pack("<IHH", 0, 1, ttl)


claims_seeds = {
    "valid_everything": choices(1, 0, 17, 1, 0, 2, 1, 1, 1, 1) + claims_tail(),
    "exp_2_pow_63": choices(3, 0, 0, 4, 0, 6, 0, 3, 3, 1) + claims_tail(tick=0xFFFFFFFF),
    "exp_u64_max": choices(2, 1, 2, 6, 0, 3, 0, 1, 1, 1) + claims_tail(ttl=2),
    "exp_i64_max": choices(4, 0, 9, 7, 4, 7, 0, 0, 0, 1) + claims_tail(),
    "exp_u64_max_accepted": choices(2, 0, 0, 1, 0, 2, 0, 1, 1, 1) + claims_tail(tick=7),
    "exp_i64_max_accepted": choices(4, 0, 0, 6, 0, 0, 0, 0, 0, 1) + claims_tail(),
    "exp_past_u64": choices(5, 0, 0, 1, 0, 0, 0, 0, 0, 1) + claims_tail(),
    "exp_float_1e19": choices(6, 7, 0, 1, 0, 0, 0, 0, 0, 1) + claims_tail(),
    "exp_negative": choices(8, 8, 8, 1, 0, 0, 0, 0, 0, 1) + claims_tail(),
    "exp_string": choices(11, 11, 11, 1, 0, 8, 3, 0, 0, 1) + claims_tail(),
    "exp_raw_u64": choices(19) + b"\xff" * 8 + choices(0, 0, 15, 0, 4, 2, 5, 4, 1) + claims_tail(offset=b"\xff" * 8),
    "exp_near_max_duplicate": choices(24, 0xFFFF, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1) + claims_tail(ttl=1),
    "nbf_minus_zero": choices(1, 21, 20, 5, 0, 10, 0, 1, 2, 1) + claims_tail(),
    "float_exp_user_id": choices(10, 0, 0, 0, 8, 6, 0, 2, 1, 1) + claims_tail(),
    "array_exp_object_sub": choices(14, 15, 13, 14, 12, 9, 0) + bytes([4]) + b"publ" + choices(2, 6, 4, 1) + claims_tail(),
    "exponent_exp_big_sub": choices(25, 23, 22, 9, 16, 1, 1, 1, 1, 1) + claims_tail(),
}
for name, data in claims_seeds.items():
    write("claims", name, data)

print("corpus written to", ROOT)
