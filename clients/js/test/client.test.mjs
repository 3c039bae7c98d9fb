// The client library against a real Hotpath (`hotpath up`): node --experimental-websocket --test
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { HotpathClient, HotpathError, backoffDelay, newClientMessageId } from "../hotpath.js";
import { hotpath, next, token, until, user } from "../support/stack.mjs";

const TIMEOUT = { timeout: 30000 };
const clients = [];

after(() => {
  for (const client of clients) client.close();
});

/** A client for `name` (a fresh user id), with its events recorded. */
async function clientFor(name, options = {}) {
  const { url } = await hotpath();
  const id = user(name);
  const jwt = await token(id);
  const client = new HotpathClient({ baseUrl: url, token: jwt, ...options });
  client.id = id;
  client.messages = [];
  client.states = new Map();
  client.on("message", ({ message }) => client.messages.push(message));
  client.on("state", ({ messageId, state }) => {
    client.states.set(messageId, [...(client.states.get(messageId) ?? []), state]);
  });
  clients.push(client);
  return client;
}

function contents(client, conversationId) {
  return client.messages
    .filter((m) => m.conversationId === conversationId)
    .map((m) => `${m.seq}:${m.content}`);
}

/** Sends each text in order, waiting until each one is persisted. */
async function sendAll(client, conversationId, texts) {
  for (const content of texts) {
    const ack = await client.send({ conversationId, content });
    await until(client, "state", () => client.states.get(ack.messageId)?.includes("sent"));
  }
}

describe("the pieces without a server", () => {
  test("backoff grows exponentially, keeps half of it, and stops at its ceiling", () => {
    assert.equal(backoffDelay(0, 500, 15000, () => 0), 250);
    assert.equal(backoffDelay(0, 500, 15000, () => 1), 500);
    assert.equal(backoffDelay(3, 500, 15000, () => 0), 2000);
    assert.equal(backoffDelay(10, 500, 15000, () => 1), 15000);
    assert.equal(backoffDelay(60, 500, 15000, () => 0), 7500);
  });

  test("client message ids are unique", () => {
    const ids = new Set(Array.from({ length: 1000 }, newClientMessageId));
    assert.equal(ids.size, 1000);
  });

  test("a WebSocket error frame gets the status of its code", () => {
    const error = HotpathError.fromBody({
      error: { code: "RATE_LIMIT_EXCEEDED", message: "slow down", details: { retryAfterSeconds: 2 } },
    });
    assert.equal(error.status, 429);
    assert.equal(error.retryAfterSeconds, 2);
    assert.equal(error.retryable, false);
    const full = HotpathError.fromBody({
      error: { code: "BACKLOG_FULL", message: "later", details: { retryAfterSeconds: 1 } },
    });
    assert.equal(full.status, 503);
    assert.equal(full.retryable, true);
  });
});

describe("against hotpath up", () => {
  test("a message goes pending -> sent -> delivered -> read, and the receiver gets it once", TIMEOUT, async () => {
    const alice = await clientFor("alice");
    const bob = await clientFor("bob", { autoDelivered: false });
    const conversation = await alice.createConversation({ type: "group", members: [bob.id] });
    const id = conversation.conversationId;
    await Promise.all([alice.connect(), bob.connect()]);
    alice.track(id, 0);
    bob.track(id, 0);
    await next(bob, "synced", (e) => e.conversationId === id);

    const ack = await alice.send({ conversationId: id, content: "hello bob" });
    assert.equal(ack.state, "pending");
    assert.equal(ack.idempotentHit, false);
    assert.match(ack.clientMessageId, /^c-/);
    await until(bob, "message", () => bob.messages.length === 1);
    const [received] = bob.messages;
    assert.equal(received.messageId, ack.messageId);
    assert.equal(received.senderId, alice.id);
    assert.equal(received.seq, 1);
    await until(alice, "state", () => alice.states.get(ack.messageId)?.includes("sent"));

    await bob.ack(received.messageId, "delivered");
    await until(alice, "state", () => alice.states.get(ack.messageId)?.includes("delivered"));
    await bob.ack(received.messageId, "read");
    await until(alice, "state", () => alice.states.get(ack.messageId)?.includes("read"));
    assert.deepEqual(alice.states.get(ack.messageId), ["pending", "sent", "delivered", "read"]);
    assert.equal(alice.lastSeq(id), 1, "the sender's own message counts in its seq");
    assert.equal((await alice.status(ack.messageId)).state, "read");
  });

  test("by default a received message is acked delivered at once", TIMEOUT, async () => {
    const alice = await clientFor("alice");
    const bob = await clientFor("bob");
    const { conversationId: id } = await alice.createConversation({ type: "direct", members: [bob.id] });
    await Promise.all([alice.connect(), bob.connect()]);
    const ack = await alice.send({ conversationId: id, content: "ping" });
    await until(alice, "state", () => alice.states.get(ack.messageId)?.includes("delivered"));
    assert.deepEqual(alice.states.get(ack.messageId), ["pending", "sent", "delivered"]);
  });

  test("a send whose socket dropped before its answer is sent again and stored once", TIMEOUT, async () => {
    const alice = await clientFor("alice", { reconnectBaseMs: 50 });
    const { conversationId: id } = await alice.createConversation({ type: "group", members: [] });
    await alice.connect();
    const sending = alice.send({ conversationId: id, content: "once", clientMessageId: "m-1" });
    alice.networkLost();
    assert.equal(alice.pendingSends.length, 1, "kept until answered");
    const ack = await sending;
    assert.equal(alice.pendingSends.length, 0);
    await until(alice, "state", () => alice.states.get(ack.messageId)?.includes("sent"));

    const again = await alice.send({ conversationId: id, content: "once", clientMessageId: "m-1" });
    assert.equal(again.messageId, ack.messageId);
    assert.equal(again.idempotentHit, true);
    const page = await alice.history(id);
    assert.deepEqual(page.messages.map((m) => m.content), ["once"]);
  });

  test("sends made while offline wait in the outbox and go out in order on connect", TIMEOUT, async () => {
    const alice = await clientFor("alice");
    const { conversationId: id } = await alice.createConversation({ type: "group", members: [] });
    const sends = ["one", "two", "three"].map((content) => alice.send({ conversationId: id, content }));
    assert.equal(alice.pendingSends.length, 3);
    await alice.connect();
    const acks = await Promise.all(sends);
    await until(alice, "state", () => acks.every((a) => alice.states.get(a.messageId)?.includes("sent")));
    const page = await alice.history(id);
    assert.deepEqual(page.messages.map((m) => `${m.seq}:${m.content}`), ["1:one", "2:two", "3:three"]);
  });

  test("after the network drops, reconnects with growing backoff and catches up by seq", TIMEOUT, async () => {
    const alice = await clientFor("alice");
    let offline = false;
    // A WebSocket that cannot reach the gateway while `offline`: port 9 on loopback refuses.
    class FlakyWebSocket extends WebSocket {
      constructor(url) {
        super(offline ? "ws://127.0.0.1:9/v1/ws" : url);
      }
    }
    const bob = await clientFor("bob", { WebSocket: FlakyWebSocket, reconnectBaseMs: 100, reconnectMaxMs: 400 });
    const { conversationId: id } = await alice.createConversation({ type: "group", members: [bob.id] });
    await Promise.all([alice.connect(), bob.connect()]);
    bob.track(id, 0);
    await sendAll(alice, id, ["before"]);
    await until(bob, "message", () => bob.messages.length === 1);

    const delays = [];
    bob.on("connection", (e) => e.delayMs !== undefined && delays.push(e));
    offline = true;
    bob.networkLost();
    await until(bob, "connection", () => delays.length >= 3);
    await sendAll(alice, id, ["while", "away"]);
    offline = false;
    await until(bob, "message", () => bob.messages.length === 3);

    assert.deepEqual(contents(bob, id), ["1:before", "2:while", "3:away"]);
    assert.deepEqual(delays.slice(0, 3).map((d) => d.attempt), [1, 2, 3]);
    assert.ok(delays[2].delayMs >= 200, `the third wait is at least half of 400 ms: ${delays[2].delayMs}`);
    assert.equal(bob.lastSeq(id), 3);
  });

  test("messages that arrive twice (sync over live) are emitted once, by (conversationId, seq)", TIMEOUT, async () => {
    const alice = await clientFor("alice");
    const bob = await clientFor("bob");
    const { conversationId: id } = await alice.createConversation({ type: "group", members: [bob.id] });
    await Promise.all([alice.connect(), bob.connect()]);
    bob.track(id, 0);
    await sendAll(alice, id, ["a", "b", "c"]);
    await until(bob, "message", () => bob.messages.length === 3);

    let duplicates = 0;
    bob.on("duplicate", () => (duplicates += 1));
    // The whole conversation again, as a reconnect's sync overlapping live frames would bring it.
    bob.transmit({ type: "sync", reqId: "again", conversationId: id, afterSeq: 0 });
    await until(bob, "duplicate", () => duplicates === 3);
    assert.deepEqual(contents(bob, id), ["1:a", "2:b", "3:c"]);
  });

  test("tracking from a seq syncs only what comes after it", TIMEOUT, async () => {
    const alice = await clientFor("alice");
    const { conversationId: id } = await alice.createConversation({ type: "group", members: [] });
    await alice.connect();
    await sendAll(alice, id, ["1", "2", "3", "4"]);
    const { url } = await hotpath();
    const other = new HotpathClient({ baseUrl: url, token: await token(alice.id) });
    clients.push(other);
    const got = [];
    other.on("message", ({ message, own }) => got.push([message.seq, own]));
    await other.connect();
    other.track(id, 2);
    await next(other, "synced", (e) => e.conversationId === id);
    assert.deepEqual(got, [[3, true], [4, true]], "another device of the sender gets its messages, marked own");
    assert.equal(other.lastSeq(id), 4);
  });

  test("listing conversations gives lastSeq, and history reads back page by page", TIMEOUT, async () => {
    const alice = await clientFor("alice");
    const { conversationId: id } = await alice.createConversation({ type: "group", members: ["zed"] });
    await alice.connect();
    await sendAll(alice, id, ["m1", "m2", "m3", "m4", "m5"]);
    const listed = await alice.listConversations();
    const mine = listed.find((c) => c.conversationId === id);
    assert.equal(mine.lastSeq, 5);
    assert.equal(mine.type, "group");
    assert.deepEqual(mine.members, [alice.id, "zed"].sort());
    const newest = await alice.historyBefore(id, mine.lastSeq + 1, 2);
    assert.deepEqual(newest.map((m) => m.seq), [4, 5]);
    const older = await alice.historyBefore(id, 4, 2);
    assert.deepEqual(older.map((m) => m.seq), [2, 3]);
    const oldest = await alice.historyBefore(id, 2, 2);
    assert.deepEqual(oldest.map((m) => m.seq), [1]);
    assert.deepEqual(await alice.historyBefore(id, 1, 2), []);
  });

  test("refusals are HotpathErrors with the HTTP status: 403, 413, 429, 404", TIMEOUT, async () => {
    const alice = await clientFor("alice");
    const carol = await clientFor("carol");
    const { conversationId: id } = await alice.createConversation({ type: "group", members: [] });
    await Promise.all([alice.connect(), carol.connect()]);

    const forbidden = await carol.send({ conversationId: id, content: "let me in" }).catch((e) => e);
    assert.ok(forbidden instanceof HotpathError);
    assert.equal(forbidden.status, 403);
    assert.equal(forbidden.code, "NOT_CONVERSATION_MEMBER");

    const large = await alice.send({ conversationId: id, content: "x".repeat(70000) }).catch((e) => e);
    assert.equal(large.status, 413);
    assert.equal(large.code, "PAYLOAD_TOO_LARGE");

    const missing = await alice.history("00000000-0000-4000-8000-000000000000").catch((e) => e);
    assert.equal(missing.status, 404);
    assert.equal(missing.code, "CONVERSATION_NOT_FOUND");

    const own = await alice.send({ conversationId: id, content: "mine" });
    await until(alice, "state", () => alice.states.get(own.messageId)?.includes("sent"));
    const selfAck = await alice.ack(own.messageId, "read").catch((e) => e);
    assert.equal(selfAck.code, "MESSAGE_NOT_FOUND");

    const burst = Array.from({ length: 150 }, (_, i) => alice.send({ conversationId: id, content: `f${i}` }));
    const outcomes = await Promise.allSettled(burst);
    const limited = outcomes.filter((o) => o.status === "rejected").map((o) => o.reason);
    assert.ok(limited.length > 0, "a burst past the rate limit is refused in part");
    for (const error of limited) {
      assert.equal(error.status, 429);
      assert.equal(error.code, "RATE_LIMIT_EXCEEDED");
      assert.ok(error.retryAfterSeconds >= 1);
      assert.match(error.clientMessageId, /^c-/);
    }
  });

  test("a token about to expire is refreshed on the open socket", TIMEOUT, async () => {
    const { url } = await hotpath();
    const id = user("dora");
    // The first token has less left than the gateway's expiry notice, so the notice comes at once.
    const tokens = [await token(id, 20), await token(id, 3600)];
    let asked = 0;
    const client = new HotpathClient({ baseUrl: url, token: () => tokens[Math.min(asked++, 1)] });
    clients.push(client);
    const refreshed = next(client, "tokenRefreshed");
    await client.connect();
    const { expiresAt } = await refreshed;
    assert.ok(Date.parse(expiresAt) > Date.now() + 3000 * 1000, `refreshed until ${expiresAt}`);
    assert.equal(client.connectionState, "open");
  });
});
