// Connecting, sending a text, history after a reload, and a second tab with the same id.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { session } from './support/browser.js';
import { textOpenZone } from './support/fixtures.js';
import { entryWithText, recordStates, sendText, statesOf, statusText, waitConnected } from './support/page.js';

test('the page connects with a remembered id and the detected timezone', async (t) => {
  const zone = textOpenZone();
  const { page, kaiwa } = await session(t, { timezoneId: zone });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const clientId = await page.locator('#client-id').inputValue();
  assert.match(clientId, /^web-[0-9a-f]{8}$/);
  assert.equal(await page.locator('#timezone').inputValue(), zone);
  assert.equal(await statusText(page).textContent(), `Connected as ${clientId} (${zone})`);
  // The windows from welcome, judged in the chosen zone.
  await page.locator('#windows .window', { hasText: 'text open' }).waitFor();
  assert.equal(await page.evaluate(() => localStorage.getItem('kaiwa.clientId')), clientId);
  assert.equal((await kaiwa.json('/health')).connections, 1);
});

test('a text moves from sending to replied and its reply shows under it', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await recordStates(page);
  await sendText(page, 'Hello kaiwa!\nsecond line');
  const entry = entryWithText(page, 'Hello kaiwa!');
  await entry.and(page.locator('[data-status="replied"]')).waitFor();
  const reply = entry.locator('.replies .reply-text');
  await reply.waitFor();
  assert.match(await reply.textContent(), /\S/);
  assert.equal(await entry.locator('.message .text').textContent(), 'Hello kaiwa!\nsecond line');
  assert.equal(await entry.locator('.state').textContent(), 'replied');
  const states = await statesOf(entry);
  for (const state of ['accepted', 'processing', 'replied']) assert.ok(states.includes(state), `went through ${state}: ${states}`);
  assert.ok(states.indexOf('accepted') < states.indexOf('processing') && states.indexOf('processing') < states.indexOf('replied'), `in order: ${states}`);
  // The screen reader hears the reply.
  await page.locator('#announcer p', { hasText: 'Reply:' }).waitFor({ state: 'attached' });
  // Shift+Enter is a new line, not a send.
  await page.locator('#message').press('Shift+Enter');
  assert.equal(await page.locator('#message').inputValue(), '\n');
  assert.equal(await page.locator('#messages > li.entry').count(), 1);
});

test('after a reload the history shows the earlier messages and replies', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const clientId = await page.locator('#client-id').inputValue();
  for (const text of ['first message', 'second message']) {
    await sendText(page, text);
    await entryWithText(page, text).and(page.locator('[data-status="replied"]')).waitFor();
  }
  await page.reload();
  await waitConnected(page);
  assert.equal(await page.locator('#client-id').inputValue(), clientId);
  for (const text of ['first message', 'second message']) {
    const entry = entryWithText(page, text);
    await entry.locator('.reply-text').waitFor();
    assert.equal(await entry.getAttribute('data-status'), 'replied');
  }
  // Oldest first, top to bottom, as in any chat.
  const texts = await page.locator('#messages .message .text').allTextContents();
  assert.deepEqual(texts, ['first message', 'second message']);
  await page.locator('#history-state', { hasText: 'beginning of the conversation' }).waitFor();
});

test('a second tab with the same id is refused and says why', async (t) => {
  const { page, kaiwa, context } = await session(t, { timezoneId: textOpenZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const second = await context.newPage();
  await second.goto(kaiwa.url);
  await second.locator('#status[data-state="disconnected"]').waitFor();
  assert.equal(await statusText(second).textContent(), 'Disconnected: another tab is connected with this id');
  // It does not keep knocking; the first tab is untouched.
  assert.equal(await second.locator('#connect').textContent(), 'Connect');
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'connected');
  await sendText(page, 'still here');
  await entryWithText(page, 'still here').locator('.reply-text').waitFor();
});

test('a full server is explained and the page gets in once a slot frees up', async (t) => {
  const { page, kaiwa, context } = await session(t, { timezoneId: textOpenZone(), flags: ['--max-clients', '1'] });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const second = await context.newPage();
  await second.goto(kaiwa.url);
  await second.locator('#status-text', { hasText: 'Reconnecting: the server is full, retrying' }).waitFor();
  await second.locator('#countdown', { hasText: /next try in \d+ s/ }).waitFor();
  // Someone else, so that the freed slot is not refused as the same id.
  const input = second.locator('#client-id');
  await input.fill('second-person');
  await input.press('Enter');
  await page.locator('#connect').click();
  await page.locator('#status-text', { hasText: 'Disconnected: you disconnected' }).waitFor();
  await second.locator('#status-text', { hasText: 'Connected as second-person' }).waitFor();
});

test('message times are 24-hour like the clock in the header, whatever the locale', async (t) => {
  // An American browser: its own default is a 12-hour clock.
  const zone = textOpenZone();
  const { page, kaiwa } = await session(t, { timezoneId: zone, locale: 'en-US' });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await sendText(page, 'what time is it');
  const time = entryWithText(page, 'what time is it').locator('.meta time');
  await page.waitForFunction((el) => el.textContent !== '', await time.elementHandle());
  const expected = new Intl.DateTimeFormat('en-GB', { timeZone: zone, hour: '2-digit', minute: '2-digit', hourCycle: 'h23' })
    .format(new Date(await time.getAttribute('datetime')));
  assert.equal(await time.textContent(), expected);
  assert.match(await page.locator('#windows .clock').textContent(), new RegExp(`^\\d\\d:\\d\\d in ${zone}$`));
});
