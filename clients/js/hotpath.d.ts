// Types of hotpath.js, Hotpath's JavaScript client. The protocol is docs/websocket.md.

/** The state of a message the client sent, in order; `rejected` is final. */
export type MessageState = "pending" | "sent" | "delivered" | "read";
export type OwnMessageState = MessageState | "rejected";
export type ReceiptState = "delivered" | "read";
export type ContentType = "text" | "image" | "file" | "audio" | "video" | "location";
export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export const MESSAGE_STATES: readonly MessageState[];

export interface ClientOptions {
  /** The gateway, e.g. `http://127.0.0.1:8080` (`ws:`/`wss:` is derived from it). */
  baseUrl: string;
  /** A bearer token, or a function that returns a current one (called on every (re)connect and
   * when the socket's token is about to expire, so the socket is refreshed in place). */
  token: string | (() => string | Promise<string>);
  /** Ack `delivered` every message received from someone else (default true). */
  autoDelivered?: boolean;
  /** Client ping period; a socket silent for this plus `pongTimeoutMs` is dropped (15 s, 10 s). */
  pingIntervalMs?: number;
  pongTimeoutMs?: number;
  /** Reconnect backoff: from `reconnectBaseMs` doubling to `reconnectMaxMs` (500 ms, 15 s). */
  reconnectBaseMs?: number;
  reconnectMaxMs?: number;
  /** How often a send refused with 503 is tried again before its promise rejects (8). */
  maxSendAttempts?: number;
  /** Own messages whose status is asked for after a reconnect (50). */
  statusRefreshLimit?: number;
  /** A WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
}

export interface SendInput {
  conversationId: string;
  content: string;
  contentType?: ContentType;
  /** Names this message forever; generated when absent. Reuse it to retry the same message. */
  clientMessageId?: string;
  recipientIds?: string[];
  metadata?: Record<string, unknown>;
  priority?: "low" | "normal" | "high";
}

/** The gateway's answer to a send (`send.ack`, the 202 body of `POST /v1/messages`). */
export interface SendAck {
  messageId: string;
  correlationId: string;
  state: "pending";
  acceptedAt: string;
  idempotencyKey: string;
  /** True when this was a retry of a message the gateway had already accepted. */
  idempotentHit: boolean;
  clientMessageId: string;
  guidance: Record<string, string>;
}

/** A persisted message, live or from `sync`/history. */
export interface Message {
  messageId: string;
  conversationId: string;
  seq: number;
  senderId: string;
  content: string;
  contentType: ContentType;
  metadata: Record<string, unknown>;
  acceptedAt: string;
}

export interface HistoryMessage extends Omit<Message, "conversationId"> {
  priority: string;
  correlationId: string;
  persistedAt: string;
}

export interface HistoryPage {
  conversationId: string;
  messages: HistoryMessage[];
  nextAfterSeq: number;
}

export interface Conversation {
  conversationId: string;
  type: "direct" | "group";
  isActive: boolean;
  members: string[];
  createdAt?: string;
  /** The highest seq in the conversation (listing only). */
  lastSeq?: number;
  pushPreview?: boolean;
}

export interface ErrorReason {
  code: string;
  message: string;
  details: Record<string, unknown>;
}

export interface MessageStatus {
  messageId: string;
  conversationId: string;
  senderId: string;
  state: OwnMessageState;
  seq?: number;
  acceptedAt: string;
  persistedAt?: string;
  rejectedAt?: string;
  reason?: ErrorReason;
  recipients?: { userId: string; state: MessageState; deliveredAt: string | null; readAt: string | null }[];
}

export interface ClientEvents {
  /** A message received once per (conversationId, seq); `own` when this user sent it. */
  message: { message: Message; own: boolean };
  /** A message seen again (live and from `sync`), and dropped. */
  duplicate: { conversationId: string; seq: number };
  /** An own message moved on: emitted in order, each state once. */
  state: {
    messageId: string;
    conversationId: string;
    clientMessageId: string;
    state: OwnMessageState;
    seq?: number;
    reason?: ErrorReason;
  };
  /** A `sync` finished: every message up to `lastSeq` has been emitted. */
  synced: { conversationId: string; lastSeq: number };
  /** `delayMs` and `attempt` are set while waiting to reconnect. */
  connection: { state: ConnectionState; attempt?: number; delayMs?: number };
  disconnected: { code: number; reason: string };
  tokenExpiring: { expiresAt: string };
  tokenRefreshed: { expiresAt: string };
  error: { error: unknown; context: string; conversationId?: string };
}

export class HotpathError extends Error {
  /** The gateway's code (`NOT_CONVERSATION_MEMBER`, `RATE_LIMIT_EXCEEDED`, ...), or
   * `NETWORK_ERROR` when nothing answered, `HTTP_<status>` for a body without one. */
  readonly code: string;
  /** The HTTP status (derived from the code for WebSocket error frames); 0 if unknown. */
  readonly status: number;
  readonly details: Record<string, unknown>;
  /** From `Retry-After` or `details.retryAfterSeconds`. */
  readonly retryAfterSeconds?: number;
  /** Set on a refused send. */
  clientMessageId?: string;
  /** A 503 the gateway asked to retry after a wait. */
  readonly retryable: boolean;
  constructor(code: string, message: string, extra?: { status?: number; details?: object; retryAfterSeconds?: number });
  static fromBody(body: unknown, extra?: { status?: number; retryAfterSeconds?: number }): HotpathError;
}

export function newClientMessageId(): string;
export function backoffDelay(attempt: number, baseMs?: number, maxMs?: number, random?: () => number): number;

export class HotpathClient {
  constructor(options: ClientOptions);
  readonly connectionState: ConnectionState;
  /** The token's subject, once connected. */
  readonly userId: string | null;
  on<K extends keyof ClientEvents>(type: K, listener: (event: ClientEvents[K]) => void): () => void;
  /** Opens the socket and keeps it open (reconnecting with backoff) until `close()`. */
  connect(): Promise<void>;
  close(): void;
  /** The network came back: reconnect now rather than at the next backoff step. */
  reconnectNow(): void;
  /** The network is gone: drop the socket and go on reconnecting with backoff. */
  networkLost(): void;
  /** Sends (or queues while offline); resolves with `send.ack`, rejects with a HotpathError. */
  send(input: SendInput): Promise<SendAck>;
  /** Sends not yet answered, queued ones included. */
  readonly pendingSends: (SendInput & { clientMessageId: string })[];
  /** A receipt for a message received; resolves once the gateway took it. */
  ack(messageId: string, state: ReceiptState): Promise<void>;
  /** Follow a conversation from `afterSeq` (0: everything): `sync` now and after each reconnect. */
  track(conversationId: string, afterSeq?: number): void;
  untrack(conversationId: string): void;
  /** The highest seq up to which every message of the conversation was emitted. */
  lastSeq(conversationId: string): number | undefined;
  /** Follows the state of an own message this client did not send (history, another device). */
  watch(messageId: string, conversationId: string, state?: OwnMessageState, seq?: number): void;
  /** Asks the status route about own messages not yet `read` (done after every reconnect). */
  refreshStates(): Promise<void>;
  /** Writes a raw frame (docs/websocket.md) on the open socket; false when offline. */
  transmit(frame: Record<string, unknown>): boolean;

  request<T = unknown>(method: string, path: string, body?: unknown): Promise<T>;
  createConversation(input: { type: "direct" | "group"; members: string[]; pushPreview?: boolean }): Promise<Conversation>;
  listConversations(): Promise<Conversation[]>;
  addMember(conversationId: string, userId: string): Promise<Conversation>;
  removeMember(conversationId: string, userId: string): Promise<Conversation>;
  history(conversationId: string, page?: { afterSeq?: number; limit?: number }): Promise<HistoryPage>;
  /** The up to `limit` messages just before `beforeSeq`, in seq order (scrolling back). */
  historyBefore(conversationId: string, beforeSeq: number, limit?: number): Promise<HistoryMessage[]>;
  status(messageId: string): Promise<MessageStatus>;
}
