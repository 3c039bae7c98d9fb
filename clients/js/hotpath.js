// Hotpath's JavaScript client: one ES module, no dependencies, for browsers and Node 20+.
//
// What it does for an app, in the order a message travels (docs/websocket.md is the protocol):
//
// * Connects one WebSocket (`/v1/ws?token=`, browsers cannot set headers on a socket) and keeps
//   it: a socket that closes or goes silent (no answer to the client's own `ping` in time) is
//   opened again after an exponential backoff with jitter, and a token that is about to expire
//   is refreshed in place (`token.expiring` -> `refresh`) when the token is given as a function.
// * `send()` gives every message a `clientMessageId` (or takes the app's) and keeps it in an
//   outbox until the gateway answers `send.ack`. A send whose answer was lost with its socket is
//   sent again on the next socket with the same `clientMessageId` and body: the gateway answers
//   the same `messageId` (`idempotentHit`), so a retry never makes a second message. A 503 is
//   sent again after its `retryAfterSeconds`; every other refusal rejects the promise.
// * Tracks, per conversation, the highest seq up to which it has every message. Each message is
//   emitted once, deduplicated by (conversationId, seq): live frames and `sync` overlap after a
//   reconnect. After every (re)connect, and whenever a seq is skipped (a live frame was lost),
//   it sends `sync` from that mark, one conversation at a time (the gateway runs one `sync` per
//   socket).
// * Emits the state of the app's own messages in order, each state once and never backwards:
//   `pending` (accepted) -> `sent` (persisted, with its seq) -> `delivered` -> `read`, or
//   `rejected`. After a reconnect it asks the status route about its recent messages that have
//   not reached `read`, since live state frames sent while it was away are gone.
// * Receipts: `ack(messageId, "delivered" | "read")`, queued while offline and repeated after a
//   429/503 wait; by default every message received from someone else is acked `delivered`.
//
// Types: hotpath.d.ts beside this file.

/** Message states, in the order a message moves through them. */
export const MESSAGE_STATES = ["pending", "sent", "delivered", "read"];

/** HTTP status of each error code the gateway uses (WebSocket error frames carry no status). */
const STATUS_OF_CODE = {
  INVALID_SCHEMA: 400,
  MISSING_REQUIRED_FIELD: 400,
  INVALID_FIELD_TYPE: 400,
  FIELD_TOO_LONG: 400,
  INVALID_RECIPIENT: 400,
  UNAUTHORIZED: 401,
  FORBIDDEN: 403,
  NOT_CONVERSATION_MEMBER: 403,
  CONVERSATION_NOT_FOUND: 404,
  MESSAGE_NOT_FOUND: 404,
  DEVICE_NOT_FOUND: 404,
  BLOCK_NOT_FOUND: 404,
  NOT_FOUND: 404,
  REQUEST_TIMEOUT: 408,
  CONVERSATION_INACTIVE: 409,
  USER_BLOCKED: 409,
  CONVERSATION_FULL: 409,
  IDEMPOTENCY_KEY_REUSED: 409,
  SYNC_IN_PROGRESS: 409,
  PAYLOAD_TOO_LARGE: 413,
  RATE_LIMIT_EXCEEDED: 429,
  BACKLOG_FULL: 503,
  SERVICE_UNAVAILABLE: 503,
  INTERNAL_ERROR: 500,
};

/** Codes after which the same request, sent again later, may well succeed. */
const RETRYABLE_CODES = new Set(["BACKLOG_FULL", "SERVICE_UNAVAILABLE", "ENQUEUE_FAILED"]);

/** A refusal from the gateway, over HTTP or the WebSocket, or a request that could not be made. */
export class HotpathError extends Error {
  /**
   * @param {string} code the gateway's error code (`NETWORK_ERROR` when nothing answered)
   * @param {string} message
   * @param {{status?: number, details?: object, retryAfterSeconds?: number}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "HotpathError";
    this.code = code;
    this.details = extra.details ?? {};
    this.retryAfterSeconds = extra.retryAfterSeconds ?? retryAfterOf(this.details);
    this.status = extra.status ?? statusOf(code, this.details);
  }

  /** Whether sending the same request again later may succeed (the gateway said to wait). */
  get retryable() {
    return RETRYABLE_CODES.has(this.code) && this.status === 503;
  }

  /**
   * From an error body `{"error": {code, message, details}}` (HTTP or an `error` frame).
   * @param {any} body
   * @param {{status?: number, retryAfterSeconds?: number}} [extra]
   */
  static fromBody(body, extra = {}) {
    const error = body && typeof body === "object" ? body.error : undefined;
    if (!error || typeof error.code !== "string") {
      const status = extra.status ?? 0;
      return new HotpathError(`HTTP_${status}`, `the gateway answered ${status}`, extra);
    }
    return new HotpathError(error.code, error.message ?? error.code, {
      ...extra,
      details: error.details ?? {},
    });
  }
}

function retryAfterOf(details) {
  const seconds = details && details.retryAfterSeconds;
  return typeof seconds === "number" ? seconds : undefined;
}

function statusOf(code, details) {
  if (code === "ENQUEUE_FAILED") return retryAfterOf(details) === undefined ? 500 : 503;
  return STATUS_OF_CODE[code] ?? 0;
}

/** A new client message id: random, so that two devices of one user never pick the same. */
export function newClientMessageId() {
  return `c-${globalThis.crypto.randomUUID()}`;
}

/**
 * How long to wait before reconnect attempt `attempt` (0 for the first): exponential from
 * `baseMs`, capped at `maxMs`, with half of it random so that many clients cut off together do
 * not come back together.
 */
export function backoffDelay(attempt, baseMs = 500, maxMs = 15000, random = Math.random) {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + (ceiling / 2) * random());
}

/** Whether state `next` is further along than `current` (`rejected` is final). */
function isFurther(current, next) {
  if (current === undefined) return true;
  if (current === "rejected") return false;
  if (next === "rejected") return true;
  return MESSAGE_STATES.indexOf(next) > MESSAGE_STATES.indexOf(current);
}

/**
 * Per-conversation seq bookkeeping: `mark` is the highest seq up to which every message was
 * seen; `ahead` holds seqs seen beyond a gap.
 */
class SeqTracker {
  constructor(mark) {
    this.mark = mark;
    this.ahead = new Set();
  }

  /** Records `seq`; false when it was seen already (a duplicate). */
  see(seq) {
    if (seq <= this.mark || this.ahead.has(seq)) return false;
    this.ahead.add(seq);
    this.advance();
    return true;
  }

  /** A `sync` ended having sent everything up to `lastSeq`. */
  syncedTo(lastSeq) {
    if (lastSeq > this.mark) this.mark = lastSeq;
    for (const seq of this.ahead) if (seq <= this.mark) this.ahead.delete(seq);
    this.advance();
  }

  advance() {
    while (this.ahead.has(this.mark + 1)) {
      this.mark += 1;
      this.ahead.delete(this.mark);
    }
  }

  get hasGap() {
    return this.ahead.size > 0;
  }
}

const DEFAULTS = {
  autoDelivered: true,
  pingIntervalMs: 15000,
  pongTimeoutMs: 10000,
  reconnectBaseMs: 500,
  reconnectMaxMs: 15000,
  maxSendAttempts: 8,
  statusRefreshLimit: 50,
};

/** Own messages whose state is remembered (for ordering and the status refresh). */
const REMEMBERED_MESSAGES = 500;

export class HotpathClient {
  /**
   * @param {import("./hotpath").ClientOptions} options
   */
  constructor(options) {
    if (!options || !options.baseUrl) throw new TypeError("baseUrl is required");
    if (!options.token) throw new TypeError("token is required");
    this.options = { ...DEFAULTS, ...options };
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map();
    this.connectionState = "idle";
    this.socket = null;
    this.attempt = 0;
    this.reqCounter = 0;
    this.wanted = false;
    this.timers = new Set();
    /** Sends not yet answered, in the order they were made. */
    this.outbox = [];
    /** Receipts not yet answered. */
    this.receipts = [];
    /** reqId -> what is waiting for its answer on the current socket. */
    this.inflight = new Map();
    /** conversationId -> SeqTracker */
    this.trackers = new Map();
    this.syncQueue = [];
    this.syncing = null;
    /** messageId -> {conversationId, clientMessageId, state, seq} for own messages. */
    this.own = new Map();
    /** messageId -> state changes that arrived before the message's send.ack. */
    this.early = new Map();
    /** messageId -> the furthest receipt this client sent. */
    this.acked = new Map();
    this.userId = null;
  }

  // ---- events ---------------------------------------------------------------------------

  /** Subscribes to an event; returns the function that unsubscribes. */
  on(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(listener);
    return () => this.listeners.get(type)?.delete(listener);
  }

  emit(type, event) {
    for (const listener of this.listeners.get(type) ?? []) {
      try {
        listener(event);
      } catch (error) {
        if (type !== "error") this.emit("error", { error, context: `${type} listener` });
      }
    }
  }

  // ---- connection -----------------------------------------------------------------------

  /** Opens the socket (and keeps it open until `close()`). Resolves once it is open. */
  connect() {
    this.wanted = true;
    if (this.connectionState === "open") return Promise.resolve();
    const opened = new Promise((resolve) => {
      const off = this.on("connection", (event) => {
        if (event.state === "open") {
          off();
          resolve();
        }
      });
    });
    if (!this.socket && !this.reconnectTimer) this.open();
    return opened;
  }

  /** Closes the socket for good; queued sends stay queued for a later `connect()`. */
  close() {
    this.wanted = false;
    this.reconnectTimer = null;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    for (const pending of [...this.outbox, ...this.receipts]) pending.waiting = false;
    this.stopHeartbeat();
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      this.detach(socket);
      socket.close(1000, "client closed");
    }
    this.dropInflight();
    this.setState("closed", {});
  }

  /**
   * Drops the current socket as if the network had gone, and reconnects at once (after the
   * first backoff step): for an app that learnt the network changed (`online` in a browser).
   */
  reconnectNow() {
    if (!this.wanted) return;
    this.attempt = 0;
    this.clearTimer("reconnectTimer");
    if (this.socket) this.lost(this.socket, 4000, "reconnecting");
    else this.open();
  }

  /**
   * Drops the socket because the network is known to be gone (`offline` in a browser):
   * reconnect attempts go on with backoff.
   */
  networkLost() {
    if (this.socket) this.lost(this.socket, 4000, "network lost");
  }

  async currentToken() {
    const token = this.options.token;
    return typeof token === "function" ? await token() : token;
  }

  async open() {
    if (this.opening) return;
    this.opening = true;
    this.setState(this.attempt === 0 ? "connecting" : "reconnecting", { attempt: this.attempt });
    let token;
    try {
      token = await this.currentToken();
    } catch (error) {
      this.opening = false;
      this.emit("error", { error, context: "token" });
      this.scheduleReconnect();
      return;
    }
    this.opening = false;
    if (!this.wanted || this.socket) return;
    this.userId = subjectOf(token) ?? this.userId;
    const url = `${this.baseUrl.replace(/^http/, "ws")}/v1/ws?token=${encodeURIComponent(token)}`;
    let socket;
    try {
      socket = new this.WebSocket(url);
    } catch (error) {
      this.emit("error", { error, context: "connect" });
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    socket.onopen = () => this.opened(socket);
    socket.onmessage = (event) => this.received(socket, event.data);
    socket.onclose = (event) => this.lost(socket, event.code, event.reason);
    // A browser follows an error with a close; some runtimes (Node 20's) do not when the
    // connection could not even be made, so an error alone counts as the end of the socket.
    socket.onerror = () => this.lost(socket, 1006, "connection error");
  }

  opened(socket) {
    if (socket !== this.socket) return;
    this.attempt = 0;
    this.setState("open", {});
    this.startHeartbeat();
    for (const send of this.outbox) this.transmitSend(send);
    for (const receipt of this.receipts) this.transmitReceipt(receipt);
    this.syncQueue = [...this.trackers.keys()];
    this.syncing = null;
    this.nextSync();
    this.refreshStates();
  }

  /** The socket `socket` closed or is given up: forget it and reconnect if wanted. */
  lost(socket, code, reason) {
    if (socket !== this.socket) return;
    this.detach(socket);
    this.socket = null;
    this.stopHeartbeat();
    try {
      socket.close(code >= 3000 && code < 5000 ? code : 1000, reason);
    } catch {
      // Already closed or closing.
    }
    this.dropInflight();
    this.emit("disconnected", { code, reason });
    if (this.wanted) this.scheduleReconnect();
  }

  detach(socket) {
    socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
  }

  scheduleReconnect() {
    const delayMs = backoffDelay(
      this.attempt,
      this.options.reconnectBaseMs,
      this.options.reconnectMaxMs,
    );
    this.attempt += 1;
    this.setState("reconnecting", { attempt: this.attempt, delayMs });
    this.clearTimer("reconnectTimer");
    this.reconnectTimer = this.later(delayMs, () => {
      this.reconnectTimer = null;
      if (this.wanted && !this.socket) this.open();
    });
  }

  setState(state, extra) {
    this.connectionState = state;
    this.emit("connection", { state, ...extra });
  }

  /** Every frame not answered on a socket that is gone will be sent again on the next. */
  dropInflight() {
    this.inflight.clear();
    for (const send of this.outbox) send.reqId = null;
    for (const receipt of this.receipts) receipt.reqId = null;
    this.syncing = null;
  }

  startHeartbeat() {
    this.stopHeartbeat();
    this.lastHeard = Date.now();
    this.heartbeat = setInterval(() => {
      const socket = this.socket;
      if (!socket) return;
      if (Date.now() - this.lastHeard > this.options.pingIntervalMs + this.options.pongTimeoutMs) {
        this.lost(socket, 4000, "no answer to ping");
        return;
      }
      this.transmit({ type: "ping", reqId: this.expect("p", { kind: "ping" }) });
    }, this.options.pingIntervalMs);
  }

  stopHeartbeat() {
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
  }

  later(ms, work) {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      work();
    }, ms);
    this.timers.add(timer);
    return timer;
  }

  clearTimer(name) {
    if (this[name]) {
      clearTimeout(this[name]);
      this.timers.delete(this[name]);
    }
    this[name] = null;
  }

  nextReqId(prefix) {
    this.reqCounter += 1;
    return `${prefix}${this.reqCounter}`;
  }

  /** Writes a frame on the open socket; false when there is none. */
  transmit(frame) {
    const socket = this.socket;
    if (!socket || this.connectionState !== "open") return false;
    socket.send(JSON.stringify(frame));
    return true;
  }

  // ---- frames from the gateway ----------------------------------------------------------

  received(socket, data) {
    if (socket !== this.socket) return;
    this.lastHeard = Date.now();
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (error) {
      this.emit("error", { error, context: "frame" });
      return;
    }
    const waiting = frame.reqId ? this.inflight.get(frame.reqId) : this.unnamedAnswer(frame);
    if (waiting) this.inflight.delete(waiting.reqId);
    switch (frame.type) {
      case "send.ack":
        if (waiting) this.sendAccepted(waiting, frame);
        break;
      case "ack.ok":
        if (waiting) this.receiptTaken(waiting);
        break;
      case "error":
        this.refused(waiting, frame);
        break;
      case "message.new":
        this.messageArrived(frame.message);
        break;
      case "message.state.changed":
        this.stateChanged(frame);
        break;
      case "sync.done":
        this.syncDone(frame, waiting);
        break;
      case "token.expiring":
        this.refreshToken(frame.expiresAt);
        break;
      case "pong":
        break;
      case "refreshed":
        this.emit("tokenRefreshed", { expiresAt: frame.expiresAt });
        break;
      default:
        break;
    }
  }

  /**
   * What an `error` without `reqId` answers: a frame the gateway could not read far enough to
   * find its id, which for this client's frames means one over the size limit. Frames are
   * answered in the order they were sent (a `sync` runs beside them), so it is the oldest
   * frame still waiting that is not a `sync`.
   */
  unnamedAnswer(frame) {
    if (frame.type !== "error") return undefined;
    for (const waiting of this.inflight.values()) {
      if (waiting.kind !== "sync") return waiting;
    }
    return undefined;
  }

  refused(waiting, frame) {
    const error = HotpathError.fromBody(frame);
    if (!waiting) {
      this.emit("error", { error, context: "frame" });
      return;
    }
    if (waiting.kind === "send") this.sendRefused(waiting, error);
    else if (waiting.kind === "receipt") this.receiptRefused(waiting, error);
    else if (waiting.kind === "sync") this.syncRefused(waiting, error);
    else if (waiting.kind === "refresh") this.emit("error", { error, context: "refresh" });
  }

  async refreshToken(expiresAt) {
    this.emit("tokenExpiring", { expiresAt });
    if (typeof this.options.token !== "function") return;
    try {
      const token = await this.options.token();
      this.transmit({ type: "refresh", reqId: this.expect("r", { kind: "refresh" }), token });
    } catch (error) {
      this.emit("error", { error, context: "refresh" });
    }
  }

  /** Registers `waiting` for the answer to a new reqId with `prefix`. */
  expect(prefix, waiting) {
    const reqId = this.nextReqId(prefix);
    waiting.reqId = reqId;
    this.inflight.set(reqId, waiting);
    return reqId;
  }

  // ---- sending --------------------------------------------------------------------------

  /**
   * Sends a message; resolves with the gateway's `send.ack` once it is accepted.
   * @param {import("./hotpath").SendInput} input
   * @returns {Promise<import("./hotpath").SendAck>}
   */
  send(input) {
    if (!input || !input.conversationId) throw new TypeError("conversationId is required");
    const clientMessageId = input.clientMessageId ?? newClientMessageId();
    const body = {
      conversationId: input.conversationId,
      content: input.content,
      contentType: input.contentType ?? "text",
      clientMessageId,
    };
    for (const field of ["recipientIds", "metadata", "priority"]) {
      if (input[field] !== undefined) body[field] = input[field];
    }
    return new Promise((resolve, reject) => {
      const send = { kind: "send", body, resolve, reject, refusals: 0, reqId: null };
      this.outbox.push(send);
      this.transmitSend(send);
    });
  }

  transmitSend(send) {
    if (send.reqId || send.waiting) return;
    const reqId = this.nextReqId("s");
    if (!this.transmit({ type: "send", reqId, ...send.body })) return;
    send.reqId = reqId;
    this.inflight.set(reqId, send);
  }

  sendAccepted(send, ack) {
    this.outbox = this.outbox.filter((s) => s !== send);
    const own = {
      messageId: ack.messageId,
      conversationId: send.body.conversationId,
      clientMessageId: send.body.clientMessageId,
      state: undefined,
      seq: undefined,
    };
    this.remember(own);
    this.advanceOwn(own, { state: "pending" });
    const early = this.early.get(ack.messageId);
    this.early.delete(ack.messageId);
    for (const change of early ?? []) this.advanceOwn(own, change);
    if (ack.idempotentHit) {
      // Accepted before, on a socket since lost: its state frames may have gone with it.
      this.refreshState(own);
    }
    const { type: _type, reqId: _reqId, ...accepted } = ack;
    send.resolve({ ...accepted, clientMessageId: send.body.clientMessageId });
  }

  sendRefused(send, error) {
    send.reqId = null;
    send.refusals += 1;
    if (error.retryable && send.refusals < this.options.maxSendAttempts) {
      send.waiting = true;
      this.later((error.retryAfterSeconds ?? 1) * 1000, () => {
        send.waiting = false;
        this.transmitSend(send);
      });
      return;
    }
    this.outbox = this.outbox.filter((s) => s !== send);
    error.clientMessageId = send.body.clientMessageId;
    send.reject(error);
  }

  /** Sends still waiting for the gateway's answer (queued while offline included). */
  get pendingSends() {
    return this.outbox.map((send) => ({ ...send.body }));
  }

  remember(own) {
    this.own.set(own.messageId, own);
    if (this.own.size > REMEMBERED_MESSAGES) {
      this.own.delete(this.own.keys().next().value);
    }
  }

  stateChanged(frame) {
    const own = this.own.get(frame.messageId);
    if (!own) {
      // Before its send.ack (or from another device of the same user).
      const list = this.early.get(frame.messageId) ?? [];
      list.push(frame);
      this.early.set(frame.messageId, list);
      if (this.early.size > REMEMBERED_MESSAGES) this.early.delete(this.early.keys().next().value);
      return;
    }
    this.advanceOwn(own, frame);
  }

  /** Moves an own message to a further state, emitting it; older or repeated states are dropped. */
  advanceOwn(own, change) {
    if (!isFurther(own.state, change.state)) return;
    own.state = change.state;
    if (typeof change.seq === "number") own.seq = change.seq;
    const event = {
      messageId: own.messageId,
      conversationId: own.conversationId,
      clientMessageId: own.clientMessageId,
      state: own.state,
    };
    if (own.seq !== undefined) event.seq = own.seq;
    if (change.reason) event.reason = change.reason;
    if (own.state === "sent" && own.seq !== undefined) {
      // Our own message is part of the conversation's seq too.
      this.trackers.get(own.conversationId)?.see(own.seq);
    }
    this.emit("state", event);
  }

  /**
   * Follows the state of an own message this client did not send (from history, or sent by
   * another device): its state changes are emitted from now on, and `refreshStates` asks
   * about it.
   */
  watch(messageId, conversationId, state = "sent", seq = undefined) {
    if (this.own.has(messageId)) return;
    const own = { messageId, conversationId, clientMessageId: undefined, state: undefined, seq };
    this.remember(own);
    this.advanceOwn(own, { state, seq });
    const early = this.early.get(messageId);
    this.early.delete(messageId);
    for (const change of early ?? []) this.advanceOwn(own, change);
  }

  /** After a reconnect: the status route says what live state frames may have been missed. */
  async refreshStates() {
    const stale = [...this.own.values()]
      .filter((own) => own.state !== "read" && own.state !== "rejected")
      .slice(-this.options.statusRefreshLimit);
    for (const own of stale) await this.refreshState(own);
  }

  async refreshState(own) {
    try {
      this.advanceOwn(own, await this.status(own.messageId));
    } catch (error) {
      if (error.code !== "MESSAGE_NOT_FOUND") this.emit("error", { error, context: "status" });
    }
  }

  // ---- receiving ------------------------------------------------------------------------

  /**
   * Follows a conversation from `afterSeq` (the highest seq the app already has; 0 for all):
   * syncs it now if connected, and after every reconnect.
   */
  track(conversationId, afterSeq = 0) {
    const tracker = this.trackers.get(conversationId);
    if (tracker) {
      tracker.syncedTo(afterSeq);
    } else {
      this.trackers.set(conversationId, new SeqTracker(afterSeq));
    }
    this.queueSync(conversationId);
  }

  /** Stops following a conversation (its live messages are still emitted). */
  untrack(conversationId) {
    this.trackers.delete(conversationId);
    this.syncQueue = this.syncQueue.filter((id) => id !== conversationId);
  }

  /** The highest seq up to which every message of the conversation was seen. */
  lastSeq(conversationId) {
    return this.trackers.get(conversationId)?.mark;
  }

  messageArrived(message) {
    if (!message || typeof message.seq !== "number") return;
    const conversationId = message.conversationId;
    let tracker = this.trackers.get(conversationId);
    if (!tracker) {
      // A conversation the app did not ask for: follow it from this message on.
      tracker = new SeqTracker(message.seq - 1);
      this.trackers.set(conversationId, tracker);
    }
    if (!tracker.see(message.seq)) {
      this.emit("duplicate", { conversationId, seq: message.seq });
      return;
    }
    const own = message.senderId === this.userId;
    this.emit("message", { message, own });
    if (!own && this.options.autoDelivered) {
      this.ack(message.messageId, "delivered").catch(() => {});
    }
    if (tracker.hasGap) this.queueSync(conversationId);
  }

  queueSync(conversationId) {
    if (this.syncing?.conversationId === conversationId) {
      this.syncing.again = true;
      return;
    }
    if (!this.syncQueue.includes(conversationId)) this.syncQueue.push(conversationId);
    this.nextSync();
  }

  nextSync() {
    if (this.syncing || this.connectionState !== "open") return;
    const conversationId = this.syncQueue.shift();
    if (conversationId === undefined) return;
    const tracker = this.trackers.get(conversationId);
    if (!tracker) return this.nextSync();
    const sync = { kind: "sync", conversationId, again: false };
    const reqId = this.expect("y", sync);
    this.syncing = sync;
    if (!this.transmit({ type: "sync", reqId, conversationId, afterSeq: tracker.mark })) {
      this.syncing = null;
    }
  }

  syncDone(frame, waiting) {
    const sync = waiting === this.syncing ? waiting : undefined;
    if (sync) this.syncing = null;
    const tracker = this.trackers.get(frame.conversationId);
    if (tracker) {
      tracker.syncedTo(frame.lastSeq);
      this.emit("synced", { conversationId: frame.conversationId, lastSeq: tracker.mark });
      if (sync?.again || tracker.hasGap) this.syncQueue.push(frame.conversationId);
    }
    this.nextSync();
  }

  syncRefused(sync, error) {
    this.syncing = null;
    if (error.code === "SYNC_IN_PROGRESS" || error.retryable) {
      this.later((error.retryAfterSeconds ?? 1) * 1000, () => this.queueSync(sync.conversationId));
    } else {
      this.emit("error", { error, context: "sync", conversationId: sync.conversationId });
    }
    this.nextSync();
  }

  // ---- receipts -------------------------------------------------------------------------

  /**
   * Tells the sender this device got (`delivered`) or showed (`read`) a message. Resolves when
   * the gateway took the receipt; a repeat of a receipt already taken resolves at once.
   */
  ack(messageId, state) {
    if (state !== "delivered" && state !== "read") {
      return Promise.reject(new TypeError('state must be "delivered" or "read"'));
    }
    const done = this.acked.get(messageId);
    if (done === "read" || done === state) return Promise.resolve();
    const queued = this.receipts.find((r) => r.messageId === messageId);
    if (queued && (queued.state === "read" || queued.state === state)) return queued.promise;
    let settle;
    const promise = new Promise((resolve, reject) => {
      settle = { resolve, reject };
    });
    const receipt = { kind: "receipt", messageId, state, reqId: null, ...settle, promise };
    this.receipts.push(receipt);
    this.transmitReceipt(receipt);
    return promise;
  }

  transmitReceipt(receipt) {
    if (receipt.reqId || receipt.waiting) return;
    const reqId = this.nextReqId("a");
    const frame = { type: "ack", reqId, messageId: receipt.messageId, state: receipt.state };
    if (!this.transmit(frame)) return;
    receipt.reqId = reqId;
    this.inflight.set(reqId, receipt);
  }

  receiptTaken(receipt) {
    this.receipts = this.receipts.filter((r) => r !== receipt);
    if (this.acked.get(receipt.messageId) !== "read") this.acked.set(receipt.messageId, receipt.state);
    if (this.acked.size > REMEMBERED_MESSAGES * 4) this.acked.delete(this.acked.keys().next().value);
    receipt.resolve();
  }

  receiptRefused(receipt, error) {
    receipt.reqId = null;
    if (error.code === "RATE_LIMIT_EXCEEDED" || error.retryable) {
      receipt.waiting = true;
      this.later((error.retryAfterSeconds ?? 1) * 1000, () => {
        receipt.waiting = false;
        this.transmitReceipt(receipt);
      });
      return;
    }
    this.receipts = this.receipts.filter((r) => r !== receipt);
    receipt.reject(error);
  }

  // ---- HTTP -----------------------------------------------------------------------------

  /** One request to the HTTP API; the parsed JSON answer, or a thrown HotpathError. */
  async request(method, path, body) {
    const token = await this.currentToken();
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await this.fetch(`${this.baseUrl}${path}`, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (error) {
      throw new HotpathError("NETWORK_ERROR", `could not reach the gateway: ${error.message}`);
    }
    const text = await response.text();
    let json;
    try {
      json = text ? JSON.parse(text) : undefined;
    } catch {
      json = undefined;
    }
    if (!response.ok) {
      const header = Number(response.headers.get("Retry-After"));
      throw HotpathError.fromBody(json, {
        status: response.status,
        retryAfterSeconds: Number.isFinite(header) && header > 0 ? header : undefined,
      });
    }
    return json;
  }

  /** `POST /v1/conversations`: `{type: "direct" | "group", members}`; the caller is a member. */
  createConversation(input) {
    return this.request("POST", "/v1/conversations", input);
  }

  /** `GET /v1/conversations`: the caller's conversations, most recently active first. */
  async listConversations() {
    const page = await this.request("GET", "/v1/conversations");
    return page.conversations;
  }

  addMember(conversationId, userId) {
    return this.request("POST", `/v1/conversations/${enc(conversationId)}/members`, { userId });
  }

  removeMember(conversationId, userId) {
    return this.request(
      "DELETE",
      `/v1/conversations/${enc(conversationId)}/members/${enc(userId)}`,
    );
  }

  /** Up to `limit` messages with seq above `afterSeq`, in seq order. */
  history(conversationId, { afterSeq = 0, limit = 50 } = {}) {
    const query = `after_seq=${afterSeq}&limit=${limit}`;
    return this.request("GET", `/v1/conversations/${enc(conversationId)}/messages?${query}`);
  }

  /**
   * The up to `limit` messages just before `beforeSeq` (seq is gap-free per conversation, so
   * they are the ones after `beforeSeq - 1 - limit`): for scrolling back.
   */
  async historyBefore(conversationId, beforeSeq, limit = 50) {
    const afterSeq = Math.max(0, beforeSeq - 1 - limit);
    const take = Math.max(0, beforeSeq - 1 - afterSeq);
    if (take === 0) return [];
    const page = await this.history(conversationId, { afterSeq, limit: take });
    return page.messages;
  }

  /** `GET /v1/messages/{id}/status`. */
  status(messageId) {
    return this.request("GET", `/v1/messages/${enc(messageId)}/status`);
  }
}

function enc(part) {
  return encodeURIComponent(part);
}

/** The `sub` of a JWT, read without checking it (the gateway checks it). */
function subjectOf(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(decodeBase64(payload));
    return typeof json.sub === "string" ? json.sub : null;
  } catch {
    return null;
  }
}

function decodeBase64(text) {
  const padded = text + "===".slice((text.length + 3) % 4);
  const binary = globalThis.atob(padded);
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}
