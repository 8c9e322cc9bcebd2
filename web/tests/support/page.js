// What a test does and looks for on the page, by the names a person would use.

/** The status line's words once the page is connected. */
export async function waitConnected(page) {
  await page.locator('#status[data-state="connected"]').waitFor();
}

export function statusText(page) {
  return page.locator('#status-text');
}

/** The conversation entry (message and replies) whose own text contains `text`. */
export function entryWithText(page, text) {
  return page.locator('#messages > li.entry').filter({ has: page.locator('.message .text', { hasText: text }) });
}

export async function sendText(page, text) {
  const box = page.locator('#message');
  await box.fill(text);
  await box.press('Enter');
}

/** Chooses a timezone in the searchable picker, as a person types it. */
export async function chooseTimezone(page, zone) {
  const input = page.locator('#timezone');
  await input.fill(zone);
  await input.press('Enter');
  await page.locator('#status-text', { hasText: `(${zone})` }).waitFor();
}

/** Records every state each message shows, in order, so a test can check the path it took. */
export async function recordStates(page) {
  await page.evaluate(() => {
    window.__states = {};
    const list = document.getElementById('messages');
    const note = (entry) => {
      const key = entry.dataset.key;
      const seen = (window.__states[key] ??= []);
      if (entry.dataset.status && seen.at(-1) !== entry.dataset.status) seen.push(entry.dataset.status);
    };
    new MutationObserver((records) => {
      for (const record of records) {
        if (record.target.matches?.('li.entry')) note(record.target);
        for (const node of record.addedNodes) if (node.matches?.('li.entry')) note(node);
      }
    }).observe(list, { attributes: true, attributeFilter: ['data-status'], childList: true, subtree: true });
  });
}

export async function statesOf(entry) {
  const key = await entry.getAttribute('data-key');
  return entry.page().evaluate((k) => window.__states?.[k] ?? [], key);
}

/** Drops a file on the page the way a drag from the desktop does. */
export async function dropFile(page, { name, mimeType, buffer }) {
  const transfer = await page.evaluateHandle(({ name, mimeType, bytes }) => {
    const data = new DataTransfer();
    data.items.add(new File([new Uint8Array(bytes)], name, { type: mimeType }));
    return data;
  }, { name, mimeType, bytes: [...buffer] });
  await page.dispatchEvent('#scroller', 'dragenter', { dataTransfer: transfer });
  await page.locator('#drop').waitFor();
  await page.dispatchEvent('#scroller', 'drop', { dataTransfer: transfer });
}

/** The reply position this page keeps for `clientId` (null when it has none). */
export async function replyPosition(page, clientId) {
  const text = await page.evaluate((id) => localStorage.getItem(`kaiwa.replySeq.${id}`), clientId);
  return text === null ? null : Number(text);
}

/**
 * Puts a route between the page's sockets and the server that keeps every JSON frame, both
 * ways: `sent` (page to server) and `received`. `cut()` drops the network: the live socket
 * closes as a lost connection does and new ones fail, until `restore()`. `hold(matches)` keeps
 * the server's frames from the first one that matches on away from the page, in order, until
 * the function it returns is called: a test can then put what the page does meanwhile before
 * them. The route stays through reloads.
 */
export async function tapSockets(page) {
  const tap = {
    sent: [],
    received: [],
    down: false,
    live: null,
    /** The frames of `type` that went `way` ('sent' or 'received'). */
    frames(way, type) {
      return this[way].filter((frame) => frame.type === type);
    },
    async cut() {
      this.down = true;
      const { ws, server } = this.live;
      this.live = null;
      await server.close();
      await ws.close({ code: 1006, reason: '' });
    },
    restore() {
      this.down = false;
    },
    holding: null,
    hold(matches) {
      const holding = { matches, sends: null };
      this.holding = holding;
      return () => {
        if (this.holding === holding) this.holding = null;
        for (const send of holding.sends ?? []) send();
      };
    },
  };
  const keep = (list, message) => {
    if (typeof message !== 'string') return null;
    try {
      const frame = JSON.parse(message);
      list.push(frame);
      return frame;
    } catch {
      // Not JSON: not a frame a test looks at.
      return null;
    }
  };
  await page.routeWebSocket(/\/ws$/, (ws) => {
    if (tap.down) {
      ws.close({ code: 1006, reason: '' });
      return;
    }
    const server = ws.connectToServer();
    ws.onMessage((message) => {
      keep(tap.sent, message);
      server.send(message);
    });
    server.onMessage((message) => {
      const frame = keep(tap.received, message);
      const holding = tap.holding;
      // Once one frame is held, every later one is too: the page gets them in the server's order.
      if (holding && (holding.sends || (frame && holding.matches(frame)))) {
        (holding.sends ??= []).push(() => ws.send(message));
        return;
      }
      ws.send(message);
    });
    ws.onClose(() => server.close());
    server.onClose((code, reason) => ws.close({ code, reason }));
    tap.live = { ws, server };
  });
  return tap;
}

/** Sends `count` texts as `clientId` over a socket of its own, reads every reply, acknowledges none. */
export async function seed(page, url, { clientId, timezone, count, text = 'old message' }) {
  await page.goto(`${url}/health`);
  await page.evaluate(async ({ clientId, timezone, count, text }) => {
    // Message ids are the server's for good: each seeding has its own.
    const batch = Math.random().toString(36).slice(2, 10);
    const ws = new WebSocket(`ws://${location.host}/ws`, 'kaiwa.v1');
    await new Promise((resolve, reject) => {
      ws.onerror = reject;
      ws.onopen = () => ws.send(JSON.stringify({ type: 'hello', client_id: clientId, timezone }));
      let replied = 0;
      ws.onmessage = (event) => {
        const frame = JSON.parse(event.data);
        if (frame.type === 'welcome') {
          for (let n = 1; n <= count; n += 1) ws.send(JSON.stringify({ type: 'send', id: `seed-${batch}-${n}`, message_type: 'text', content: `${text} ${n}` }));
        }
        if (frame.type === 'status' && frame.status === 'replied' && (replied += 1) === count) resolve();
      };
    });
    ws.close();
    localStorage.setItem('kaiwa.clientId', clientId);
  }, { clientId, timezone, count, text });
}
