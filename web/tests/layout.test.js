// The page on a phone, the theme switch, and the keyboard path through it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { session } from './support/browser.js';
import { textOpenZone } from './support/fixtures.js';
import { entryWithText, sendText, waitConnected } from './support/page.js';

test('on a phone-width screen everything fits', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone(), viewport: { width: 360, height: 740 } });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await sendText(page, 'hello from a small screen, with a line long enough to wrap around twice on a phone');
  await entryWithText(page, 'hello from a small screen').locator('.reply-text').waitFor();
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), 'no sideways scrolling');
  for (const id of ['message', 'attach', 'record', 'send', 'connect', 'theme', 'client-id', 'timezone']) {
    const box = await page.locator(`#${id}`).boundingBox();
    assert.ok(box && box.x >= 0 && box.x + box.width <= 360 && box.y + box.height <= 740, `#${id} is on screen`);
  }
});

test('on a phone every window chip shows whole, wrapped onto more lines', async (t) => {
  const { page, kaiwa, snap } = await session(t, { timezoneId: textOpenZone(), viewport: { width: 375, height: 667 } });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const chips = page.locator('#windows .window');
  await chips.first().waitFor();
  assert.equal(await chips.count(), 4, 'one chip per message type');
  await snap('windows');
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), 'no sideways scrolling');
  // Inside the row's visible box and the screen: nothing hidden past an edge to scroll to.
  const cut = await page.evaluate(() => {
    const row = document.getElementById('windows').getBoundingClientRect();
    return [...document.querySelectorAll('#windows > *')].map((chip) => [chip.textContent, chip.getBoundingClientRect()])
      .filter(([, box]) => box.left < Math.max(row.left, 0) - 0.5 || box.right > Math.min(row.right, window.innerWidth) + 0.5
        || box.top < row.top - 0.5 || box.bottom > row.bottom + 0.5)
      .map(([text]) => text);
  });
  assert.deepEqual(cut, [], 'chips cut off');
});

test('the theme button says what it will do, after every switch and after a reload', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const theme = () => page.evaluate(() => document.documentElement.dataset.theme);
  const button = page.locator('#theme');
  assert.equal(await theme(), 'dark');
  assert.equal(await button.textContent(), 'Light theme');
  await button.click();
  assert.equal(await theme(), 'light');
  assert.equal(await button.textContent(), 'Dark theme');
  await button.click();
  assert.equal(await theme(), 'dark');
  assert.equal(await button.textContent(), 'Light theme');
  await button.click();
  await page.reload();
  await waitConnected(page);
  assert.equal(await theme(), 'light');
  assert.equal(await button.textContent(), 'Dark theme');
});

test('the controls are labelled and reachable with the keyboard in order', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const order = [];
  for (let i = 0; i < 10; i += 1) {
    await page.keyboard.press('Tab');
    order.push(await page.evaluate(() => document.activeElement.id || document.activeElement.className));
  }
  assert.deepEqual(order, ['skip', 'connect', 'theme', 'client-id', 'timezone', 'scroller', 'message', 'attach', 'record', 'send']);
  // Every control has a name a screen reader can say.
  const unnamed = await page.evaluate(() => [...document.querySelectorAll('button, input:not([type=file]), textarea')]
    .filter((el) => !el.hidden && !(el.labels?.length || el.getAttribute('aria-label') || el.textContent.trim()))
    .map((el) => el.id));
  assert.deepEqual(unnamed, []);
  // Back to the message box, then typing and Enter from the keyboard alone sends.
  for (let i = 0; i < 3; i += 1) await page.keyboard.press('Shift+Tab');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'message');
  await page.keyboard.type('typed without a mouse');
  await page.keyboard.press('Enter');
  await entryWithText(page, 'typed without a mouse').locator('.reply-text').waitFor();
  assert.equal(await page.locator('#announcer').getAttribute('aria-live'), 'polite');
});
