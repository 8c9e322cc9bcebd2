// Losing the server and coming back: the status says what happens, and replies due meanwhile
// arrive once the page is connected again.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { session } from './support/browser.js';
import { png, textOpenZone } from './support/fixtures.js';
import { waitConnected } from './support/page.js';

function entryWithFile(page, filename) {
  return page.locator('#messages > li.entry').filter({ has: page.locator('.filename', { hasText: filename }) });
}

async function sendImage(page, name) {
  await page.locator('#file').setInputFiles({ name, mimeType: 'image/png', buffer: png(24) });
  await page.locator('#attachment', { hasText: name }).waitFor();
  await page.locator('#send').click();
}

/** Polls `check` until it returns something truthy: for state outside the page. */
async function eventually(check, what, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

test('when the server restarts the page reconnects and the replies still arrive', async (t) => {
  // Real reply delays (2–3 s for an image), and no grace at shutdown: the message is still
  // unanswered when the server stops, and the next start processes it.
  const { page, kaiwa, snap } = await session(t, {
    timezoneId: textOpenZone(),
    flags: ['--reply-delay-scale', '1', '--shutdown-grace', '0.01'],
  });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await sendImage(page, 'restart.png');
  const entry = entryWithFile(page, 'restart.png');
  await entry.and(page.locator('[data-status="accepted"], [data-status="processing"]')).waitFor();

  await kaiwa.stop('SIGTERM');
  const status = page.locator('#status[data-state="reconnecting"]');
  await status.waitFor();
  assert.match(await page.locator('#status-text').textContent(), /^Reconnecting: the (server is going away|connection to the server was lost)/);
  await page.locator('#countdown', { hasText: /next try in \d+ s|trying now/ }).waitFor();
  await snap('reconnecting');

  await kaiwa.run();
  await waitConnected(page);
  await entry.and(page.locator('[data-status="replied"]')).waitFor({ timeout: 30000 });
  await entry.locator('.reply-image img').evaluate((img) => img.decode());
  const kinds = await entry.locator('.replies > li').evaluateAll((items) => items.map((li) => li.classList[1]));
  assert.deepEqual(kinds, ['reply-text', 'reply-voice', 'reply-image']);
});

test('replies due while the page was disconnected arrive once, marked missed', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone(), flags: ['--reply-delay-scale', '1'] });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const clientId = await page.locator('#client-id').inputValue();
  await sendImage(page, 'away.png');
  const entry = entryWithFile(page, 'away.png');
  await entry.and(page.locator('[data-status="accepted"], [data-status="processing"]')).waitFor();
  await page.locator('#connect').click();
  await page.locator('#status-text', { hasText: 'Disconnected: you disconnected' }).waitFor();

  // The server answers while nobody is there: its three replies are recorded as failed.
  await eventually(async () => {
    const { messages } = await kaiwa.json(`/api/v1/clients/${clientId}/messages`);
    const replies = messages[0]?.replies ?? [];
    return replies.length === 3 && replies.every((reply) => reply.delivery === 'failed');
  }, 'the replies to be recorded as failed');
  assert.equal(await entry.locator('.replies > li').count(), 0);

  await page.locator('#connect').click();
  await waitConnected(page);
  await entry.and(page.locator('[data-status="replied"]')).waitFor();
  await page.locator('#announcer p', { hasText: '3 missed replies arrived' }).waitFor({ state: 'attached' });
  // Replayed and also in the reloaded history: shown once each, in the thread of their message.
  assert.equal(await entry.locator('.replies > li').count(), 3);
  assert.equal(await entry.locator('.reply-note', { hasText: 'arrived after reconnecting' }).count(), 3);
  await eventually(async () => {
    const { messages } = await kaiwa.json(`/api/v1/clients/${clientId}/messages`);
    return messages[0].replies.every((reply) => reply.delivery === 'delivered');
  }, 'the replayed replies to be recorded as delivered');
});
