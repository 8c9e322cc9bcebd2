// Debian's Chromium, headless, with a fresh profile, driven by playwright-core; and the session
// of one test: a kaiwa, a browser, screenshots and page errors collected at the end.

import { chromium } from 'playwright-core';
import { X509Certificate, createHash } from 'node:crypto';
import { existsSync, createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Kaiwa } from './kaiwa.js';
import { outputPath, slug } from './paths.js';

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-quic',
  // A microphone that plays a beep, allowed without asking: recording can be tested.
  '--use-fake-ui-for-media-stream',
  '--use-fake-device-for-media-stream',
];

const TIMEOUT_MS = 20000;

/**
 * Chromium's flag that trusts one key, given the certificate's PEM: the SHA-256 of its public
 * key (SPKI), in base64. Every other certificate is still checked as usual.
 */
function trustKey(pem) {
  const spki = new X509Certificate(pem).publicKey.export({ type: 'spki', format: 'der' });
  return `--ignore-certificate-errors-spki-list=${createHash('sha256').update(spki).digest('base64')}`;
}

export async function openBrowser({ timezoneId = 'UTC', viewport = { width: 1100, height: 820 }, locale, trust } = {}) {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`no Chromium at ${CHROMIUM}: install it (apt-get install chromium) or set CHROMIUM_PATH`);
  }
  const profile = await mkdtemp(join(tmpdir(), 'kaiwa-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: trust ? [...ARGS, trustKey(trust)] : ARGS,
    timezoneId,
    viewport,
    locale,
  });
  context.setDefaultTimeout(TIMEOUT_MS);
  return {
    context,
    async close() {
      await context.close().catch(() => {});
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/**
 * Starts what one test needs and tears it down after it: a screenshot of every tab (pass or
 * fail), the page's console in `<test>.console.log`, and a failure if a page threw.
 */
export async function session(t, { flags = [], timezoneId = 'UTC', viewport, locale, tls } = {}) {
  const name = slug(t.name);
  const kaiwa = await Kaiwa.start({ name, flags, tls });
  const browser = await openBrowser({ timezoneId, viewport, locale, trust: tls?.pem });
  const { context } = browser;
  const consoleLog = createWriteStream(outputPath(`${name}.console.log`));
  const pageErrors = [];
  const watch = (page) => {
    page.on('console', (message) => consoleLog.write(`[${message.type()}] ${message.text()}\n`));
    page.on('pageerror', (error) => {
      pageErrors.push(error);
      consoleLog.write(`[pageerror] ${error.stack ?? error}\n`);
    });
  };
  context.on('page', watch);
  let page = context.pages()[0];
  if (page) watch(page);
  else page = await context.newPage();
  t.after(async () => {
    for (const [index, open] of context.pages().entries()) {
      const suffix = index === 0 ? '' : `-tab${index + 1}`;
      await open.screenshot({ path: outputPath(`${name}${suffix}.png`) }).catch(() => {});
    }
    await browser.close();
    await kaiwa.dispose();
    consoleLog.end();
    if (pageErrors.length) throw new Error(`the page threw: ${pageErrors.map(String).join('; ')}`);
  });
  return {
    kaiwa,
    context,
    page,
    name,
    /** An extra screenshot in the middle of a test. */
    snap: (label, on = page) => on.screenshot({ path: outputPath(`${name}-${label}.png`) }),
  };
}
