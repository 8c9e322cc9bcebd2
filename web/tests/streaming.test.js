// Streamed text replies (`delta` frames, then the whole `reply`) and the `fallback` flag. The
// server streams only with a language model; here a route between page and server adds the
// frames to real replies, as the streaming server will send them.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { session } from './support/browser.js';
import { textOpenZone } from './support/fixtures.js';
import { entryWithText, sendText, waitConnected } from './support/page.js';

test('a streamed reply grows piece by piece and the whole reply replaces it', async (t) => {
  const { page, kaiwa, snap } = await session(t, { timezoneId: textOpenZone() });
  let release;
  const held = new Promise((resolve) => { release = resolve; });
  let fullText = '';
  await page.routeWebSocket(/\/ws$/, (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((message) => server.send(message));
    // One frame at a time, in order, so frames after a held reply wait behind it.
    let queue = Promise.resolve();
    server.onMessage((message) => {
      queue = queue.then(async () => {
        const frame = typeof message === 'string' ? JSON.parse(message) : null;
        if (frame?.type !== 'reply' || frame.reply.reply_type !== 'text') {
          ws.send(message);
          return;
        }
        fullText = frame.reply.content;
        const pieces = fullText.match(/\S+\s*/g);
        for (const delta of pieces.slice(0, 3)) {
          ws.send(JSON.stringify({ type: 'delta', id: frame.id, message_id: frame.message_id, delta }));
        }
        await held;
        ws.send(JSON.stringify({ ...frame, reply: { ...frame.reply, fallback: true } }));
      });
    });
  });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await sendText(page, 'tell me something');
  const entry = entryWithText(page, 'tell me something');
  const streaming = entry.locator('.reply-text.streaming');
  await streaming.waitFor();
  const partial = fullText.match(/\S+\s*/g).slice(0, 3).join('');
  await page.waitForFunction(([el, text]) => el.textContent === text, [await streaming.elementHandle(), partial]);
  await snap('streaming');

  release();
  const final = entry.locator('.reply-text:not(.streaming)');
  await final.waitFor();
  await streaming.waitFor({ state: 'detached' });
  assert.equal(await final.locator('.text').textContent(), fullText);
  assert.equal(await entry.locator('.reply-text').count(), 1);
  // The model gave up: said quietly, under the reply.
  assert.ok(await final.evaluate((el) => el.classList.contains('fallback')));
  assert.match(await final.locator('.reply-note').textContent(), /stand-in reply/);
  await entry.and(page.locator('[data-status="replied"]')).waitFor();
});
