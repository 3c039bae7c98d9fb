// Hotpath's web client: the reference client and the demo, on the client library
// (/app/hotpath.js is clients/js/hotpath.js). Plain DOM, no framework, no build step.
//
// Each message on screen is an <li class="message"> with `data-seq` once persisted, and for
// the user's own messages `data-client-id`, `data-state` (queued, pending, sent, delivered,
// read, failed, rejected) and `data-states`, every state it went through in order.
import { HotpathClient } from "./hotpath.js";

const PAGE = 30;
const TOKEN_KEY = "hotpath.token";
const $ = (id) => document.getElementById(id);

const ui = {
  client: null,
  me: null,
  /** conversationId -> conversation as listed, plus `unread`. */
  conversations: new Map(),
  open: null,
  /** The lowest seq on screen for the open conversation (older pages load below it). */
  oldestSeq: null,
  loadingOlder: false,
  /** Own messages sent from this page: clientMessageId -> the input, for a retry. */
  sent: new Map(),
  readObserver: null,
  olderObserver: null,
};

// ---- plain words for refusals -----------------------------------------------------------

function seconds(n) {
  return n === 1 ? "1 second" : `${n} seconds`;
}

/** What went wrong, for a person. */
export function describeError(error) {
  const wait = error.retryAfterSeconds;
  switch (error.code) {
    case "RATE_LIMIT_EXCEEDED":
      return `You are sending too fast. You can send again in ${seconds(wait ?? 1)}.`;
    case "PAYLOAD_TOO_LARGE": {
      const limit = error.details?.limitBytes;
      const size = limit ? ` (the limit is ${Math.floor(limit / 1024)} KiB)` : "";
      return `This message is too large to send${size}. Shorten it and try again.`;
    }
    case "FIELD_TOO_LONG":
      return "This message is too long to send. Shorten it and try again.";
    case "NOT_CONVERSATION_MEMBER":
      return "You are not a member of this conversation (any more), so you cannot send to it.";
    case "FORBIDDEN":
      return `Not allowed: ${error.message}.`;
    case "USER_BLOCKED":
      return "This message cannot be delivered: a block stands between you and the recipient.";
    case "CONVERSATION_INACTIVE":
      return "This conversation is closed: no more messages can be sent to it.";
    case "CONVERSATION_NOT_FOUND":
      return "This conversation does not exist, or you are not in it.";
    case "CONVERSATION_FULL":
      return "This conversation has as many members as it can have.";
    case "UNAUTHORIZED":
      return "Your sign-in is no longer valid. Sign in again with a new token.";
    case "BACKLOG_FULL":
    case "ENQUEUE_FAILED":
    case "SERVICE_UNAVAILABLE":
      return wait
        ? `The service is busy right now. Try again in ${seconds(wait)}.`
        : "The service could not take the message. Try again later.";
    case "NETWORK_ERROR":
      return "Cannot reach the server. Check your connection.";
    default:
      return error.message ? `Refused: ${error.message}` : "Something went wrong.";
  }
}

let noticeTimer = null;
function notice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (box.hidden = true), 8000);
}

// ---- signing in -------------------------------------------------------------------------

function subjectOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "===".slice((part.length + 3) % 4))).sub ?? null;
  } catch {
    return null;
  }
}

async function signIn(token) {
  const me = subjectOf(token);
  if (!me) throw new Error("This is not a token: it should look like eyJ…");
  const client = new HotpathClient({ baseUrl: location.origin, token, autoDelivered: true });
  // Checks the token before anything is shown.
  const listed = await client.listConversations();
  sessionStorage.setItem(TOKEN_KEY, token);
  ui.client = client;
  ui.me = me;
  $("me").textContent = me;
  $("signin").hidden = true;
  $("app").hidden = false;
  showConversations(listed);
  wire(client);
  client.connect();
}

function signOut() {
  ui.client?.close();
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
}

// ---- the connection ---------------------------------------------------------------------

function wire(client) {
  client.on("connection", showConnection);
  client.on("message", ({ message, own }) => received(message, own));
  client.on("state", stateChanged);
  client.on("error", ({ error, context }) => {
    if (context === "status" || context === "frame") return;
    if (error?.code) notice(describeError(error));
  });
  window.addEventListener("offline", () => client.networkLost());
  window.addEventListener("online", () => client.reconnectNow());
}

let countdown = null;
function showConnection(event) {
  const box = $("connection");
  box.dataset.state = event.state;
  clearInterval(countdown);
  if (event.state === "open") box.textContent = "Connected";
  else if (event.state === "connecting") box.textContent = "Connecting…";
  else if (event.state === "closed") box.textContent = "Disconnected";
  else if (event.delayMs !== undefined) {
    const until = Date.now() + event.delayMs;
    const tick = () => {
      const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
      box.textContent = `Offline — reconnecting in ${seconds(left)} (attempt ${event.attempt})`;
    };
    tick();
    countdown = setInterval(tick, 500);
  } else {
    box.textContent = `Offline — reconnecting (attempt ${event.attempt})…`;
  }
}

// ---- conversations ----------------------------------------------------------------------

function titleOf(conversation) {
  const others = conversation.members.filter((m) => m !== ui.me);
  return others.length ? others.join(", ") : "just you";
}

function showConversations(listed) {
  for (const conversation of listed) {
    const known = ui.conversations.get(conversation.conversationId);
    ui.conversations.set(conversation.conversationId, { ...conversation, unread: known?.unread ?? 0 });
  }
  renderConversations();
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of ui.conversations.values()) {
    const item = document.createElement("li");
    item.dataset.conversationId = conversation.conversationId;
    item.setAttribute("aria-current", String(conversation.conversationId === ui.open));
    const name = document.createElement("span");
    name.textContent = `${titleOf(conversation)}${conversation.type === "direct" ? "" : " (group)"}`;
    const unread = document.createElement("span");
    unread.className = "unread";
    unread.textContent = conversation.unread ? String(conversation.unread) : "";
    item.append(name, unread);
    item.addEventListener("click", () => openConversation(conversation.conversationId));
    list.append(item);
  }
}

let refreshing = null;
function refreshConversations() {
  refreshing ??= ui.client
    .listConversations()
    .then(showConversations, (error) => notice(describeError(error)))
    .finally(() => (refreshing = null));
  return refreshing;
}

async function createConversation(event) {
  event.preventDefault();
  const members = $("members").value.split(",").map((m) => m.trim()).filter(Boolean);
  try {
    const created = await ui.client.createConversation({ type: $("kind").value, members });
    $("members").value = "";
    ui.conversations = new Map([[created.conversationId, { ...created, lastSeq: 0, unread: 0 }], ...ui.conversations]);
    renderConversations();
    openConversation(created.conversationId);
  } catch (error) {
    notice(describeError(error));
  }
}

// ---- one conversation -------------------------------------------------------------------

async function openConversation(conversationId) {
  const conversation = ui.conversations.get(conversationId);
  if (!conversation) return;
  ui.open = conversationId;
  conversation.unread = 0;
  renderConversations();
  $("empty").hidden = true;
  $("conversation").hidden = false;
  $("title").textContent = titleOf(conversation);
  $("subtitle").textContent = `${conversation.type} · ${conversation.members.length} members`;
  const list = $("messages");
  list.replaceChildren($("older") ?? olderMarker());
  ui.oldestSeq = null;

  const lastSeq = Math.max(conversation.lastSeq ?? 0, ui.client.lastSeq(conversationId) ?? 0);
  try {
    const page = await ui.client.historyBefore(conversationId, lastSeq + 1, PAGE);
    if (ui.open !== conversationId) return;
    for (const message of page) place(messageElement({ ...message, conversationId }));
    ui.oldestSeq = page.length ? page[0].seq : lastSeq + 1;
    watchOwn(page, conversationId);
  } catch (error) {
    notice(describeError(error));
  }
  updateOlderMarker();
  list.scrollTop = list.scrollHeight;
  fillScreen();
  // From the newest seq on screen: sync now, and after every reconnect.
  ui.client.track(conversationId, lastSeq);
  $("content").focus();
}

function olderMarker() {
  const marker = document.createElement("li");
  marker.id = "older";
  marker.className = "older muted";
  return marker;
}

function updateOlderMarker() {
  const marker = $("older");
  const more = ui.oldestSeq !== null && ui.oldestSeq > 1;
  marker.textContent = more ? "Loading older messages…" : "The beginning of the conversation";
  marker.dataset.more = String(more);
}

/** The user's own messages in a page of history: their receipts are asked for and followed. */
function watchOwn(page, conversationId) {
  for (const message of page) {
    if (message.senderId === ui.me) {
      ui.client.watch(message.messageId, conversationId, "sent", message.seq);
    }
  }
  ui.client.refreshStates();
}

async function loadOlder() {
  const conversationId = ui.open;
  if (ui.loadingOlder || !conversationId || ui.oldestSeq === null || ui.oldestSeq <= 1) return;
  ui.loadingOlder = true;
  const list = $("messages");
  const before = list.scrollHeight;
  try {
    const page = await ui.client.historyBefore(conversationId, ui.oldestSeq, PAGE);
    if (ui.open !== conversationId) return;
    for (const message of page) place(messageElement({ ...message, conversationId }));
    if (page.length) ui.oldestSeq = page[0].seq;
    else ui.oldestSeq = 1;
    watchOwn(page, conversationId);
    // Keep what the user was looking at where it was.
    list.scrollTop += list.scrollHeight - before;
  } catch (error) {
    notice(describeError(error));
  } finally {
    ui.loadingOlder = false;
    updateOlderMarker();
  }
  fillScreen();
}

/** Loads older pages while the top of the list is in view and there is more. */
function fillScreen() {
  const list = $("messages");
  const marker = $("older");
  if (marker.dataset.more !== "true") return;
  if (marker.getBoundingClientRect().bottom >= list.getBoundingClientRect().top) loadOlder();
}

function received(message, own) {
  const conversation = ui.conversations.get(message.conversationId);
  if (!conversation) {
    // Someone added this user to a conversation: list it.
    refreshConversations();
  }
  if (message.conversationId !== ui.open) {
    if (conversation && !own) {
      conversation.unread += 1;
      renderConversations();
    }
    return;
  }
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  place(messageElement(message));
  if (own) ui.client.watch(message.messageId, message.conversationId, "sent", message.seq);
  if (atBottom) list.scrollTop = list.scrollHeight;
}

// ---- messages on screen -----------------------------------------------------------------

function time(iso) {
  const at = iso ? new Date(iso) : new Date();
  return at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function messageElement(message) {
  const own = message.senderId === ui.me;
  const item = document.createElement("li");
  item.className = own ? "message own" : "message";
  item.dataset.messageId = message.messageId;
  item.dataset.seq = String(message.seq);
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = message.content;
  const meta = document.createElement("div");
  meta.className = "meta";
  const who = document.createElement("span");
  who.textContent = own ? "you" : message.senderId;
  const when = document.createElement("span");
  when.textContent = time(message.acceptedAt);
  meta.append(who, when);
  item.append(bubble, meta);
  if (own) {
    const state = document.createElement("span");
    state.className = "state";
    meta.append(state);
    setState(item, "sent");
  } else {
    ui.readObserver.observe(item);
  }
  return item;
}

/** Puts a message where its seq says (pending own messages stay at the bottom). */
function place(item) {
  const list = $("messages");
  const seq = Number(item.dataset.seq);
  const same = list.querySelector(`li.message[data-seq="${seq}"]`);
  if (same) return;
  const after = [...list.querySelectorAll("li.message[data-seq]")].find((li) => Number(li.dataset.seq) > seq);
  if (after) after.before(item);
  else {
    const firstPending = list.querySelector("li.message:not([data-seq])");
    if (firstPending) firstPending.before(item);
    else list.append(item);
  }
}

const STATE_WORDS = {
  queued: "waiting for connection",
  pending: "pending",
  sent: "sent",
  delivered: "delivered",
  read: "read",
  failed: "not sent",
  rejected: "not sent",
};

function setState(item, state) {
  item.dataset.state = state;
  const states = item.dataset.states ? item.dataset.states.split(" ") : [];
  if (states[states.length - 1] !== state) states.push(state);
  item.dataset.states = states.join(" ");
  const label = item.querySelector(".state");
  if (label) label.textContent = STATE_WORDS[state] ?? state;
}

function showProblem(item, error, retry) {
  item.querySelector(".problem")?.remove();
  const problem = document.createElement("div");
  problem.className = "problem";
  problem.dataset.code = error.code;
  problem.textContent = describeError(error);
  if (retry) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Retry";
    button.addEventListener("click", retry);
    problem.append(button);
  }
  item.append(problem);
}

function ownElement(clientMessageId) {
  return $("messages").querySelector(`li[data-client-id="${CSS.escape(clientMessageId)}"]`);
}

function stateChanged(event) {
  const item =
    (event.clientMessageId && ownElement(event.clientMessageId)) ||
    $("messages").querySelector(`li[data-message-id="${CSS.escape(event.messageId)}"]`);
  if (!item) return;
  item.dataset.messageId = event.messageId;
  if (event.state === "rejected") {
    setState(item, "rejected");
    showProblem(item, { code: event.reason?.code, message: event.reason?.message ?? "refused" });
    return;
  }
  setState(item, event.state);
  if (event.seq !== undefined && item.dataset.seq === undefined) {
    item.dataset.seq = String(event.seq);
    item.remove();
    place(item);
  }
}

// ---- sending ----------------------------------------------------------------------------

function send(event) {
  event?.preventDefault();
  const box = $("content");
  const content = box.value;
  if (!content.trim() || !ui.open) return;
  box.value = "";
  const input = { conversationId: ui.open, content, clientMessageId: `web-${crypto.randomUUID()}` };
  const item = document.createElement("li");
  item.className = "message own";
  item.dataset.clientId = input.clientMessageId;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = content;
  const meta = document.createElement("div");
  meta.className = "meta";
  const when = document.createElement("span");
  when.textContent = time();
  const state = document.createElement("span");
  state.className = "state";
  meta.append(when, state);
  item.append(bubble, meta);
  $("messages").append(item);
  $("messages").scrollTop = $("messages").scrollHeight;
  setState(item, ui.client.connectionState === "open" ? "pending" : "queued");
  transmit(item, input);
}

/** Sends (or sends again, with the same clientMessageId: never a second message). */
function transmit(item, input) {
  item.querySelector(".problem")?.remove();
  ui.client.send(input).then(
    (ack) => {
      item.dataset.messageId = ack.messageId;
      if (item.dataset.state === "queued" || item.dataset.state === "failed") setState(item, "pending");
    },
    (error) => {
      setState(item, "failed");
      // Sending the same message again (same clientMessageId) helps only after a wait.
      const later = error.code === "RATE_LIMIT_EXCEEDED" || error.status === 503 || error.code === "NETWORK_ERROR";
      showProblem(item, error, later ? () => transmit(item, input) : null);
    },
  );
}

// ---- read receipts ----------------------------------------------------------------------

/** A message from someone else is read once it is on screen while the page is visible. */
function markVisibleRead(entries) {
  if (document.visibilityState !== "visible") return;
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    const item = entry.target;
    const messageId = item.dataset.messageId;
    if (!messageId || item.dataset.read === "true") continue;
    item.dataset.read = "true";
    ui.readObserver.unobserve(item);
    ui.client.ack(messageId, "read").catch((error) => {
      // Not a recipient (e.g. sent before this user joined): nothing to tell the sender.
      if (error.code !== "MESSAGE_NOT_FOUND") notice(describeError(error));
    });
  }
}

function readWhatIsVisible() {
  const list = $("messages");
  const box = list.getBoundingClientRect();
  const entries = [...list.querySelectorAll("li.message:not(.own):not([data-read])")].map((target) => {
    const r = target.getBoundingClientRect();
    return { target, isIntersecting: r.bottom > box.top && r.top < box.bottom };
  });
  markVisibleRead(entries);
}

// ---- start ------------------------------------------------------------------------------

function start() {
  ui.readObserver = new IntersectionObserver(markVisibleRead, { root: $("messages"), threshold: 0.5 });
  ui.olderObserver = new IntersectionObserver(
    (entries) => entries.some((e) => e.isIntersecting) && loadOlder(),
    { root: $("messages") },
  );
  ui.olderObserver.observe($("older"));
  document.addEventListener("visibilitychange", readWhatIsVisible);

  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = $("signin-error");
    error.hidden = true;
    try {
      await signIn($("token").value.trim());
    } catch (failure) {
      error.textContent = failure.code ? describeError(failure) : failure.message;
      error.hidden = false;
    }
  });
  $("signout").addEventListener("click", signOut);
  $("refresh").addEventListener("click", refreshConversations);
  $("new-conversation").addEventListener("submit", createConversation);
  $("composer").addEventListener("submit", send);
  $("content").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });

  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved).catch(() => sessionStorage.removeItem(TOKEN_KEY));
}

start();
