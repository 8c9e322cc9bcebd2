// Close codes: which ones bring the page back by itself and which ones wait for the person.
// kaiwa's own codes say it by their range (4000–4499 reconnect, 4500–4999 do not), so a code
// newer than the page is still handled right.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { session } from './support/browser.js';
import { textOpenZone } from './support/fixtures.js';
import { entryWithText, sendText, statusText, waitConnected } from './support/page.js';

/** How long a page that would reconnect takes at most to try (first backoff 1 s, +20 % jitter). */
const FIRST_RETRY_MS = 1200;

test('the page reconnects or waits by the close code, known or not', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone() });
  // Each socket goes through a route, so that the test can close it with any code as if the
  // server had; the server's side is closed too, which frees the id for the next connection.
  const sockets = [];
  await page.routeWebSocket(/\/ws$/, (ws) => {
    const server = ws.connectToServer();
    server.onClose(() => {});
    ws.onClose(() => server.close());
    sockets.push({ ws, server });
  });
  await page.goto(kaiwa.url);
  await waitConnected(page);

  const closeWith = async (code, reason) => {
    const { ws, server } = sockets.at(-1);
    await server.close();
    await ws.close({ code, reason });
  };
  const cases = [
    { code: 4003, reason: 'slow_consumer: outbox full', again: true, text: 'this page read too slowly and the server let it go' },
    { code: 4499, reason: 'some_new_reason: come back', again: true, text: 'the connection closed (4499: some_new_reason: come back)' },
    { code: 3000, reason: 'a proxy of some kind', again: true, text: 'the connection closed (3000: a proxy of some kind)' },
    { code: 4502, reason: 'first_message_timeout: no message', again: false, text: 'no message was sent soon after connecting, so the server freed the connection; sending one connects again' },
    { code: 4509, reason: 'duplicate_connection: live', again: false, text: 'another tab is connected with this id' },
    { code: 4510, reason: 'replaced: newer connection', again: false, text: 'another tab took over this id' },
    { code: 4500, reason: 'some_new_reason: stay away', again: false, text: 'the connection closed (4500: some_new_reason: stay away)' },
    { code: 4999, reason: 'some_new_reason: stay away', again: false, text: 'the connection closed (4999: some_new_reason: stay away)' },
    { code: 1007, reason: 'invalid_payload: not UTF-8', again: false, text: 'the server could not read what the page sent (text that is not UTF-8)' },
  ];
  for (const { code, reason, again, text } of cases) {
    const opened = sockets.length;
    await closeWith(code, reason);
    await page.locator('#status:not([data-state="connected"])').waitFor();
    if (again) {
      assert.equal(await statusText(page).textContent(), `Reconnecting: ${text}`, `after ${code}`);
      await waitConnected(page);
      assert.equal(sockets.length, opened + 1, `one new connection after ${code}`);
    } else {
      assert.equal(await statusText(page).textContent(), `Disconnected: ${text}`, `after ${code}`);
      await page.waitForTimeout(FIRST_RETRY_MS * 2);
      assert.equal(sockets.length, opened, `no new connection after ${code}`);
      assert.equal(await page.locator('#status').getAttribute('data-state'), 'disconnected');
      await page.locator('#connect').click();
      await waitConnected(page);
    }
  }
});

// The two tests below need the server to send the new codes (4502, 4510).

test('an idle page let go after the first-message timeout stays down until a message is sent', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone(), flags: ['--first-message-timeout', '1'] });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await page.locator('#status[data-state="disconnected"]').waitFor();
  assert.match(await statusText(page).textContent(), /^Disconnected: no message was sent soon after connecting/);
  // Coming back by itself would only be let go again.
  await page.waitForTimeout(FIRST_RETRY_MS * 2);
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'disconnected');
  assert.equal((await kaiwa.json('/health')).connections, 0);
  await sendText(page, 'here I am');
  await entryWithText(page, 'here I am').locator('.reply-text').waitFor();
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'connected');
});

test('a tab taken over by another with the same id says so and does not take it back', async (t) => {
  const { page, kaiwa, context } = await session(t, { timezoneId: textOpenZone(), flags: ['--duplicate-connection', 'replace'] });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const second = await context.newPage();
  await second.goto(kaiwa.url);
  await waitConnected(second);
  await page.locator('#status[data-state="disconnected"]').waitFor();
  assert.equal(await statusText(page).textContent(), 'Disconnected: another tab took over this id');
  // Were it to reconnect, the two tabs would take the id from each other forever.
  await page.waitForTimeout(FIRST_RETRY_MS * 2);
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'disconnected');
  assert.equal(await second.locator('#status').getAttribute('data-state'), 'connected');
});
