// The page: settings (client id, timezone, theme), the composer, sending with retries across
// reconnects, and history. It wires the connection, the conversation and the views together.

import { Connection, socketUrl } from './protocol.js';
import { Conversation } from './conversation.js';
import { ChatView, StatusView, el, notice, uploads } from './ui.js';
import { VoiceRecorder, canRecord, checkFile, checkText, kindOf, safeName } from './media.js';
import { clockFormat, describeError, formatBytes } from './words.js';

const $ = (id) => document.getElementById(id);

const KEYS = {
  clientId: 'kaiwa.clientId',
  timezone: 'kaiwa.timezone',
  theme: 'kaiwa.theme',
  connect: 'kaiwa.connect',
  /** Followed by the client id: each id has its own reply stream. */
  replySeq: 'kaiwa.replySeq.',
  /** The token, on a server with auth on: in this tab's session storage only. */
  token: 'kaiwa.token',
};
const HISTORY_PAGE = 30;
const UPLOAD_POLL_MS = 100;
// Errors after which sending the same message again can work.
const RETRYABLE = new Set(['internal', 'expected_binary', 'unexpected_binary']);

const saved = {
  get(key) {
    try {
      return localStorage.getItem(key);
    } catch {
      return null;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem(key, value);
    } catch {
      // Storage can be off (private mode, policy): the page works, it only forgets.
    }
  },
};

/**
 * Where this browser stands in `clientId`'s reply stream: the `seq` of the last reply it
 * processed, kept per id so that a reload resumes exactly there. Storage is read on every use,
 * so a tab that connects after another one with the same id starts where that one stopped; the
 * copy in memory serves when storage is off.
 *
 * A brand-new id starts at 0. An id this browser has no position for (opened in a second
 * browser, or storage cleared) has null: the connection then starts at the server's latest
 * reply (see `Connection`), because the history comes over HTTP on welcome and replaying all of
 * it as missed would only show the same replies again, late. Nothing falls between: the server
 * fixes the start when it reads the hello, the history fetched after welcome holds every reply up
 * to that start, and every later one comes over the socket. Taking the position from the newest
 * `seq` in the loaded history instead would need the history before the hello, and its newest
 * page need not hold the newest reply (a slow reply to an older message). The server counts the
 * start as acknowledged: those replies are this browser's to read in the history.
 */
function replyPosition(clientId, start = null) {
  const key = KEYS.replySeq + clientId;
  const parse = (text) => {
    const seq = text === null ? NaN : Number(text);
    return Number.isSafeInteger(seq) && seq >= 0 ? seq : null;
  };
  let kept = parse(saved.get(key));
  if (kept === null && start !== null) {
    kept = start;
    saved.set(key, String(start));
  }
  return {
    get: () => parse(saved.get(key)) ?? kept,
    set(seq) {
      kept = seq;
      saved.set(key, String(seq));
    },
  };
}

/** Whether the server needs a token: it says so in the page (`<meta name="kaiwa-auth">`). */
const authRequired = document.querySelector('meta[name="kaiwa-auth"]')?.content === 'token';

const tab = {
  get(key) {
    try {
      return sessionStorage.getItem(key);
    } catch {
      return null;
    }
  },
  set(key, value) {
    try {
      if (value === null) sessionStorage.removeItem(key);
      else sessionStorage.setItem(key, value);
    } catch {
      // Storage can be off: the token lasts as long as the page.
    }
  },
};

/**
 * What a token says about itself: its `sub` (the client id) and `exp`. The page only reads it to
 * know who it will be; the server checks the signature.
 */
function tokenClaims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '=')));
    return typeof claims.sub === 'string' && claims.sub ? claims : null;
  } catch {
    return null;
  }
}

function randomHex(bytes) {
  // getRandomValues works on plain http too, unlike randomUUID.
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Message ids are remembered by the server for good: a random prefix per page load keeps them unique. */
const idPrefix = randomHex(6);
let idCounter = 0;
const nextMessageId = () => `${idPrefix}-${(idCounter += 1)}`;

// --- elements ---

const ui = {
  status: $('status'),
  statusText: $('status-text'),
  countdown: $('countdown'),
  retry: $('retry'),
  connect: $('connect'),
  theme: $('theme'),
  clientId: $('client-id'),
  clientIdError: $('client-id-error'),
  timezone: $('timezone'),
  timezoneError: $('timezone-error'),
  timezones: $('timezones'),
  windows: $('windows'),
  notices: $('notices'),
  scroller: $('scroller'),
  messages: $('messages'),
  older: $('older'),
  historyState: $('history-state'),
  drop: $('drop'),
  composer: $('composer'),
  message: $('message'),
  file: $('file'),
  attach: $('attach'),
  record: $('record'),
  attachment: $('attachment'),
  announcer: $('announcer'),
  tokenField: $('token-field'),
  token: $('token'),
  tokenError: $('token-error'),
};

// --- state ---

const zones = (() => {
  const list = typeof Intl.supportedValuesOf === 'function' ? Intl.supportedValuesOf('timeZone') : [];
  return list.includes('UTC') ? list : ['UTC', ...list];
})();

const rememberedId = saved.get(KEYS.clientId);
const app = {
  clientId: rememberedId || `web-${randomHex(4)}`,
  timezone: saved.get(KEYS.timezone) || Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC',
  limits: null,
  windows: null,
  /** The server's clock minus this browser's, from welcome: the server judges the windows. */
  clockSkewMs: 0,
  /** Messages sent but not acked, by entry key, in the order sent: resent after a reconnect. */
  pending: new Map(),
  history: { loaded: false, cursor: null, loading: false },
  staged: null,
  recorder: null,
  /** The token, when the server needs one. */
  token: authRequired ? tab.get(KEYS.token) : null,
};
if (authRequired && app.token) {
  // With auth on, the client id is the token's.
  const claims = tokenClaims(app.token);
  if (claims) app.clientId = claims.sub;
}
saved.set(KEYS.clientId, app.clientId);
// An id made up just now has no replies yet.
app.position = replyPosition(app.clientId, rememberedId ? null : 0);

const connection = new Connection(socketUrl(window.location));
const view = new ChatView({ scroller: ui.scroller, list: ui.messages });
const conversation = new Conversation(view);
const status = new StatusView({ root: ui.status, text: ui.statusText, countdown: ui.countdown, retry: ui.retry });
view.setTimezone(app.timezone);

function say(text, kind = 'error') {
  notice(ui.notices, text, kind);
}

/** Tells screen readers about something that arrived, without moving focus. */
function announce(text) {
  ui.announcer.append(el('p', {}, text));
  while (ui.announcer.children.length > 5) ui.announcer.firstElementChild.remove();
}

// --- connection ---

function connect() {
  saved.set(KEYS.connect, '1');
  if (authRequired && !app.token) {
    status.show({ state: 'disconnected', reason: 'this server needs a token: paste yours above', retryAt: 0 }, app);
    ui.token.focus();
    return;
  }
  connection.open(app.clientId, app.timezone, app.position, app.token);
}

/** A token the person gave: it names the client, and refreshes a live connection. */
function useToken(token) {
  const claims = tokenClaims(token);
  showProblem(ui.token, ui.tokenError, claims ? null : 'This is not a token (three parts separated by dots, with a client id).');
  if (!claims) return;
  app.token = token;
  tab.set(KEYS.token, token);
  if (claims.sub !== app.clientId) {
    app.clientId = claims.sub;
    ui.clientId.value = claims.sub;
    saved.set(KEYS.clientId, claims.sub);
    app.position = replyPosition(claims.sub);
    resetConversation();
    connect();
  } else if (connection.ready) {
    connection.refresh(token);
  } else {
    connect();
  }
}

if (authRequired) {
  ui.tokenField.hidden = false;
  ui.clientId.readOnly = true;
  if (app.token) ui.token.value = app.token;
  ui.token.addEventListener('change', () => useToken(ui.token.value.trim()));
  // History files need the token in a header, which an <img src> cannot send.
  uploads.fetcher = async (url) => {
    const response = await fetch(url, { headers: { Authorization: `Bearer ${app.token}` } });
    return response.ok ? URL.createObjectURL(await response.blob()) : null;
  };
}

function disconnect() {
  saved.set(KEYS.connect, '0');
  connection.close('you disconnected');
}

connection.addEventListener('state', (event) => {
  const { state } = event.detail;
  status.show(event.detail, app);
  const down = state === 'disconnected';
  ui.connect.textContent = down ? 'Connect' : 'Disconnect';
  if (state !== 'connected') {
    for (const { entry } of app.pending.values()) {
      if (['sending', 'uploading', 'busy'].includes(entry.status)) conversation.update(entry, { status: 'queued', progress: null });
    }
  }
});

connection.addEventListener('welcome', (event) => {
  const welcome = event.detail;
  app.limits = welcome.limits ?? null;
  app.windows = welcome.windows ?? null;
  const serverTime = Date.parse(welcome.server_time);
  app.clockSkewMs = Number.isFinite(serverTime) ? serverTime - Date.now() : 0;
  if (welcome.timezone && welcome.timezone !== app.timezone) {
    // The server's spelling is the canonical one.
    app.timezone = welcome.timezone;
    ui.timezone.value = welcome.timezone;
    saved.set(KEYS.timezone, welcome.timezone);
  }
  renderWindows();
  for (const item of app.pending.values()) transmit(item);
  loadLatest();
});

connection.addEventListener('frame', (event) => onFrame(event.detail));

ui.connect.addEventListener('click', () => (connection.state === 'disconnected' ? connect() : disconnect()));
ui.retry.addEventListener('click', () => connection.retryNow());
window.addEventListener('online', () => connection.retryNow());
// A page going away may never run its acknowledgement timer, and replies it showed would be
// recorded as failed. Hidden is the last sure moment on a phone; pagehide covers browsers that
// do not report hidden when the page navigates away.
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'hidden') connection.acknowledge();
});
window.addEventListener('pagehide', () => connection.acknowledge());

function onFrame(frame) {
  switch (frame.type) {
    case 'ack': {
      const entry = conversation.apply(frame);
      if (!entry) return;
      app.pending.delete(entry.key);
      if (frame.status === 'rejected') announce(`Your ${entry.type || 'message'} was rejected: ${frame.reason ?? ''}`);
      return;
    }
    case 'status':
    case 'delta':
      conversation.apply(frame);
      return;
    case 'reply': {
      const entry = conversation.apply(frame);
      const reply = frame.reply;
      if (!entry || !reply) return;
      const what = reply.reply_type === 'text' ? `Reply: ${reply.content}` : `${reply.reply_type === 'voice' ? 'Voice' : 'Image'} reply`;
      announce(frame.missed ? `${what} (arrived after reconnecting)` : what);
      return;
    }
    case 'error':
      onError(frame);
      return;
    case 'token_expired': {
      const seconds = Math.round((Number(frame.closes_in_ms) || 0) / 1000);
      say(`Your token has expired: paste a new one within ${seconds} s to stay connected.`);
      showProblem(ui.token, ui.tokenError, 'Expired: paste a new token.');
      ui.token.focus();
      return;
    }
    case 'refreshed':
      showProblem(ui.token, ui.tokenError, null);
      say('Token refreshed.', 'info');
      return;
    case 'synced':
      if (frame.replies > 0) announce(`${frame.replies} missed ${frame.replies === 1 ? 'reply' : 'replies'} arrived`);
      return;
    default:
      return;
  }
}

function onError(frame) {
  const entry = frame.id ? conversation.find(frame) : null;
  if (!entry) {
    // The close that follows these already says it in the status line.
    if (!['duplicate_connection', 'over_capacity', 'shutting_down'].includes(frame.code)) say(`Server: ${describeError(frame)}`);
    return;
  }
  const item = app.pending.get(entry.key);
  switch (frame.code) {
    case 'busy': {
      conversation.update(entry, { status: 'busy', progress: null });
      const wait = Number(frame.retry_after_ms) || 1000;
      setTimeout(() => {
        if (item && app.pending.has(entry.key) && entry.status === 'busy') transmit(item);
      }, wait);
      return;
    }
    case 'shutting_down':
      // Nothing was stored: it goes again after the reconnect.
      conversation.update(entry, { status: 'queued', progress: null });
      return;
    case 'processing_failed':
      conversation.update(entry, { reason: describeError(frame) });
      return;
    default:
      app.pending.delete(entry.key);
      conversation.update(entry, { status: 'error', progress: null, reason: describeError(frame), canRetry: RETRYABLE.has(frame.code), retry: item ?? null });
  }
}

// --- sending ---

/** Sends (or resends, with the same id, which the server answers only once) one message. */
function transmit(item) {
  const { entry, frame, bytes } = item;
  if (!connection.ready) {
    conversation.update(entry, { status: 'queued', progress: null });
    if (connection.state === 'disconnected') connect();
    return;
  }
  if (bytes) {
    connection.sendFile(frame, bytes);
    conversation.update(entry, { status: 'uploading', progress: 0 });
    followUpload(entry, connection.bufferedAmount);
  } else {
    connection.send(frame);
    conversation.update(entry, { status: 'sending', progress: null });
  }
}

/** Progress of a file going up: what the browser still holds of it, until the ack. */
function followUpload(entry, queued) {
  const tick = () => {
    if (entry.status !== 'uploading') return;
    const left = connection.bufferedAmount;
    if (left === 0) {
      conversation.update(entry, { status: 'sending', progress: null });
      return;
    }
    conversation.update(entry, { progress: Math.max(0, Math.min(1, 1 - left / Math.max(queued, 1))) });
    setTimeout(tick, UPLOAD_POLL_MS);
  };
  setTimeout(tick, UPLOAD_POLL_MS);
}

function sendText(text) {
  const id = nextMessageId();
  const entry = conversation.addOutgoing({ clientMsgId: id, type: 'text', text });
  const frame = { type: 'send', id, message_type: 'text', content: text, timestamp: new Date().toISOString() };
  queue({ entry, frame, bytes: null });
}

async function sendFile(file, kind) {
  const bytes = await file.arrayBuffer();
  const id = nextMessageId();
  const filename = safeName(file.name, `${kind}`);
  const entry = conversation.addOutgoing({
    clientMsgId: id, type: kind, filename, size: file.size, mediaUrl: URL.createObjectURL(file),
  });
  const frame = { type: 'send', id, message_type: kind, filename, timestamp: new Date().toISOString() };
  queue({ entry, frame, bytes });
}

function queue(item) {
  app.pending.set(item.entry.key, item);
  view.scrollToBottom();
  transmit(item);
}

ui.messages.addEventListener('click', (event) => {
  const button = event.target.closest('button[data-action="again"]');
  if (!button) return;
  const entry = conversation.entries().find((e) => e.key === button.dataset.key);
  if (!entry?.retry) return;
  // A new id: the old one is remembered by the server with its failure.
  const id = nextMessageId();
  const item = { ...entry.retry, frame: { ...entry.retry.frame, id } };
  conversation.update(entry, { clientMsgId: id, status: 'queued', reason: null, canRetry: false, retry: null });
  queue(item);
});

// --- composer ---

function stage(file) {
  const kind = kindOf(file);
  const problem = checkFile(file, kind, app.limits);
  if (problem) {
    say(problem);
    return;
  }
  app.staged = { file, kind };
  const remove = el('button', { type: 'button', className: 'link', 'aria-label': `Remove ${file.name}` }, 'Remove');
  remove.addEventListener('click', () => unstage(true));
  ui.attachment.replaceChildren(
    el('span', { className: 'kind' }, kind),
    el('span', { className: 'name' }, file.name),
    el('span', { className: 'size' }, formatBytes(file.size)),
    remove,
  );
  ui.attachment.hidden = false;
  ui.message.focus();
}

function unstage(refocus) {
  app.staged = null;
  ui.attachment.hidden = true;
  ui.attachment.replaceChildren();
  ui.file.value = '';
  if (refocus) ui.message.focus();
}

ui.composer.addEventListener('submit', async (event) => {
  event.preventDefault();
  const text = ui.message.value;
  const staged = app.staged;
  if (!staged && !text.trim()) return;
  if (text.trim()) {
    const problem = checkText(text, app.limits);
    if (problem) {
      say(problem);
      return;
    }
  }
  if (staged) {
    // Limits may have arrived (or changed) since the file was picked.
    const problem = checkFile(staged.file, staged.kind, app.limits);
    if (problem) {
      say(problem);
      unstage(true);
      return;
    }
    unstage(false);
    try {
      await sendFile(staged.file, staged.kind);
    } catch (err) {
      say(`Could not read “${staged.file.name}”: ${err.message}`);
    }
  }
  if (text.trim()) sendText(text);
  ui.message.value = '';
  fitMessageBox();
  ui.message.focus();
});

ui.message.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

function fitMessageBox() {
  ui.message.style.height = 'auto';
  ui.message.style.height = `${ui.message.scrollHeight}px`;
}
ui.message.addEventListener('input', fitMessageBox);

ui.message.addEventListener('paste', (event) => {
  const file = event.clipboardData?.files?.[0];
  if (file) {
    event.preventDefault();
    stage(file);
  }
});

ui.attach.addEventListener('click', () => ui.file.click());
ui.file.addEventListener('change', () => {
  const file = ui.file.files?.[0];
  if (file) stage(file);
});

// Drag and drop anywhere on the page; the counter survives dragenter/dragleave of children.
let dragDepth = 0;
const carriesFiles = (event) => [...(event.dataTransfer?.types ?? [])].includes('Files');
document.addEventListener('dragenter', (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  dragDepth += 1;
  ui.drop.hidden = false;
});
document.addEventListener('dragover', (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = 'copy';
});
document.addEventListener('dragleave', () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) ui.drop.hidden = true;
});
document.addEventListener('drop', (event) => {
  dragDepth = 0;
  ui.drop.hidden = true;
  const file = event.dataTransfer?.files?.[0];
  if (!file) return;
  event.preventDefault();
  stage(file);
});

// Voice recording with the microphone.
if (!canRecord()) {
  ui.record.disabled = true;
  ui.record.title = 'Recording needs microphone access on https or localhost';
}
ui.record.addEventListener('click', async () => {
  if (app.recorder) {
    const recorder = app.recorder;
    app.recorder = null;
    showRecording(null);
    try {
      stage(await recorder.stop());
    } catch (err) {
      say(`The recording failed: ${err.message}`);
    }
    return;
  }
  try {
    app.recorder = await VoiceRecorder.start();
    showRecording(app.recorder);
  } catch (err) {
    say(`Could not use the microphone: ${err.message}`);
  }
});

let recordingTimer = null;
function showRecording(recorder) {
  clearInterval(recordingTimer);
  ui.record.setAttribute('aria-pressed', String(Boolean(recorder)));
  if (!recorder) {
    ui.record.textContent = 'Record';
    return;
  }
  const show = () => {
    const seconds = Math.floor((Date.now() - recorder.startedAt) / 1000);
    ui.record.textContent = `Stop ${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, '0')}`;
  };
  show();
  recordingTimer = setInterval(show, 500);
}

// --- history ---

async function fetchPage(clientId, before) {
  const params = new URLSearchParams({ limit: String(HISTORY_PAGE) });
  if (before) params.set('before', before);
  const headers = app.token ? { Authorization: `Bearer ${app.token}` } : {};
  const response = await fetch(`/api/v1/clients/${encodeURIComponent(clientId)}/messages?${params}`, { cache: 'no-store', headers });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(body?.message ?? `the server answered ${response.status}`);
  return body;
}

/**
 * A page of history without the replies the socket owes this page. While connected, every reply
 * after the reply position comes over the socket, in order, those due while the page was away
 * marked missed; the history requested on welcome is read while that replay runs, and holds some
 * of them too. Shown from the history, such a reply would lose its mark, and the socket's copy
 * would then be dropped as one already shown. Disconnected, nothing is on its way, so the history
 * shows all it has.
 */
function historyOwnPart(messages) {
  const position = app.position.get();
  if (position === null || !connection.ready) return messages;
  return messages.map((message) => ({
    ...message,
    replies: (message.replies ?? []).filter((reply) => !(reply.seq > position)),
  }));
}

/** The newest page, on every connect: the first fills the view, later ones reconcile it. */
async function loadLatest() {
  const clientId = app.clientId;
  try {
    const page = await fetchPage(clientId, null);
    if (clientId !== app.clientId) return;
    const first = !app.history.loaded;
    view.keepingPosition(() => {
      conversation.merge(historyOwnPart(page.messages));
      if (first) {
        app.history.loaded = true;
        app.history.cursor = page.next_cursor;
      }
      showHistoryState();
    });
    if (first) view.scrollToBottom();
  } catch (err) {
    say(`Could not load the history: ${err.message}`);
  }
  showHistoryState();
  fillView();
}

async function loadOlder() {
  const history = app.history;
  if (!history.loaded || !history.cursor || history.loading) return;
  const clientId = app.clientId;
  history.loading = true;
  showHistoryState();
  try {
    const page = await fetchPage(clientId, history.cursor);
    if (clientId !== app.clientId) return;
    // Everything that changes height above the view happens inside, so none of it moves it.
    view.keepingPosition(() => {
      conversation.merge(historyOwnPart(page.messages));
      history.cursor = page.next_cursor;
      history.loading = false;
      showHistoryState();
    });
  } catch (err) {
    say(`Could not load older messages: ${err.message}`);
  } finally {
    history.loading = false;
    showHistoryState();
  }
  fillView();
}

/** Loads older pages until the view can scroll, so scrolling up can ask for more. */
function fillView() {
  if (app.history.cursor && !view.overflowing) loadOlder();
}

function showHistoryState() {
  const { loaded, cursor, loading } = app.history;
  ui.older.hidden = !loaded || !cursor;
  ui.older.disabled = loading;
  ui.older.textContent = loading ? 'Loading older messages…' : 'Load older messages';
  ui.historyState.textContent = loaded && !cursor && conversation.entries().length ? 'This is the beginning of the conversation.' : '';
}

ui.older.addEventListener('click', () => loadOlder());
ui.scroller.addEventListener('scroll', () => {
  if (view.nearTop) loadOlder();
}, { passive: true });

function resetConversation() {
  conversation.clear();
  view.clear();
  app.pending.clear();
  app.history = { loaded: false, cursor: null, loading: false };
  showHistoryState();
}

// --- settings ---

function clientIdProblem(value) {
  if (!value) return 'Enter a client id.';
  if (new TextEncoder().encode(value).length > 128) return 'A client id is at most 128 bytes.';
  if (value.includes('/')) return 'A client id cannot contain “/”.';
  if (/[\u0000-\u001f\u007f]/.test(value)) return 'A client id cannot contain control characters.';
  return null;
}

function showProblem(input, output, problem) {
  input.setAttribute('aria-invalid', String(Boolean(problem)));
  output.textContent = problem ?? '';
  output.hidden = !problem;
}

ui.clientId.value = app.clientId;
ui.clientId.addEventListener('change', () => {
  const value = ui.clientId.value.trim();
  const problem = clientIdProblem(value);
  showProblem(ui.clientId, ui.clientIdError, problem);
  if (problem || value === app.clientId) return;
  app.clientId = value;
  saved.set(KEYS.clientId, value);
  app.position = replyPosition(value);
  resetConversation();
  if (connection.state !== 'disconnected') connect();
});

ui.timezones.replaceChildren(...zones.map((zone) => el('option', { value: zone })));
ui.timezone.value = app.timezone;
ui.timezone.addEventListener('change', () => {
  const typed = ui.timezone.value.trim();
  const zone = zones.find((z) => z.toLowerCase() === typed.toLowerCase()) ?? (zones.length > 1 ? null : typed);
  showProblem(ui.timezone, ui.timezoneError, zone ? null : `“${typed}” is not a timezone this browser knows; pick one from the list.`);
  if (!zone || zone === app.timezone) return;
  app.timezone = zone;
  ui.timezone.value = zone;
  saved.set(KEYS.timezone, zone);
  view.setTimezone(zone);
  renderWindows();
  if (connection.state !== 'disconnected') connect();
});

/** Which message types the server would take now in the chosen timezone, by the server's clock. */
function renderWindows() {
  let minutes;
  let clock;
  try {
    // The messages' times come from the same formatter: the header and they always agree.
    const format = clockFormat(app.timezone);
    const now = new Date(Date.now() + app.clockSkewMs);
    const parts = format.formatToParts(now);
    minutes = Number(parts.find((p) => p.type === 'hour')?.value) * 60 + Number(parts.find((p) => p.type === 'minute')?.value);
    clock = format.format(now);
  } catch {
    ui.windows.textContent = '';
    return;
  }
  const parts = [el('span', { className: 'clock' }, `${clock} in ${app.timezone}`)];
  const toMinutes = (hhmm) => {
    const [h, m] = hhmm.split(':').map(Number);
    return h * 60 + m;
  };
  for (const { message_type: type, start, end } of app.windows ?? []) {
    const from = toMinutes(start);
    const to = toMinutes(end);
    // `22:00-02:00` runs over midnight.
    const open = from <= to ? minutes >= from && minutes < to : minutes >= from || minutes < to;
    parts.push(el('span', { className: `window ${open ? 'open' : 'closed'}` }, `${type} ${open ? 'open' : 'closed'} (${start}–${end})`));
  }
  ui.windows.replaceChildren(...parts);
}
setInterval(renderWindows, 30000);

// --- theme ---

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  // The button says what it does: the other theme.
  ui.theme.textContent = theme === 'light' ? 'Dark theme' : 'Light theme';
}
applyTheme(saved.get(KEYS.theme) === 'light' ? 'light' : 'dark');
ui.theme.addEventListener('click', () => {
  const theme = document.documentElement.dataset.theme === 'light' ? 'dark' : 'light';
  saved.set(KEYS.theme, theme);
  applyTheme(theme);
});

// --- start ---

renderWindows();
showHistoryState();
if (saved.get(KEYS.connect) === '0') status.show({ state: 'disconnected', reason: '', retryAt: 0 }, app);
else connect();
