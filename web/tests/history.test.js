// A long history: the latest page on connect, older pages while scrolling up, the view still.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { session } from './support/browser.js';
import { textOpenZone } from './support/fixtures.js';
import { seed, waitConnected } from './support/page.js';

test('scrolling up loads older messages by cursor without moving the view', async (t) => {
  const timezone = textOpenZone();
  const { page, kaiwa } = await session(t, { timezoneId: timezone, flags: ['--reply-delay-scale', '0'] });
  await seed(page, kaiwa.url, { clientId: 'history-reader', timezone, count: 45 });
  await page.goto(kaiwa.url);
  await waitConnected(page);

  const entries = page.locator('#messages > li.entry');
  await page.waitForFunction(() => document.querySelectorAll('#messages > li.entry').length === 30);
  // The view starts at the newest message.
  const last = entries.last();
  assert.equal(await last.locator('.message .text').textContent(), 'old message 45');
  assert.ok(await last.isVisible());
  await page.locator('#older').waitFor();

  // Where the oldest loaded message sits in the content, i.e. on screen once scrolled to the top.
  const oldest = page.locator('#messages > li.entry', { has: page.locator('.message .text', { hasText: /^old message 16$/ }) });
  const offset = () => oldest.evaluate((el) => {
    const scroller = document.getElementById('scroller');
    return el.getBoundingClientRect().top - scroller.getBoundingClientRect().top;
  });
  const inContent = await oldest.evaluate((el) => {
    const scroller = document.getElementById('scroller');
    return el.getBoundingClientRect().top - scroller.getBoundingClientRect().top + scroller.scrollTop;
  });
  await page.locator('#scroller').evaluate((el) => { el.scrollTop = 0; });
  await page.waitForFunction(() => document.querySelectorAll('#messages > li.entry').length === 45);
  await page.locator('#history-state', { hasText: 'beginning of the conversation' }).waitFor();
  const after = await offset();
  assert.ok(Math.abs(after - inContent) <= 2, `the message stayed put: ${inContent}px before, ${after}px after`);
  const texts = await page.locator('#messages .message .text').allTextContents();
  assert.deepEqual(texts, Array.from({ length: 45 }, (_, i) => `old message ${i + 1}`));
});
