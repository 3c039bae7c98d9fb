// The Hotpath the tests talk to: the one named by HOTPATH_URL (with HOTPATH_BIN and
// HOTPATH_DATA_DIR to mint tokens, as cli/tests/webclient.rs passes them), or else a
// `hotpath up` started here on a free port in a temporary directory and stopped at exit.
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, openSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

function freePort() {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

/** Starts `hotpath up` and resolves once it printed its banner (60 s at most). */
async function startUp(bin) {
  const dataDir = join(mkdtempSync(join(tmpdir(), "hotpath-js-")), "data");
  const port = await freePort();
  // Its log goes next to its data, for reading when a test fails.
  const log = openSync(`${dataDir}.log`, "a");
  const child = spawn(bin, ["up", "--data-dir", dataDir, "--listen", `127.0.0.1:${port}`], {
    env: {
      ...process.env,
      HOTPATH_POLICY_DIR: join(ROOT, "policies/dist"),
      // As cli/tests/webclient.rs: low enough that the tests reach the limit with a few sends.
      HOTPATH_RATE_PER_USER: "20",
      HOTPATH_RATE_BURST: "10",
    },
    stdio: ["ignore", "pipe", log],
  });
  process.on("exit", () => child.kill("SIGINT"));
  await new Promise((done, fail) => {
    const timer = setTimeout(() => fail(new Error("hotpath up: no banner within 60 s")), 60000);
    child.on("exit", (code) => fail(new Error(`hotpath up exited with ${code}`)));
    let seen = "";
    child.stdout.on("data", (chunk) => {
      seen += chunk;
      if (seen.includes("Hotpath is up")) {
        clearTimeout(timer);
        done();
      }
    });
  });
  child.stdout.resume();
  return { url: `http://127.0.0.1:${port}`, bin, dataDir };
}

let stack;

/** The stack under test: `{url, bin, dataDir}`. */
export async function hotpath() {
  if (!stack) {
    const bin = process.env.HOTPATH_BIN ?? join(ROOT, "target/debug/hotpath");
    stack = process.env.HOTPATH_URL
      ? { url: process.env.HOTPATH_URL, bin, dataDir: process.env.HOTPATH_DATA_DIR }
      : startUp(bin);
  }
  return stack;
}

/** A development token for `user` (`hotpath token`), valid for `ttlSecs`. */
export async function token(user, ttlSecs = 3600) {
  const { bin, dataDir } = await hotpath();
  const args = ["token", user, "--data-dir", dataDir, "--ttl-secs", String(ttlSecs)];
  return execFileSync(bin, args, { encoding: "utf8" }).trim();
}

/** A user id no earlier run against the same stack has used. */
export function user(name) {
  return `${name}-${Math.random().toString(36).slice(2, 10)}`;
}

/** Resolves with the first event of `type` from `client` that `accept` takes (10 s at most). */
export function next(client, type, accept = () => true, ms = 10000) {
  return new Promise((done, fail) => {
    const timer = setTimeout(() => {
      off();
      fail(new Error(`no ${type} event within ${ms} ms`));
    }, ms);
    const off = client.on(type, (event) => {
      if (!accept(event)) return;
      clearTimeout(timer);
      off();
      done(event);
    });
  });
}

/** Resolves once `condition()` holds, checked after each event of `type` (10 s at most). */
export function until(client, type, condition, ms = 10000) {
  if (condition()) return Promise.resolve();
  return next(client, type, () => condition(), ms).then(() => undefined);
}
