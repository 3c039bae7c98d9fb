// The web client end to end, in Debian's Chromium driven by playwright-core: two users in two
// browser contexts exchange messages and see their states go pending -> sent -> delivered ->
// read; one goes offline and catches up when it is back; history scrolls back to seq 1; the
// refusals (413, 429, 403) are shown in plain words. Screenshots go to $HOTPATH_E2E_ARTIFACTS
// (default target/e2e/).
//
// Run against a running Hotpath: HOTPATH_URL, HOTPATH_BIN and HOTPATH_DATA_DIR as
// cli/tests/webclient.rs sets them (clients/js/support/stack.mjs starts `hotpath up` itself
// when HOTPATH_URL is unset). scripts/setup.sh (ensure_browser_tools) installs Chromium and
// playwright-core into .tools/node.
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import { hotpath, token, user } from "../../clients/js/support/stack.mjs";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const ARTIFACTS = process.env.HOTPATH_E2E_ARTIFACTS ?? join(ROOT, "target/e2e");
const MODULES = process.env.HOTPATH_NODE_MODULES ?? join(ROOT, ".tools/node/node_modules");
const WAIT = { timeout: 20000 };

// Everything below is bounded; this is the bound of the whole.
const watchdog = setTimeout(() => {
  console.error("the end-to-end test did not finish within 150 s");
  process.exit(1);
}, 150000);

const { chromium } = await import(pathToFileURL(join(MODULES, "playwright-core/index.mjs")).href);

function step(text) {
  console.log(`- ${text}`);
}

async function shoot(page, name) {
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path });
  console.log(`  screenshot ${path}`);
}

/** A browser context for a new user, signed in on the web client. */
async function signedIn(browser, name, base) {
  const id = user(name);
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (error) => page.errors.push(String(error)));
  // Console errors are expected (a WebSocket that cannot connect while offline): shown, not failed.
  page.on("console", (message) => message.type() === "error" && console.log(`  ${name}'s console: ${message.text()}`));
  await page.goto(`${base}/`);
  await page.fill("#token", await token(id));
  await page.click("#signin-form button[type=submit]");
  await page.waitForSelector("#app:not([hidden])", WAIT);
  await page.waitForSelector('#connection[data-state="open"]', WAIT);
  assert.equal(await page.textContent("#me"), id);
  return { id, context, page };
}

async function sendFromPage(page, text) {
  await page.fill("#content", text);
  await page.press("#content", "Enter");
}

/** The messages on screen, in order: seq (or "-" while unknown), content, own state. */
function messagesOn(page) {
  return page.$$eval("#messages li.message", (items) =>
    items.map((li) => ({
      seq: li.dataset.seq ?? "-",
      content: li.querySelector(".bubble").textContent,
      own: li.classList.contains("own"),
      state: li.dataset.state,
      states: li.dataset.states,
      problem: li.querySelector(".problem")?.dataset.code,
      problemText: li.querySelector(".problem")?.textContent,
    })),
  );
}

/** Waits until the own message with `content` has been in `state` (it may have moved on). */
function ownMessageIn(page, content, state) {
  return page.waitForFunction(
    ([text, wanted]) =>
      [...document.querySelectorAll("#messages li.message.own")].some(
        (li) =>
          li.querySelector(".bubble").textContent === text &&
          (li.dataset.states ?? "").split(" ").includes(wanted),
      ),
    [content, state],
    WAIT,
  );
}

function messageShown(page, content) {
  return page.waitForFunction(
    (text) =>
      [...document.querySelectorAll("#messages li.message .bubble")].some((b) => b.textContent === text),
    content,
    WAIT,
  );
}

async function openConversation(page, conversationId) {
  const item = `#conversations li[data-conversation-id="${conversationId}"]`;
  await page.waitForSelector(item, WAIT);
  await page.click(item);
  await page.waitForSelector("#conversation:not([hidden])", WAIT);
}

/** Sends over HTTP as `jwt`, waiting out each 429's Retry-After with the same clientMessageId. */
async function seed(base, jwt, conversationId, count) {
  for (let i = 1; i <= count; i += 1) {
    const body = JSON.stringify({ conversationId, content: `history ${i}`, contentType: "text", clientMessageId: `seed-${i}` });
    for (let attempt = 0; ; attempt += 1) {
      const response = await fetch(`${base}/v1/messages`, {
        method: "POST",
        headers: { Authorization: `Bearer ${jwt}`, "Content-Type": "application/json" },
        body,
      });
      if (response.status === 202) break;
      assert.ok(response.status === 429 && attempt < 20, `seed send answered ${response.status}`);
      await new Promise((done) => setTimeout(done, 1000 * Number(response.headers.get("Retry-After") ?? 1)));
    }
  }
}

async function exchange(alice, bob) {
  step("alice starts a group conversation with bob and says hello");
  await alice.page.fill("#members", bob.id);
  await alice.page.click("#new-conversation button[type=submit]");
  await alice.page.waitForSelector("#conversation:not([hidden])", WAIT);
  await sendFromPage(alice.page, "Hi Bob! Lunch at noon?");
  await ownMessageIn(alice.page, "Hi Bob! Lunch at noon?", "sent");
  const conversationId = await alice.page.$eval('#conversations li[aria-current="true"]', (li) => li.dataset.conversationId);

  step("bob, already signed in, sees the new conversation arrive, opens it: alice sees it read");
  await openConversation(bob.page, conversationId);
  await messageShown(bob.page, "Hi Bob! Lunch at noon?");
  await ownMessageIn(alice.page, "Hi Bob! Lunch at noon?", "read");
  const [hello] = await messagesOn(alice.page);
  assert.equal(hello.states, "pending sent delivered read", "every state, in order");
  assert.equal(hello.seq, "1");

  step("bob answers; alice sees it live, and bob sees his own message read");
  await sendFromPage(bob.page, "Sure — see you at the usual place.");
  await messageShown(alice.page, "Sure — see you at the usual place.");
  await ownMessageIn(bob.page, "Sure — see you at the usual place.", "read");
  return conversationId;
}

async function offlineAndBack(alice, bob) {
  step("bob goes offline; alice keeps writing");
  await bob.context.setOffline(true);
  await bob.page.waitForSelector('#connection[data-state="reconnecting"]', WAIT);
  const missed = ["Are you still there?", "The place is full, we moved next door.", "Table by the window."];
  for (const text of missed) await sendFromPage(alice.page, text);
  for (const text of missed) await ownMessageIn(alice.page, text, "sent");
  const whileAway = await messagesOn(bob.page);
  assert.ok(!whileAway.some((m) => missed.includes(m.content)), "nothing reaches bob while offline");
  await shoot(bob.page, "bob-offline");

  step("bob is back: his client reconnects, syncs from its last seq and reads what he missed");
  await bob.context.setOffline(false);
  await bob.page.waitForSelector('#connection[data-state="open"]', WAIT);
  for (const text of missed) await messageShown(bob.page, text);
  for (const text of missed) await ownMessageIn(alice.page, text, "read");
  const seqs = (await messagesOn(bob.page)).map((m) => m.seq);
  assert.deepEqual(seqs, ["1", "2", "3", "4", "5"], "each message once, in seq order");
  const states = (await messagesOn(alice.page)).filter((m) => m.own).map((m) => m.state);
  assert.deepEqual(states, ["read", "read", "read", "read"]);
  await shoot(bob.page, "bob-caught-up");
  await shoot(alice.page, "webclient");
}

async function scrollBack(base, alice) {
  step("a long conversation opens at its newest page and scrolls back to seq 1");
  const carol = user("carol");
  const carolToken = await token(carol);
  const created = await fetch(`${base}/v1/conversations`, {
    method: "POST",
    headers: { Authorization: `Bearer ${carolToken}`, "Content-Type": "application/json" },
    body: JSON.stringify({ type: "direct", members: [alice.id] }),
  }).then((r) => r.json());
  await seed(base, carolToken, created.conversationId, 70);
  await alice.page.click("#refresh");
  await openConversation(alice.page, created.conversationId);
  await messageShown(alice.page, "history 70");
  const first = await messagesOn(alice.page);
  assert.ok(first.length < 70, `only the newest page at first (${first.length})`);
  assert.equal(first[first.length - 1].seq, "70");
  for (let i = 0; i < 10; i += 1) {
    if ((await alice.page.getAttribute("#older", "data-more")) === "false") break;
    const before = (await messagesOn(alice.page)).length;
    await alice.page.$eval("#messages", (list) => (list.scrollTop = 0));
    await alice.page.waitForFunction(
      (count) => document.querySelectorAll("#messages li.message").length > count ||
        document.getElementById("older").dataset.more === "false",
      before,
      WAIT,
    );
  }
  const all = (await messagesOn(alice.page)).map((m) => Number(m.seq));
  assert.deepEqual(all, Array.from({ length: 70 }, (_, i) => i + 1));
  assert.equal(await alice.page.textContent("#older"), "The beginning of the conversation");
  return created.conversationId;
}

async function notAMember(base, alice, bob, conversationId) {
  step("removed from the conversation, alice is told she is not a member (403)");
  const removed = await fetch(`${base}/v1/conversations/${conversationId}/members/${alice.id}`, {
    method: "DELETE",
    headers: { Authorization: `Bearer ${await token(bob.id)}` },
  });
  assert.equal(removed.status, 200);
  await openConversation(alice.page, conversationId);
  await sendFromPage(alice.page, "Can I still write here?");
  await alice.page.waitForSelector('.problem[data-code="NOT_CONVERSATION_MEMBER"]', WAIT);
  const [refused] = (await messagesOn(alice.page)).filter((m) => m.problem === "NOT_CONVERSATION_MEMBER");
  assert.match(refused.problemText, /not a member of this conversation/);
}

async function tooLargeAndTooFast(alice, conversationId) {
  step("a message over the size limit (413) and a burst over the rate limit (429) are explained");
  await openConversation(alice.page, conversationId);
  await sendFromPage(alice.page, "x".repeat(70000));
  await alice.page.waitForSelector('.problem[data-code="PAYLOAD_TOO_LARGE"]', WAIT);
  await alice.page.evaluate(() => {
    const form = document.getElementById("composer");
    for (let i = 1; i <= 15; i += 1) {
      document.getElementById("content").value = `quick ${i}`;
      form.requestSubmit();
    }
  });
  await alice.page.waitForSelector('.problem[data-code="RATE_LIMIT_EXCEEDED"]', WAIT);
  const shown = await messagesOn(alice.page);
  const tooLarge = shown.find((m) => m.problem === "PAYLOAD_TOO_LARGE");
  assert.match(tooLarge.problemText, /too large to send/);
  const tooFast = shown.find((m) => m.problem === "RATE_LIMIT_EXCEEDED");
  assert.match(tooFast.problemText, /sending too fast\. You can send again in \d+ seconds?\./);
  await alice.page.$eval("#messages", (list) => (list.scrollTop = list.scrollHeight));
  await shoot(alice.page, "refusals");
}

async function main() {
  mkdirSync(ARTIFACTS, { recursive: true });
  const { url: base } = await hotpath();
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: 30000,
  });
  try {
    const alice = await signedIn(browser, "alice", base);
    const bob = await signedIn(browser, "bob", base);
    try {
      const conversationId = await exchange(alice, bob);
      await offlineAndBack(alice, bob);
      const long = await scrollBack(base, alice);
      await notAMember(base, alice, bob, conversationId);
      await tooLargeAndTooFast(alice, long);
      assert.deepEqual(bob.page.errors, [], "no script errors in bob's page");
      assert.deepEqual(alice.page.errors, [], "no script errors in alice's page");
    } catch (error) {
      for (const [name, who] of [["alice", alice], ["bob", bob]]) {
        await shoot(who.page, `failure-${name}`).catch(() => {});
        const shown = await messagesOn(who.page).catch(() => []);
        const brief = shown.map((m) => ({ ...m, content: m.content.slice(0, 40) }));
        console.log(`  ${name}'s messages: ${JSON.stringify(brief)}`);
      }
      throw error;
    }
  } finally {
    await browser.close();
  }
  console.log("the web client works end to end");
}

main().then(
  () => {
    clearTimeout(watchdog);
    process.exit(0);
  },
  (error) => {
    console.error(error);
    process.exit(1);
  },
);
