// The page on a server with auth on: it asks for a token (the server says at load that it needs
// one), connects as the client the token names, reads its history with it, and takes a new
// token when the server says the old one expired.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { session } from './support/browser.js';
import { kaiwaBinary } from './support/kaiwa.js';
import { textOpenZone } from './support/fixtures.js';
import { entryWithText, sendText, statusText, waitConnected } from './support/page.js';

const SECRET = 'a-browser-test-secret-long-enough-for-hs256';

/** A token from `kaiwa token`, as an operator would make one. */
function token(clientId, ttl = '1h') {
  return execFileSync(kaiwaBinary(), ['token', '--client-id', clientId, '--ttl', ttl], {
    env: { ...process.env, KAIWA_AUTH_SECRET: SECRET },
  }).toString().trim();
}

test('the page asks for a token, connects as its client and reads the history with it', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone(), flags: ['--auth-secret', SECRET] });
  await page.goto(kaiwa.url);
  await page.locator('#status[data-state="disconnected"]').waitFor();
  assert.equal(await statusText(page).textContent(), 'Disconnected: this server needs a token: paste yours above');
  assert.equal(await page.locator('#token-field').isVisible(), true);

  await page.locator('#token').fill(token('web-alice'));
  await page.locator('#token').dispatchEvent('change');
  await waitConnected(page);
  assert.match(await statusText(page).textContent(), /^Connected as web-alice /);
  assert.equal(await page.locator('#client-id').inputValue(), 'web-alice');

  await sendText(page, 'hello with a token');
  await entryWithText(page, 'hello with a token').locator('.reply-text').waitFor();

  // A reload keeps the token in this tab, and the history comes with it.
  await page.reload();
  await waitConnected(page);
  await entryWithText(page, 'hello with a token').locator('.reply-text').waitFor();
  // The server without a token says no to the same history.
  const response = await fetch(`${kaiwa.url}/api/v1/clients/web-alice/messages`);
  assert.equal(response.status, 401);
});

test('a token that runs out is replaced from the page without losing the connection', async (t) => {
  const { page, kaiwa } = await session(t, {
    timezoneId: textOpenZone(),
    flags: ['--auth-secret', SECRET, '--auth-leeway', '0', '--auth-refresh-grace', '4'],
  });
  await page.goto(kaiwa.url);
  await page.locator('#token').fill(token('web-bob', '3s'));
  await page.locator('#token').dispatchEvent('change');
  await waitConnected(page);
  await page.locator('.notice', { hasText: 'Your token has expired' }).waitFor();
  await page.locator('#token').fill(token('web-bob'));
  await page.locator('#token').dispatchEvent('change');
  await page.locator('.notice', { hasText: 'Token refreshed.' }).waitFor();
  // Past the grace period, still connected and answered.
  await page.waitForTimeout(4500);
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'connected');
  await sendText(page, 'still here');
  await entryWithText(page, 'still here').locator('.reply-text').waitFor();
});

test('without a refresh the page says the token expired and waits for a new one', async (t) => {
  const { page, kaiwa } = await session(t, {
    timezoneId: textOpenZone(),
    flags: ['--auth-secret', SECRET, '--auth-leeway', '0', '--auth-refresh-grace', '1'],
  });
  await page.goto(kaiwa.url);
  await page.locator('#token').fill(token('web-carol', '2s'));
  await page.locator('#token').dispatchEvent('change');
  await waitConnected(page);
  await page.locator('#status[data-state="disconnected"]').waitFor();
  assert.equal(await statusText(page).textContent(), 'Disconnected: the token has expired: paste a new one above');
  await page.locator('#token').fill(token('web-carol'));
  await page.locator('#token').dispatchEvent('change');
  await waitConnected(page);
});
