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
    "sse_topics": f"GET /sse?token={TOPICS}&topics=project:7,news HTTP/1.1\r\nLast-Event-ID: 3:17\r\n\r\n",
    "sse_bearer_origin": f"GET /sse HTTP/1.1\r\nAuthorization: Bearer {USER}\r\nOrigin: https://app.example\r\n\r\n",
    "sse_preflight": "OPTIONS /sse HTTP/1.1\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: GET\r\n\r\n",
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
# --- resp: 5 config bytes (max bulk, max elements, max depth, max line, mode) then RESP -----
# Streams captured from redis-server 7.0.15 (standalone, and a 3+3 cluster for CLUSTER SHARDS
# and the shard-channel pushes); mode 3 makes the rest drive the value generator instead.
DEFAULT = bytes([255, 255, 32, 255, 0])
TIGHT = bytes([6, 4, 3, 10, 1])  # bulk 18, 4 elements, depth 3, lines of 10
RESP_SEEDS = {
    "pubsub_resp2": b'*3\r\n$9\r\nsubscribe\r\n$11\r\nuser_noti:1\r\n:1\r\n*3\r\n$10\r\npsubscribe\r\n$11\r\nuser_noti:*\r\n:2\r\n'
                    b'*3\r\n$7\r\nmessage\r\n$11\r\nuser_noti:1\r\n$7\r\n{"a":1}\r\n*4\r\n$8\r\npmessage\r\n$11\r\nuser_noti:*\r\n$11\r\nuser_noti:1\r\n$7\r\n{"a":1}\r\n'
                    b'*2\r\n$4\r\npong\r\n$0\r\n\r\n*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n',
    "pubsub_resp3": b'>3\r\n$10\r\nssubscribe\r\n$11\r\nuser_noti:1\r\n:1\r\n>3\r\n$8\r\nsmessage\r\n$11\r\nuser_noti:1\r\n$23\r\n{"type":"notification"}\r\n'
                    b'>3\r\n$12\r\nsunsubscribe\r\n$11\r\nuser_noti:1\r\n:0\r\n+PONG\r\n>3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n',
    "pipeline": b':0\r\n:0\r\n:0\r\n+PONG\r\n+OK\r\n$1\r\nv\r\n$-1\r\n-ERR value is not an integer or out of range\r\n',
    "errors": b"-MOVED 11811 127.0.0.1:7313\r\n-ASK 11811 127.0.0.1:7311\r\n-CROSSSLOT Keys in request don't hash to the same slot\r\n"
              b"-NOAUTH Authentication required.\r\n-WRONGPASS invalid username-password pair or user is disabled.\r\n"
              b"-NOPERM this user has no permissions to run the 'publish' command\r\n!21\r\nSYNTAX invalid syntax\r\n",
    "debug_protocol": b'$11\r\nHello World\r\n:12345\r\n,3.141\r\n(1234567999999999999999999999999999999\r\n_\r\n*3\r\n:0\r\n:1\r\n:2\r\n'
                      b'~3\r\n:0\r\n:1\r\n:2\r\n%3\r\n:0\r\n#f\r\n:1\r\n#t\r\n:2\r\n#f\r\n'
                      b'|1\r\n$14\r\nkey-popularity\r\n*2\r\n$7\r\nkey:123\r\n:90\r\n$39\r\nSome real reply following the attribute\r\n'
                      b'>2\r\n$16\r\nserver-cpu-usage\r\n:42\r\n=29\r\ntxt:This is a verbatim\nstring\r\n#t\r\n',
    "hello3": b'%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:7\r\n'
              b'$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n',
    "cluster_shards_resp3": b'*1\r\n%2\r\n$5\r\nslots\r\n*2\r\n:0\r\n:5460\r\n$5\r\nnodes\r\n*1\r\n%7\r\n$2\r\nid\r\n'
                            b'$40\r\n320d44dd917765efe78a0b3aa11148bda455adaa\r\n$4\r\nport\r\n:7311\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n'
                            b'$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:14\r\n'
                            b'$6\r\nhealth\r\n$6\r\nonline\r\n',
    "malformed": b'*2\r\n$3\r\nabc\r\n$-2\r\n',
    "partial": b'*3\r\n$7\r\nmessage\r\n$11\r\nuser_noti:1\r\n$100\r\n{"a":',
}
for name, data in RESP_SEEDS.items():
    write("resp", name, DEFAULT + data)
write("resp", "tight_limits", TIGHT + RESP_SEEDS["pubsub_resp2"])
write("resp", "deep", bytes([255, 255, 33, 255, 0]) + b"*1\r\n" * 34 + b":1\r\n")
write("resp", "generated", bytes([255, 255, 32, 255, 3]) + bytes((i * 37 + 11) % 256 for i in range(300)))
write("resp", "generated_tight", bytes([4, 3, 2, 6, 3]) + bytes((i * 91 + 5) % 256 for i in range(200)))

# --- tls_upgrade: 8 header bytes, a chunk list, then the payload (fuzz_targets/tls_upgrade.rs) --
def tls_head(mode, flags=0, frag=0, cfill=0, sfill=0, cwrite=0, pattern=0, enc=0, chunks=()):
    """mode 0-2 hostile bytes (after nothing / a real ClientHello / a real handshake), 3 a real
    client sends the payload; chunks: read sizes 1..65536."""
    head = bytes([mode, flags, frag, cfill, sfill, cwrite, pattern, enc, len(chunks)])
    return head + b"".join(struct.pack("<H", c - 1) for c in chunks)


def tls_record(content_type, body, version=b"\x03\x03"):
    return bytes([content_type]) + version + struct.pack(">H", len(body)) + body


def ext(kind, body):
    return struct.pack(">HH", kind, len(body)) + body


def vec8(body):
    return bytes([len(body)]) + body


def vec16(body):
    return struct.pack(">H", len(body)) + body


def client_hello(tls13=True, sni=b"localhost"):
    """A ClientHello as a browser would send it (x25519 share: the curve's base point)."""
    suites = [0x1301, 0x1302, 0x1303] if tls13 else []
    suites += [0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8]
    exts = ext(0, vec16(b"\x00" + vec16(sni)))
    exts += ext(10, vec16(struct.pack(">HH", 0x001D, 0x0017)))
    exts += ext(11, vec8(b"\x00"))
    exts += ext(13, vec16(struct.pack(">6H", 0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0807)))
    exts += ext(23, b"")
    exts += ext(65281, b"\x00")
    if tls13:
        exts += ext(43, vec8(struct.pack(">HH", 0x0304, 0x0303)))
        exts += ext(45, vec8(b"\x01"))
        exts += ext(51, vec16(struct.pack(">H", 0x001D) + vec16(b"\x09" + b"\x00" * 31)))
    body = b"\x03\x03" + bytes(range(32)) + vec8(bytes(range(32, 64))) + vec16(
        b"".join(struct.pack(">H", s) for s in suites)) + vec8(b"\x00") + vec16(exts)
    return b"\x01" + struct.pack(">I", len(body))[1:] + body


HELLO13, HELLO12 = client_hello(), client_hello(tls13=False)
one_byte_records = b"".join(tls_record(0x16, HELLO13[i:i + 1], b"\x03\x01") for i in range(len(HELLO13)))
hostile = {
    "raw_hello13": tls_head(0) + tls_record(0x16, HELLO13, b"\x03\x01"),
    "raw_hello12_byte_reads": tls_head(0, chunks=[1]) + tls_record(0x16, HELLO12, b"\x03\x01"),
    "raw_hello13_one_byte_records": tls_head(0, chunks=[300, 7]) + one_byte_records,
    "raw_hello_then_ccs_finished": tls_head(0) + tls_record(0x16, HELLO13, b"\x03\x01") + tls_record(0x14, b"\x01")
                                   + tls_record(0x17, bytes(range(53))),
    "raw_huge_handshake": tls_head(0) + tls_record(0x16, b"\x01\x00\xff\xff" + bytes(2000), b"\x03\x01"),
    "raw_plain_http": tls_head(0) + requests["health"].encode(),
    "raw_bad_length": tls_head(0) + bytes([0x16, 0x03, 0x01, 0xFF, 0xFF, 0, 0, 0]),
    "raw_sslv2": tls_head(0) + bytes([0x80, 0x2E, 0x01, 0x03, 0x01]) + bytes(48),
    "after_hello_ccs_alert": tls_head(1) + tls_record(0x14, b"\x01") + tls_record(0x15, b"\x02\x28"),
    "after_hello12_garbage": tls_head(1, flags=1, chunks=[5]) + tls_record(0x16, b"\x10\x00\x00\x21\x20" + bytes(32)),
    "after_hello_second_hello": tls_head(1) + tls_record(0x16, HELLO13),
    "after_handshake_forged_data": tls_head(2) + tls_record(0x17, bytes(range(40))),
    "after_handshake12_alert": tls_head(2, flags=1) + tls_record(0x15, b"\x01\x00"),
    "after_handshake_partial_record": tls_head(2, chunks=[3]) + bytes([0x17, 0x03, 0x03, 0x40, 0x00]) + bytes(600),
    "after_handshake_renegotiate": tls_head(2, flags=1) + tls_record(0x16, HELLO12),
    "after_handshake_close": tls_head(2, flags=64, chunks=[2]) + bytes([0x17, 0x03, 0x03, 0x00]),
    "after_hello_close": tls_head(1, flags=64 | 2) + bytes([0x14, 0x03, 0x03]),
    # The handshake timeout's 408 through tls::Writer, then close_notify.
    "after_hello_answer_close": tls_head(1, flags=128 | 64),
    "after_handshake_answer_close": tls_head(2, flags=128 | 64 | 1),
    "raw_partial_record_answer_close": tls_head(0, flags=128 | 64) + bytes([0x16, 0x03, 0x01, 0x00, 0x30, 0x01]),
    # A ClientHello announced at 64 KiB - 1, then 1-byte records of it until 200 KiB: the
    # session carries them all (the message never completes) up to MAX_CARRY.
    "raw_endless_hello_records": tls_head(0, cfill=200, cwrite=9, chunks=[65536, 999])
                                 + tls_record(0x16, b"\x01\x00\xff\xff", b"\x03\x01") + tls_record(0x16, b"\x00", b"\x03\x01"),
    "raw_endless_hello_byte_reads": tls_head(0, cfill=90, cwrite=9, chunks=[1])
                                    + tls_record(0x16, b"\x01\x00\xff\xff", b"\x03\x01") + tls_record(0x16, b"\x00", b"\x03\x01"),
}
for name, data in hostile.items():
    write("tls_upgrade", name, data)
for name in ["upgrade_query_token", "upgrade_bearer_origin", "upgrade_bad_origin", "upgrade_seed000",
             "upgrade_seed001_expired", "upgrade_project_topic", "upgrade_focus_session", "upgrade_no_token",
             "health", "metrics_prom", "head_root", "publish", "pipelined"]:
    write("tls_upgrade", name, tls_head(3) + requests[name].encode())
shaped = {
    # TLS 1.2, 1-byte reads both ways, small records, the answer through tls::Writer.
    "tls12_byte_reads_writer": (tls_head(3, flags=1 | 16, frag=1, cwrite=1, pattern=0x5A, enc=1, chunks=[1]),
                                "upgrade_query_token"),
    "tls13_odd_reads_close_both": (tls_head(3, flags=2 | 4 | 8, frag=9, chunks=[7, 300, 65536]), "upgrade_project_topic"),
    "big_transfers": (tls_head(3, flags=16 | 8, cfill=200, sfill=150, cwrite=200, pattern=0x21, enc=255,
                                chunks=[65536, 1000, 16000]), "publish"),
    # Browsers send the request with their Finished; 7-byte reads split it across the handshake.
    "eager_request_tls13": (tls_head(3, flags=2 | 32, chunks=[7, 65536]), "upgrade_bearer_origin"),
    "eager_request_tls12_close_both": (tls_head(3, flags=1 | 32 | 4 | 8 | 16, frag=5, pattern=0x3C, chunks=[100]),
                                       "upgrade_query_token"),
    "eager_big_request": (tls_head(3, flags=32, cfill=120, chunks=[65536, 3000]), "publish"),
    "big_transfers_tls12_small_records": (tls_head(3, flags=1 | 4, frag=3, cfill=40, sfill=40, chunks=[4096, 13]),
                                          "health"),
}
for name, (head, req) in shaped.items():
    write("tls_upgrade", name, head + requests[req].encode())

print("corpus written to", ROOT)
