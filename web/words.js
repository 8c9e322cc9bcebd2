// What the page says to a person: close codes, error codes and message states in words.
// The codes are those of docs/protocol.md (crates/kaiwa-protocol/src/close.rs and error.rs).

/** A close the page makes itself when the server stops answering its pings. */
export const PING_TIMEOUT = 'ping_timeout';

/**
 * Why a connection ended, in words, and whether trying again can help.
 * `again`: 'retry' reconnects with backoff, 'stop' waits for the person.
 */
const CLOSES = {
  1000: { text: 'the connection was closed', again: 'stop' },
  1001: { text: 'the server is going away (shutting down or restarting)', again: 'retry' },
  1002: { text: 'the server did not understand the connection', again: 'stop' },
  1003: { text: 'the server does not take this kind of data', again: 'stop' },
  1005: { text: 'the connection was closed without a reason', again: 'retry' },
  1006: { text: 'the connection to the server was lost', again: 'retry' },
  1007: { text: 'the server could not read what the page sent (text that is not UTF-8)', again: 'stop' },
  1008: { text: 'the server refused the connection details', again: 'stop' },
  1009: { text: 'a file was too big for the server', again: 'stop' },
  1010: { text: 'the server does not offer what the page asked for', again: 'stop' },
  1011: { text: 'the server hit an internal error', again: 'retry' },
  1012: { text: 'the server is restarting', again: 'retry' },
  1013: { text: 'the server is full, retrying', again: 'retry' },
  1014: { text: 'a proxy could not reach the server', again: 'retry' },
  1015: { text: 'the secure connection failed', again: 'retry' },
  4001: { text: 'no answer to heartbeats', again: 'retry' },
  4003: { text: 'this page read too slowly and the server let it go', again: 'retry' },
  4004: { text: 'the connection details did not arrive in time', again: 'retry' },
  4005: { text: 'the server had too many connections starting at once, retrying', again: 'retry' },
  // Reconnecting at once would only hold an idle slot again, which is what the server
  // freed; the next message sent reconnects instead.
  4502: { text: 'no message was sent soon after connecting, so the server freed the connection; sending one connects again', again: 'stop' },
  4509: { text: 'another tab is connected with this id', again: 'stop' },
  4510: { text: 'another tab took over this id', again: 'stop' },
  4601: { text: 'this server needs a token: paste yours above', again: 'stop' },
  4602: { text: 'the token is not one this server reads: check that it was pasted whole', again: 'stop' },
  4603: { text: 'the token has expired: paste a new one above', again: 'stop' },
  4604: { text: 'the token was not signed by this server: paste one from it', again: 'stop' },
  4605: { text: 'the token is for another service: paste one for this server', again: 'stop' },
  4606: { text: 'the token is for another client id', again: 'stop' },
  [PING_TIMEOUT]: { text: 'the server stopped answering pings', again: 'retry' },
};

/** @returns {{text: string, again: 'retry'|'stop'}} */
export function describeClose(code, detail) {
  const known = CLOSES[code];
  if (known) return known;
  const text = detail ? `the connection closed (${code}: ${detail})` : `the connection closed (code ${code})`;
  // kaiwa's own codes say by their range whether to come back, so a code newer than this page
  // is still handled right; any other code may be a passing network or proxy failure.
  const stop = code >= 4500 && code <= 4999;
  return { text, again: stop ? 'stop' : 'retry' };
}

/** Times of day as the page shows them everywhere: 24-hour `HH:MM` in `timeZone`. */
export function clockFormat(timeZone) {
  return new Intl.DateTimeFormat('en-GB', { hour: '2-digit', minute: '2-digit', hourCycle: 'h23', timeZone });
}

/** Error codes whose server message is clear enough alone get no entry here. */
const ERRORS = {
  busy: 'the server is busy; sending again shortly',
  shutting_down: 'the server is shutting down; it will be sent after reconnecting',
  processing_failed: 'stored, but its replies could not be made; the server tries it again shortly',
  internal: 'the server could not store it; send it again',
  over_capacity: 'the server is full',
  duplicate_connection: 'another tab is connected with this id',
  unknown_timezone: 'the server does not know this timezone',
  invalid_client_id: 'the client id is not valid',
  expired_token: 'the token has expired',
  client_id_mismatch: 'the token is for another client id',
};

/** A readable line for an error frame: our words first, then the server's own detail. */
export function describeError(frame) {
  const ours = ERRORS[frame.code];
  const theirs = typeof frame.message === 'string' ? frame.message : '';
  if (ours && theirs && !theirs.toLowerCase().startsWith(ours.toLowerCase())) return `${ours} (${theirs})`;
  return ours || theirs || `error ${frame.code}`;
}

/** The label shown next to a message for each state it moves through. */
export const STATES = {
  queued: 'waiting for the connection',
  sending: 'sending',
  uploading: 'uploading',
  busy: 'server busy, retrying',
  accepted: 'accepted',
  processing: 'processing',
  replied: 'replied',
  rejected: 'rejected',
  error: 'not sent',
  unknown: 'earlier message',
};

export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}
