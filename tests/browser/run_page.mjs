// Driver for tests/integration/browser.rs: opens mqtt_page.html (file://) in headless Debian
// Chromium through playwright-core, waits (bounded) for the page's MQTT exchange with Herald,
// takes a screenshot, prints ONE JSON line on stdout and exits 0 only on success.
//
//   node tests/browser/run_page.mjs --port 8083 --client-id 'GID_demo@@@browser' \
//     --username 'Signature|demo|herald-demo' --password '...' \
//     [--screenshot out.png] [--user-data-dir DIR] [--timeout-ms 20000] [--chromium /usr/bin/chromium]
//
// Needs: apt-get install -y chromium; npm ci --prefix tests/browser

import { mkdtempSync, rmSync, existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const { values: opts } = parseArgs({
  options: {
    port: { type: "string" },
    "client-id": { type: "string" },
    username: { type: "string" },
    password: { type: "string" },
    screenshot: { type: "string" },
    "user-data-dir": { type: "string" },
    "timeout-ms": { type: "string", default: "20000" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});

const started = Date.now();
const timeoutMs = Number(opts["timeout-ms"]);
const result = { ok: false };
let exitCode = 1;

function emit() {
  result.elapsedMs = Date.now() - started;
  process.stdout.write(JSON.stringify(result) + "\n");
}

// A hard bound on the whole run, whatever Chromium does.
const hardStop = setTimeout(() => {
  result.error = `driver gave up after ${timeoutMs + 10000} ms`;
  emit();
  process.exit(1);
}, timeoutMs + 10000);
hardStop.unref();

for (const name of ["port", "client-id", "username", "password"]) {
  if (!opts[name]) {
    result.error = `missing --${name}`;
    emit();
    process.exit(2);
  }
}
if (!existsSync(opts.chromium)) {
  result.error = `${opts.chromium} not found: apt-get install -y chromium`;
  emit();
  process.exit(2);
}

// A fresh, empty profile: inside the directory we were given, or a new temporary one.
let ownProfile = false;
let profile;
if (opts["user-data-dir"]) {
  profile = join(opts["user-data-dir"], "chromium-profile");
  rmSync(profile, { recursive: true, force: true });
  mkdirSync(profile, { recursive: true });
} else {
  profile = mkdtempSync(join(tmpdir(), "herald-chromium-"));
  ownProfile = true;
}

const query = new URLSearchParams({
  port: opts.port,
  clientId: opts["client-id"],
  username: opts.username,
  password: opts.password,
});
const pageUrl = `${pathToFileURL(join(here, "mqtt_page.html")).href}?${query}`;

const consoleLines = [];
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium,
    headless: true,
    timeout: timeoutMs,
    viewport: { width: 900, height: 420 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  await page.goto(pageUrl, { timeout: timeoutMs });
  const left = Math.max(1000, timeoutMs - (Date.now() - started));
  try {
    await page.waitForFunction(() => window.heraldResult !== undefined, null, {
      timeout: left,
      polling: 100,
    });
  } catch (e) {
    result.error = `no result from the page within ${left} ms`;
  }
  const pageResult = await page.evaluate(() => window.heraldResult ?? null);
  if (pageResult) Object.assign(result, pageResult);
  if (pageResult?.ok) {
    // Let the page log its clean disconnect before the picture (bounded, not required).
    await page
      .waitForFunction(() => document.getElementById("log").textContent.includes("disconnected"), null, {
        timeout: 2000,
        polling: 50,
      })
      .catch(() => {});
  }
  result.title = await page.title();
  result.log = await page.$$eval("#log li", (items) => items.map((li) => li.textContent));
  if (opts.screenshot) {
    await page.screenshot({ path: opts.screenshot, fullPage: true });
    result.screenshot = opts.screenshot;
  }
  result.ok = result.ok === true && result.title === "herald: ok";
  exitCode = result.ok ? 0 : 1;
} catch (e) {
  result.ok = false;
  result.error = `${e.name}: ${e.message}`;
} finally {
  if (context) await context.close().catch(() => {});
  if (ownProfile) rmSync(profile, { recursive: true, force: true });
}
if (!result.ok && consoleLines.length) result.console = consoleLines;
emit();
process.exit(exitCode);
