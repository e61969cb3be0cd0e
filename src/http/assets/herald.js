// herald.js: the browser client for herald, served by herald at /herald.js. No dependencies.
//
//   import { Herald } from "/herald.js";
//   const herald = new Herald("https://push.example.com", {
//     getToken: () => fetch("/my/herald-token").then((r) => r.text()),
//     onMessage: (n) => console.log(n),
//     onStatus: (s) => console.log(s.state, s.code ?? "", s.reason ?? ""),
//   });
//
// WebSocket first (`/ws`, or the path of `url`), Server-Sent Events (`/sse`) when the
// WebSocket cannot be established but SSE can. Reconnects with jittered exponential backoff
// (1 s doubling to 30 s), except after a close that means "this token is refused" when no
// `getToken` can supply another. Remembers the last `stream_id` seen (localStorage, so across
// page reloads) and reconnects with `since=<it>`, so nothing published meanwhile is lost
// when herald keeps history. With `getToken`, a fresh token is fetched before the current
// one's `exp` and the connection is re-opened with it.
//
// onStatus receives {state, transport, ...}; the states:
//   connecting {attempt}        an attempt starts (attempt 0 is the first)
//   open                        connected; notifications flow
//   resumed {replayed, complete} herald replayed what was missed
//   closed {code, reason}       the connection ended (a reconnect or a stop follows)
//   refused {status, reason}    refused before opening; `reason` says why when it can be told
//   fallback                    the WebSocket is refused but SSE works: switching to SSE
//   reconnecting {delay}        next attempt in `delay` ms
//   refreshing                  getToken() is asked for a fresh token
//   stopped {reason}            final: close() was called, or the token is refused for good

const MIN_DELAY_MS = 1000;
const MAX_DELAY_MS = 30000;
// Closes that mean "this token is refused": herald's seed-000 path (4401), the usual
// application codes, and 1008 unless its reason says otherwise (see #onClosed).
const AUTH_CLOSE_CODES = new Set([4001, 4003, 4401, 4403]);
// Consecutive refusals of tokens from getToken() before giving up.
const MAX_AUTH_RETRIES = 3;
const PROBE_TIMEOUT_MS = 5000;
// Topic paths (`/ws/{kind}/{id}`) and the topic each one carries.
const TOPIC_PATH = /^\/ws\/(tenant|device|tasks|project|focus-session)\/([^/]+)$/;

/** The JSON payload of a JWT, or null. Never verified: only read for `exp` and the user. */
export function tokenClaims(token) {
  try {
    const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = decodeURIComponent(
      Array.from(atob(part), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""),
    );
    const claims = JSON.parse(json);
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** The user a token names (`sub`, else `user_id`), or "". */
export function tokenUser(token) {
  const claims = tokenClaims(token);
  const user = claims ? (claims.sub ?? claims.user_id) : undefined;
  return user === undefined || user === null ? "" : String(user);
}

export class Herald {
  #origin; // http(s)://host:port of herald
  #path; // the WebSocket path
  #token;
  #getToken;
  #topics;
  #onMessage;
  #onStatus;
  #transport = "websocket";
  #state = "idle";
  #stopped = false;
  // Bumped by every new attempt and by close(): callbacks of an older attempt are ignored.
  #attemptId = 0;
  #socket = null; // the WebSocket or EventSource of the current attempt
  #retries = 0; // consecutive failed attempts: the backoff exponent
  #authRetries = 0;
  #wsRefusals = 0; // consecutive WebSocket refusals while SSE answered
  #retryTimer = 0;
  #refreshTimer = 0;
  #since = null;
  #loaded = false; // #since read from storage (once the token, hence the user, is known)
  #saveTimer = 0;
  #onPageHide = () => this.#save();

  /**
   * @param {string} url herald's base URL (`https://host`), or a WebSocket URL with a path
   *   (`wss://host/ws/notifications`); "" means the page's own origin.
   * @param {{token?: string, getToken?: () => (string|Promise<string>), topics?: string[],
   *   onMessage?: (message: object|string) => void, onStatus?: (status: object) => void}} options
   */
  constructor(url = "", options = {}) {
    const here = globalThis.location ? globalThis.location.href : undefined;
    const parsed = new URL(url || "/", here);
    const secure = parsed.protocol === "https:" || parsed.protocol === "wss:";
    this.#origin = (secure ? "https://" : "http://") + parsed.host;
    this.#path = parsed.pathname && parsed.pathname !== "/" ? parsed.pathname : "/ws";
    this.#token = options.token || null;
    this.#getToken = typeof options.getToken === "function" ? options.getToken : null;
    this.#topics = Array.isArray(options.topics) ? options.topics.map(String) : [];
    this.#onMessage = typeof options.onMessage === "function" ? options.onMessage : () => {};
    this.#onStatus = typeof options.onStatus === "function" ? options.onStatus : () => {};
    globalThis.addEventListener?.("pagehide", this.#onPageHide);
    this.#connect();
  }

  /** The current state (see the list at the top of this file). */
  get state() {
    return this.#state;
  }

  /** "websocket" or "sse". */
  get transport() {
    return this.#transport;
  }

  /** The last `stream_id` seen, sent as `since` on the next connect. */
  get lastStreamId() {
    return this.#since;
  }

  /** Acknowledges a notification by its `stream_id`. False when it could not be sent (not
   * connected, or on SSE, which has no way back to herald). */
  ack(streamId) {
    const socket = this.#socket;
    if (this.#transport !== "websocket" || !socket || socket.readyState !== 1) return false;
    socket.send(JSON.stringify({ action: "ack", stream_id: String(streamId) }));
    return true;
  }

  /** Closes the connection for good: no reconnect, no refresh. */
  close() {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#attemptId++;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#refreshTimer);
    this.#drop(1000, "closed by the client");
    this.#save();
    globalThis.removeEventListener?.("pagehide", this.#onPageHide);
    this.#status("stopped", { reason: "closed by the client" });
  }

  // ---------------------------------------------------------------- attempts

  async #connect() {
    if (this.#stopped) return;
    const id = ++this.#attemptId;
    clearTimeout(this.#retryTimer);
    if (!this.#token && this.#getToken) {
      if (!(await this.#refreshToken(id))) return;
    }
    if (!this.#loaded) {
      this.#loaded = true;
      this.#since = this.#since || this.#load();
    }
    this.#status("connecting", { attempt: this.#retries });
    this.#scheduleRefresh();
    if (this.#transport === "sse") this.#openSse(id);
    else this.#openWebSocket(id);
  }

  #openWebSocket(id) {
    const ws = this.#origin.replace(/^http/, "ws") + this.#path + "?" + this.#query(false);
    let socket;
    try {
      socket = new WebSocket(ws);
    } catch (error) {
      this.#refused(id, { reason: String(error && error.message) });
      return;
    }
    this.#socket = socket;
    let opened = false;
    socket.onopen = () => {
      if (id !== this.#attemptId) return;
      opened = true;
      // Topics on a topic path are fixed by the path; elsewhere they are subscribed to.
      if (!TOPIC_PATH.test(this.#path)) {
        for (const topic of this.#topics) socket.send(JSON.stringify({ type: "subscribe", topic }));
      }
      this.#opened();
    };
    socket.onmessage = (event) => {
      if (id === this.#attemptId) this.#receive(event.data, "");
    };
    socket.onclose = (event) => {
      if (id !== this.#attemptId) return;
      this.#socket = null;
      if (opened) this.#onClosed(id, event.code, event.reason);
      else this.#diagnose(id);
    };
  }

  #openSse(id) {
    let source;
    try {
      source = new EventSource(this.#origin + "/sse?" + this.#query(true));
    } catch (error) {
      this.#refused(id, { reason: String(error && error.message) });
      return;
    }
    this.#socket = source;
    let opened = false;
    source.onopen = () => {
      if (id !== this.#attemptId) return;
      opened = true;
      this.#opened();
    };
    source.onmessage = (event) => {
      if (id === this.#attemptId) this.#receive(event.data, event.lastEventId);
    };
    // EventSource would retry on its own, without the backoff, the fresh token or `since`
    // that this class adds: every error ends the attempt here.
    source.onerror = () => {
      if (id !== this.#attemptId) return;
      source.close();
      this.#socket = null;
      if (opened) this.#onClosed(id, 0, "event stream ended");
      else this.#diagnose(id);
    };
  }

  #query(sse) {
    const params = new URLSearchParams();
    if (this.#token) params.set("token", this.#token);
    const topics = sse ? this.#sseTopics() : [];
    if (topics.length) params.set("topics", topics.join(","));
    if (this.#since) params.set("since", this.#since);
    return params.toString();
  }

  // On SSE a topic path's topic becomes a `topics` entry.
  #sseTopics() {
    const match = TOPIC_PATH.exec(this.#path);
    if (!match) return this.#topics;
    const kind = match[1] === "tasks" ? "workspace" : match[1];
    return [kind + ":" + decodeURIComponent(match[2]), ...this.#topics];
  }

  #opened() {
    this.#retries = 0;
    this.#authRetries = 0;
    this.#wsRefusals = 0;
    this.#status("open");
  }

  #receive(data, lastEventId) {
    let message = data;
    try {
      message = JSON.parse(data);
    } catch {
      // not JSON (`pong`): handed over as the string it is
    }
    if (message && typeof message === "object") {
      if (message.type === "resumed") {
        this.#status("resumed", { replayed: message.replayed, complete: message.complete });
      }
      const streamId = typeof message.stream_id === "string" ? message.stream_id : lastEventId;
      if (streamId) this.#remember(streamId);
    }
    try {
      this.#onMessage(message);
    } catch (error) {
      // The application's bug must not end the connection; it still reaches the console.
      setTimeout(() => {
        throw error;
      });
    }
  }

  // ---------------------------------------------------------------- endings

  #onClosed(id, code, reason) {
    this.#status("closed", { code, reason });
    if (code === 1008 && /disconnected by the server/i.test(reason)) {
      // An operator's /api/disconnect: reconnecting would undo it.
      this.#stop(reason);
    } else if (AUTH_CLOSE_CODES.has(code) || (code === 1008 && !/slow consumer/i.test(reason))) {
      this.#authFailed(id, reason || "token refused");
    } else {
      this.#retry(id);
    }
  }

  // The attempt failed before opening. A browser hides the HTTP status of a refused
  // WebSocket upgrade (it reports 1006 and nothing else), so ask herald again in a way that
  // shows the answer: a fetch of /sse, which gives the same refusals as /ws (and, when it
  // answers 200, shows that SSE works where the WebSocket does not).
  async #diagnose(id) {
    const local = this.#tokenProblem();
    if (local) return this.#refused(id, { reason: local, auth: true });
    const answer = await this.#probeSse();
    if (id !== this.#attemptId) return;
    if (answer.down) return this.#refused(id, { reason: "herald is unreachable" });
    if (answer.status === 200) {
      if (this.#transport === "sse") return this.#refused(id, { reason: "event stream failed" });
      // The WebSocket failed twice in a row while /sse answered: fall back. Once only
      // could be herald starting up between the two requests.
      if (++this.#wsRefusals >= 2) {
        this.#transport = "sse";
        this.#status("fallback", { reason: "WebSocket refused; /sse answers" });
        return this.#connect();
      }
      return this.#refused(id, { reason: "WebSocket refused (status hidden by the browser)", now: true });
    }
    if (answer.status === 401 || answer.status === 403) {
      return this.#refused(id, { status: answer.status, reason: answer.reason, auth: true });
    }
    if (answer.status !== 404 && answer.status !== 405) {
      return this.#refused(id, { status: answer.status, reason: answer.reason });
    }
    // No /sse on this herald: a path that reports refusals in a close frame tells whether
    // the token is the reason.
    const close = await this.#probeCloseFrame();
    if (id !== this.#attemptId) return;
    if (close.refused) return this.#refused(id, { reason: "invalid or expired token", auth: true });
    this.#refused(id, {
      reason: close.accepted
        ? "WebSocket upgrade refused, though herald accepts the token (Origin, a connection limit, the topic?)"
        : "WebSocket upgrade refused (the browser hides herald's answer)",
    });
  }

  #tokenProblem() {
    if (!this.#token) return "missing token";
    const claims = tokenClaims(this.#token);
    if (!claims) return "the token is not a JWT";
    if (typeof claims.exp === "number" && claims.exp * 1000 <= Date.now()) return "token expired";
    return null;
  }

  async #probeSse() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), PROBE_TIMEOUT_MS);
    try {
      const response = await fetch(this.#origin + "/sse?" + this.#query(true), {
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
        signal: controller.signal,
      });
      let reason = response.statusText;
      if (response.ok) {
        controller.abort(); // only the status was wanted, not the stream
      } else {
        const body = await response.text();
        try {
          reason = JSON.parse(body).error || reason;
        } catch {
          reason = body.slice(0, 200) || reason;
        }
      }
      return { status: response.status, reason };
    } catch {
      return { down: true };
    } finally {
      clearTimeout(timer);
    }
  }

  // Herald's seed-001 path accepts the upgrade and closes 1008 "unauthorized" for a refused
  // token; a token it accepts keeps the socket open (`accepted`), which is closed again.
  #probeCloseFrame() {
    return new Promise((resolve) => {
      let socket;
      try {
        const url = this.#origin.replace(/^http/, "ws") + "/ws/notifications?" + this.#query(false);
        socket = new WebSocket(url);
      } catch {
        resolve({ refused: false });
        return;
      }
      const done = (result) => {
        clearTimeout(timer);
        socket.onopen = socket.onclose = null;
        if (socket.readyState <= 1) socket.close(1000, "probe");
        resolve(result);
      };
      const timer = setTimeout(() => done({ refused: false }), PROBE_TIMEOUT_MS);
      socket.onopen = () => setTimeout(() => done({ refused: false, accepted: true }), 300);
      socket.onclose = (event) => done({ refused: event.code === 1008 || event.code === 4401 });
    });
  }

  #refused(id, { status, code, reason, auth = false, now = false }) {
    this.#status("refused", { status, code, reason });
    if (auth) this.#authFailed(id, reason);
    else this.#retry(id, now);
  }

  async #authFailed(id, reason) {
    if (!this.#getToken || this.#authRetries >= MAX_AUTH_RETRIES) {
      this.#stop("token refused: " + reason);
      return;
    }
    this.#authRetries++;
    this.#token = null; // #connect asks getToken() for a new one
    this.#retry(id);
  }

  #retry(id, now = false) {
    if (this.#stopped || id !== this.#attemptId) return;
    const ceiling = Math.min(MAX_DELAY_MS, MIN_DELAY_MS * 2 ** this.#retries);
    // Jitter over the upper half of the window: a fleet restart does not bring every
    // client back in the same millisecond.
    const delay = now ? 0 : Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    this.#retries = Math.min(this.#retries + 1, 16);
    this.#status("reconnecting", { delay });
    this.#retryTimer = setTimeout(() => this.#connect(), delay);
  }

  #stop(reason) {
    this.#stopped = true;
    this.#attemptId++;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#refreshTimer);
    this.#drop(1000, "closed by the client");
    this.#save();
    this.#status("stopped", { reason });
  }

  #drop(code, reason) {
    const socket = this.#socket;
    this.#socket = null;
    if (!socket) return;
    socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    if (typeof EventSource !== "undefined" && socket instanceof EventSource) socket.close();
    else if (socket.readyState <= 1) socket.close(code, reason);
  }

  // ---------------------------------------------------------------- tokens

  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    const claims = this.#getToken && tokenClaims(this.#token);
    if (!claims || typeof claims.exp !== "number") return;
    const now = Date.now() / 1000;
    const lifetime = claims.exp - (typeof claims.iat === "number" ? claims.iat : now);
    // Ahead of expiry by a fifth of the lifetime, between 1 s and 60 s.
    const margin = Math.min(60, Math.max(1, lifetime / 5));
    // Already that close to expiry: herald's expiry close (then getToken) comes first,
    // rather than a refresh loop on a token that getToken keeps handing out.
    if (claims.exp - margin <= now) return;
    const ms = Math.min(2 ** 31 - 1, Math.max(0, (claims.exp - margin - now) * 1000));
    this.#refreshTimer = setTimeout(() => this.#refresh(), ms);
  }

  async #refresh() {
    const id = this.#attemptId;
    if (!(await this.#refreshToken(id))) return;
    if (id !== this.#attemptId) return;
    // Re-open with the new token; `since` covers the moment in between.
    this.#drop(1000, "token refresh");
    this.#connect();
  }

  // Asks getToken(); false when this attempt was superseded or the token could not be had
  // (then a retry is scheduled).
  async #refreshToken(id) {
    this.#status("refreshing");
    let token;
    try {
      token = await this.#getToken();
    } catch (error) {
      if (id === this.#attemptId) {
        this.#status("refused", { reason: "getToken failed: " + (error && error.message) });
        this.#retry(id);
      }
      return false;
    }
    if (id !== this.#attemptId || this.#stopped) return false;
    if (!token) {
      this.#stop("getToken gave no token");
      return false;
    }
    this.#token = String(token);
    return true;
  }

  // ---------------------------------------------------------------- resume position

  // Per herald, path and user: another user's position means nothing to this stream.
  // Topics added with `topics` share the connection but have streams of their own, whose
  // ids would be wrong for this one: then nothing is remembered.
  #storageKey() {
    if (this.#topics.length && !TOPIC_PATH.test(this.#path)) return null;
    return "herald:since:" + this.#origin + this.#path + ":" + tokenUser(this.#token);
  }

  #load() {
    const key = this.#storageKey();
    try {
      return key ? globalThis.localStorage?.getItem(key) || null : null;
    } catch {
      return null; // storage disabled: resume within this page only
    }
  }

  #remember(streamId) {
    if (!this.#storageKey()) return;
    this.#since = streamId;
    // Written at most every 250 ms: a burst of notifications is one write.
    if (!this.#saveTimer) this.#saveTimer = setTimeout(() => this.#save(), 250);
  }

  #save() {
    clearTimeout(this.#saveTimer);
    this.#saveTimer = 0;
    const key = this.#storageKey();
    if (!key || !this.#since) return;
    try {
      globalThis.localStorage?.setItem(key, this.#since);
    } catch {
      // storage full or disabled: the position is still used within this page
    }
  }

  #status(state, details = {}) {
    this.#state = state;
    try {
      this.#onStatus({ state, transport: this.#transport, ...details });
    } catch (error) {
      setTimeout(() => {
        throw error;
      });
    }
  }
}
