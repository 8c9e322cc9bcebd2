// The page over https:// with a certificate made for the run (rcgen, by the dev_cert example):
// it loads, connects over wss://, and a message gets its reply.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { session } from './support/browser.js';
import { devCertificate } from './support/kaiwa.js';
import { textOpenZone } from './support/fixtures.js';
import { entryWithText, sendText, waitConnected } from './support/page.js';

test('the page works over https and talks over wss', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'kaiwa-dev-cert-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const tls = devCertificate(dir);
  const { page, kaiwa } = await session(t, { timezoneId: textOpenZone(), tls });
  const sockets = [];
  page.on('websocket', (socket) => sockets.push(socket.url()));
  await page.goto(kaiwa.url);
  assert.equal(new URL(page.url()).protocol, 'https:');
  await waitConnected(page);
  assert.ok(sockets.length > 0 && sockets.every((url) => url.startsWith('wss://localhost:')), sockets.join(', '));
  await sendText(page, 'hello over TLS');
  await entryWithText(page, 'hello over TLS').locator('.reply-text').waitFor();
  const health = await kaiwa.json('/health');
  assert.equal(health.status, 'ok');
});
