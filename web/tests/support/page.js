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
