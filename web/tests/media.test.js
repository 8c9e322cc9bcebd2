// Files: an image and its three replies, a voice file outside its window, a recording from the
// microphone, and a file over the server's limit refused before it is sent.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { session } from './support/browser.js';
import { png, textOpenZone, videoOpenZone, voiceClosedZone, wav } from './support/fixtures.js';
import { chooseTimezone, dropFile, waitConnected } from './support/page.js';

/** A short WebM video recorded in the page from an animated canvas. */
async function recordVideo(page) {
  const bytes = await page.evaluate(async () => {
    const canvas = Object.assign(document.createElement('canvas'), { width: 64, height: 48 });
    const paint = canvas.getContext('2d');
    const stream = canvas.captureStream(15);
    const recorder = new MediaRecorder(stream, { mimeType: 'video/webm' });
    const chunks = [];
    recorder.ondataavailable = (event) => chunks.push(event.data);
    const stopped = new Promise((resolve) => { recorder.onstop = resolve; });
    recorder.start();
    for (let frame = 0; frame < 12; frame += 1) {
      paint.fillStyle = `hsl(${frame * 30} 80% 50%)`;
      paint.fillRect(0, 0, 64, 48);
      await new Promise((resolve) => requestAnimationFrame(resolve));
    }
    recorder.stop();
    await stopped;
    return [...new Uint8Array(await new Blob(chunks).arrayBuffer())];
  });
  return Buffer.from(bytes);
}

const VOICE_REASON = /Voice messages are accepted from 08:00 to 12:00 in your timezone/;

function entryWithFile(page, filename) {
  return page.locator('#messages > li.entry').filter({ has: page.locator('.filename', { hasText: filename }) });
}

test('an image gets a text, a voice and an image reply, and they load', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await page.locator('#file').setInputFiles({ name: 'picture.png', mimeType: 'image/png', buffer: png(48) });
  await page.locator('#attachment', { hasText: 'picture.png' }).waitFor();
  await page.locator('#send').click();

  const entry = entryWithFile(page, 'picture.png');
  await entry.and(page.locator('[data-status="replied"]')).waitFor();
  await entry.locator('.reply-text').waitFor();
  const audio = entry.locator('.reply-voice audio');
  const image = entry.locator('.reply-image img');
  // What the person sent shows too, from the local file.
  await entry.locator('.message img.sent-image').evaluate((img) => img.decode());
  // Loaded for real: the picture decoded, the clip's metadata read by the media stack.
  await image.evaluate((img) => img.decode());
  assert.ok((await image.evaluate((img) => img.naturalWidth)) > 0, 'the image reply has pixels');
  await page.waitForFunction((el) => el.readyState >= HTMLMediaElement.HAVE_METADATA, await audio.elementHandle());
  assert.ok((await audio.evaluate((el) => el.duration)) > 0, 'the voice reply has a duration');
  assert.equal(await audio.evaluate((el) => el.error), null);
  const clip = await fetch(new URL(await audio.getAttribute('src'), kaiwa.url));
  assert.equal(clip.status, 200);
  assert.equal(clip.headers.get('content-type'), 'audio/wav');
  // Replies in the order the server sent them: text, voice, image.
  const kinds = await entry.locator('.replies > li').evaluateAll((items) => items.map((li) => li.className));
  assert.deepEqual(kinds.map((k) => k.split(' ')[1]), ['reply-text', 'reply-voice', 'reply-image']);
});

test('a voice message dropped outside its window is rejected with the reason', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: 'UTC' });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const zone = voiceClosedZone();
  await chooseTimezone(page, zone);
  await page.locator('#windows .window', { hasText: 'voice closed' }).waitFor();
  await dropFile(page, { name: 'note.wav', mimeType: 'audio/wav', buffer: wav() });
  await page.locator('#attachment', { hasText: 'note.wav' }).waitFor();
  await page.locator('#message').press('Enter');

  const entry = entryWithFile(page, 'note.wav');
  await entry.and(page.locator('[data-status="rejected"]')).waitFor();
  assert.equal(await entry.locator('.state').textContent(), 'rejected');
  const reason = await entry.locator('.reason').textContent();
  assert.match(reason, VOICE_REASON);
  assert.ok(reason.includes(zone), `the reason names ${zone}: ${reason}`);
  assert.equal(await entry.locator('.replies > li').count(), 0);
  await page.locator('#announcer p', { hasText: 'rejected' }).waitFor({ state: 'attached' });
  // The server stored it as rejected, with the same reason.
  const clientId = await page.locator('#client-id').inputValue();
  const history = await kaiwa.json(`/api/v1/clients/${clientId}/messages`);
  assert.equal(history.messages[0].status, 'rejected');
  assert.match(history.messages[0].reason, VOICE_REASON);
});

test('a rejected voice message shows its file name after a reload, and nothing else', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: voiceClosedZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await page.locator('#file').setInputFiles({ name: 'late.wav', mimeType: 'audio/wav', buffer: wav() });
  await page.locator('#send').click();
  await entryWithFile(page, 'late.wav').and(page.locator('[data-status="rejected"]')).waitFor();

  // From history now: the server keeps no file for a rejected message, so there is nothing to play.
  await page.reload();
  await waitConnected(page);
  const entry = entryWithFile(page, 'late.wav');
  await entry.and(page.locator('[data-status="rejected"]')).waitFor();
  assert.match(await entry.locator('.reason').textContent(), VOICE_REASON);
  assert.match(await entry.locator('.body').textContent(), /^late\.wav · \d+(\.\d)? (B|KiB)$/);
});

test('a voice message recorded with the microphone is sent as WebM', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: voiceClosedZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  const record = page.locator('#record');
  await record.click();
  await page.locator('#record[aria-pressed="true"]', { hasText: 'Stop 0:01' }).waitFor();
  await record.click();
  const chip = page.locator('#attachment', { hasText: /voice-\d+\.webm/ });
  await chip.waitFor();
  await page.locator('#send').click();
  // Outside the voice window here: a rejection (not an error) shows the server took the file
  // as WebM audio (it checks the bytes before the window).
  const entry = page.locator('#messages > li.entry[data-status="rejected"]');
  await entry.waitFor();
  assert.match(await entry.locator('.reason').textContent(), VOICE_REASON);
  assert.match(await entry.locator('.filename').textContent(), /voice-\d+\.webm/);
});

test('a file over the server limit is refused before it is sent', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone(), flags: ['--max-image-bytes', '100'] });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await page.locator('#file').setInputFiles({ name: 'big.png', mimeType: 'image/png', buffer: png(32) });
  const notice = page.locator('#notices .notice', { hasText: 'big.png' });
  await notice.waitFor();
  assert.match(await notice.textContent(), /up to 100 B/);
  assert.equal(await page.locator('#attachment').isHidden(), true);
  assert.equal(await page.locator('#messages > li.entry').count(), 0);
});

test('a video in its window shows as a video, before and after a reload', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: videoOpenZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  await page.locator('#windows .window', { hasText: 'video open' }).waitFor();
  const video = await recordVideo(page);
  await page.locator('#file').setInputFiles({ name: 'clip.webm', mimeType: 'video/webm', buffer: video });
  await page.locator('#attachment', { hasText: 'clip.webm' }).waitFor();
  await page.locator('#send').click();
  const entry = entryWithFile(page, 'clip.webm');
  await entry.and(page.locator('[data-status="replied"]')).waitFor();
  const kinds = await entry.locator('.replies > li').evaluateAll((items) => items.map((li) => li.classList[1]));
  assert.deepEqual(kinds, ['reply-text', 'reply-voice', 'reply-image']);

  // After a reload the video comes from the server's copy, which the browser can read.
  await page.reload();
  await waitConnected(page);
  const stored = entryWithFile(page, 'clip.webm').locator('video.sent-video');
  await stored.waitFor();
  assert.match(await stored.getAttribute('src'), /^\/media\/videos\/[0-9a-f]+\.webm$/);
  await page.waitForFunction((el) => el.readyState >= HTMLMediaElement.HAVE_METADATA, await stored.elementHandle());
  assert.equal(await stored.evaluate((el) => el.error), null);
});

test('a file the server refuses shows the server error on the message', async (t) => {
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone() });
  await page.goto(kaiwa.url);
  await waitConnected(page);
  // A PNG named as a JPEG: the server checks the bytes against the name.
  await page.locator('#file').setInputFiles({ name: 'photo.jpg', mimeType: 'image/jpeg', buffer: png(16) });
  await page.locator('#send').click();
  const entry = page.locator('#messages > li.entry[data-status="error"]');
  await entry.waitFor();
  assert.equal(await entry.locator('.state').textContent(), 'not sent');
  assert.match(await entry.locator('.reason').textContent(), /PNG/);
  // Nothing was stored, and the connection goes on.
  const clientId = await page.locator('#client-id').inputValue();
  assert.deepEqual((await kaiwa.json(`/api/v1/clients/${clientId}/messages`)).messages, []);
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'connected');
});
