// Exact resume: the page keeps the `seq` of the last reply it processed, per client id, tells
// the server where it stopped on every connect and acknowledges what it showed, so that each
// reply reaches the page once, however often it reconnects or reloads.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { openBrowser, session } from './support/browser.js';
import { png, textOpenZone } from './support/fixtures.js';
import { entryWithText, replyPosition, seed, sendText, tapSockets, waitConnected } from './support/page.js';

const LATE = 'arrived after reconnecting';

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

/** Every reply of `clientId` in its history, oldest message first. */
async function storedReplies(kaiwa, clientId) {
  const { messages } = await kaiwa.json(`/api/v1/clients/${encodeURIComponent(clientId)}/messages?limit=100`);
  return messages.reverse().flatMap((message) => message.replies);
}

const seqs = (frames) => frames.map((frame) => frame.seq);

/**
 * A text answered live (reply 1), then an image whose three replies (2 to 4) come while the
 * page is offline. Returns with the network back and the page about to reconnect.
 */
async function offlineWhileAnswered(t) {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone(), flags: ['--reply-delay-scale', '1'] });
  const tap = await tapSockets(page);
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const clientId = await page.locator('#client-id').inputValue();
  await sendText(page, 'before the tunnel');
  await entryWithText(page, 'before the tunnel').locator('.reply-text').waitFor();

  await page.locator('#file').setInputFiles({ name: 'tunnel.png', mimeType: 'image/png', buffer: png(24) });
  await page.locator('#attachment', { hasText: 'tunnel.png' }).waitFor();
  await page.locator('#send').click();
  const entry = page.locator('#messages > li.entry').filter({ has: page.locator('.filename', { hasText: 'tunnel.png' }) });
  await entry.and(page.locator('[data-status="accepted"], [data-status="processing"]')).waitFor();
  await tap.cut();
  await page.locator('#status[data-state="reconnecting"]').waitFor();

  // The image's three replies come while the page is away: sent to nobody, recorded failed.
  await eventually(async () => {
    const replies = await storedReplies(kaiwa, clientId);
    return replies.length === 4 && replies.slice(1).every((reply) => reply.delivery === 'failed');
  }, 'the replies to be recorded as failed');
  assert.equal(await entry.locator('.replies > li').count(), 0);
  return { page, kaiwa, tap, clientId, entry };
}

/** Reconnects now, skipping the rest of the backoff unless the page is trying again already. */
async function reconnect(page) {
  await Promise.race([page.locator('#retry').click().catch(() => {}), waitConnected(page)]);
  await waitConnected(page);
}

test('a reply due while the page is offline arrives once after it reconnects, and is acknowledged', async (t) => {
  const { page, kaiwa, tap, clientId, entry } = await offlineWhileAnswered(t);
  tap.restore();
  await reconnect(page);
  await entry.and(page.locator('[data-status="replied"]')).waitFor();
  await page.locator('#announcer p', { hasText: '3 missed replies arrived' }).waitFor({ state: 'attached' });
  assert.equal(await entry.locator('.replies > li').count(), 3);
  assert.equal(await entry.locator('.reply-note', { hasText: LATE }).count(), 3);
  assert.equal(await entryWithText(page, 'before the tunnel').locator('.replies > li').count(), 1);

  // Each reply reached the page once: the one before the cut live, the others replayed after
  // the position the page gave.
  const replies = tap.frames('received', 'reply');
  assert.deepEqual(seqs(replies), [1, 2, 3, 4]);
  assert.deepEqual(seqs(replies.filter((frame) => frame.missed)), [2, 3, 4]);
  assert.deepEqual(tap.frames('sent', 'hello').map((hello) => hello.after), [0, 1]);
  assert.ok(tap.frames('sent', 'hello').every((hello) => !('resume' in hello)));

  // Acknowledged, so delivered; never beyond what the page had.
  await eventually(async () => {
    const stored = await storedReplies(kaiwa, clientId);
    return stored.every((reply) => reply.delivery === 'delivered');
  }, 'every reply to be recorded as delivered');
  const acks = seqs(tap.frames('sent', 'received'));
  assert.equal(acks.at(-1), 4);
  assert.ok(acks.every((seq, i) => seq <= 4 && (i === 0 || seq > acks[i - 1])), `acks only go forward: ${acks}`);
  assert.equal(await replyPosition(page, clientId), 4);
});

test('replies replayed after the history came keep their mark', async (t) => {
  const { page, tap, entry } = await offlineWhileAnswered(t);
  // The history the page asks for on welcome is answered before the replay reaches the page.
  const release = tap.hold((frame) => frame.type === 'reply' && frame.missed);
  tap.restore();
  await reconnect(page);
  // The history says the image was replied; its replies are the replay's to bring.
  await entry.and(page.locator('[data-status="replied"]')).waitFor();
  assert.equal(await entry.locator('.replies > li').count(), 0);
  release();
  await page.locator('#announcer p', { hasText: '3 missed replies arrived' }).waitFor({ state: 'attached' });
  assert.equal(await entry.locator('.replies > li').count(), 3);
  assert.equal(await entry.locator('.reply-note', { hasText: LATE }).count(), 3);
  assert.deepEqual(seqs(tap.frames('received', 'reply')), [1, 2, 3, 4]);
});

test('a reload resumes where the page was and replays nothing it already showed', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone() });
  const tap = await tapSockets(page);
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const clientId = await page.locator('#client-id').inputValue();
  // Reloads the moment the reply shows: the position moved with it, not later.
  const reloaded = page.waitForEvent('load');
  await page.evaluate(() => {
    const observer = new MutationObserver(() => {
      if (!document.querySelector('.reply-text:not(.streaming)')) return;
      // Once: a second navigation would abort the first.
      observer.disconnect();
      location.reload();
    });
    observer.observe(document.getElementById('messages'), { childList: true, subtree: true });
  });
  await sendText(page, 'remember me');
  await reloaded;
  const entry = entryWithText(page, 'remember me');
  await waitConnected(page);
  await entry.locator('.reply-text').waitFor();
  assert.equal(await replyPosition(page, clientId), 1);
  assert.deepEqual(tap.frames('sent', 'hello').map((hello) => hello.after), [0, 1]);
  assert.deepEqual(seqs(tap.frames('received', 'reply')), [1], 'the reply came once, before the reload');
  await eventually(() => tap.frames('received', 'synced').length === 2, 'the second synced');
  assert.deepEqual(tap.frames('received', 'synced').at(-1), { type: 'synced', replies: 0, seq: 1 });
  assert.equal(await entry.locator('.replies > li').count(), 1);
  assert.equal(await page.locator('.reply-note', { hasText: LATE }).count(), 0);
  await eventually(async () => (await storedReplies(kaiwa, clientId))[0].delivery === 'delivered', 'the reply to be delivered');

  // The next reply goes on from the same position.
  await sendText(page, 'still me');
  await entryWithText(page, 'still me').locator('.reply-text').waitFor();
  assert.deepEqual(seqs(tap.frames('received', 'reply')), [1, 2]);
  assert.equal(await replyPosition(page, clientId), 2);
});

test('leaving the page acknowledges the replies it showed', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const clientId = await page.locator('#client-id').inputValue();
  // Away the moment the reply shows, before the acknowledgement timer runs, and to a page
  // that does not connect (a new hello would acknowledge it too).
  const left = page.waitForURL('**/health');
  await page.evaluate(() => {
    const observer = new MutationObserver(() => {
      if (!document.querySelector('.reply-text:not(.streaming)')) return;
      // Once: a second navigation would abort the first.
      observer.disconnect();
      location.href = '/health';
    });
    observer.observe(document.getElementById('messages'), { childList: true, subtree: true });
  });
  await sendText(page, 'goodbye');
  await left;
  // Until the server records that the page left, the reply is neither.
  const delivery = await eventually(async () => {
    const [reply] = await storedReplies(kaiwa, clientId);
    return ['delivered', 'failed'].includes(reply?.delivery) && reply.delivery;
  }, 'the reply to be settled');
  assert.equal(delivery, 'delivered');
});

test('another browser with the same id shows its history without replaying it as missed', async (t) => {
  const timezone = textOpenZone();
  const { page, kaiwa } = await session(t, { timezoneId: timezone });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const clientId = await page.locator('#client-id').inputValue();
  await sendText(page, 'from the first browser');
  await entryWithText(page, 'from the first browser').locator('.reply-text').waitFor();
  await page.locator('#connect').click();
  await page.locator('#status[data-state="disconnected"]').waitFor();

  // A second browser, its storage empty but for the id; the id also sent from a device that
  // never acknowledged its replies, which a resume of the unacknowledged would replay.
  const other = await openBrowser({ timezoneId: timezone });
  t.after(() => other.close());
  const second = other.context.pages()[0] ?? await other.context.newPage();
  await seed(second, kaiwa.url, { clientId, timezone, count: 2, text: 'from a third device' });
  const tap = await tapSockets(second);
  await second.goto(kaiwa.url);
  await waitConnected(second);
  assert.equal(await second.locator('#client-id').inputValue(), clientId);
  for (const text of ['from the first browser', 'from a third device 1', 'from a third device 2']) {
    const entry = entryWithText(second, text);
    await entry.locator('.reply-text').waitFor();
    assert.equal(await entry.locator('.replies > li').count(), 1, text);
  }
  await eventually(() => tap.frames('received', 'synced').length === 1, 'synced');
  assert.deepEqual(tap.frames('received', 'synced')[0], { type: 'synced', replies: 0, seq: 3 });
  assert.equal(tap.frames('received', 'reply').length, 0);
  assert.equal(await second.locator('.reply-note', { hasText: LATE }).count(), 0);
  assert.equal(await second.locator('#announcer p', { hasText: 'missed' }).count(), 0);
  assert.equal(await replyPosition(second, clientId), 3);

  // It goes on from the end of the stream.
  await sendText(second, 'from the second browser');
  await entryWithText(second, 'from the second browser').locator('.reply-text').waitFor();
  assert.deepEqual(seqs(tap.frames('received', 'reply')), [4]);
  assert.equal(await replyPosition(second, clientId), 4);
});
