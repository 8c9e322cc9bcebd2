// The connection to kaiwa over the native protocol `kaiwa.v1`: hello, reconnect with backoff,
// application-level pings (a browser cannot send WebSocket pings), frames in and out, and the
// place in the reply stream that makes every reply arrive exactly once across reconnects.

import { describeClose, PING_TIMEOUT } from './words.js';

export const SUBPROTOCOL = 'kaiwa.v1';

const BACKOFF_FIRST_MS = 1000;
const BACKOFF_MAX_MS = 15000;
// A full server sheds load: do not come back the next second.
const BACKOFF_FULL_MS = 3000;
const PING_EVERY_MS = 15000;
const PONG_WITHIN_MS = 10000;
// Acknowledgements are cumulative: one `received` covers a burst of replies.
const ACK_EVERY_MS = 250;
// An `after` past the end of the stream, which the server takes as its latest reply.
const LATEST = Number.MAX_SAFE_INTEGER;

/** The WebSocket address of the server that served this page. */
export function socketUrl(location) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}

/**
 * One logical connection that stays up while the person wants it: it reconnects after the
 * closes that allow it, with exponential backoff and jitter, and says why it is down.
 *
 * Events (`CustomEvent.detail`):
 * - `state`: `{state, reason, retryAt}`, state being `disconnected`, `connecting`, `connected` or
 *   `reconnecting` (waiting until `retryAt` for the next attempt).
 * - `welcome`: the welcome frame; the connection is ready for `send`.
 * - `frame`: every other server frame. A `reply` is processed once its listeners return: the
 *   position moves past it then, and the server is told (`received`) soon after.
 *
 * The position is the `seq` of the last reply processed, or null when this browser has none
 * for the client id: `{get(): ?number, set(seq)}`, kept by the page.
 */
export class Connection extends EventTarget {
  #url;
  #ws = null;
  #identity = null;
  #position = null;
  /** The last `seq` the server has as acknowledged by this socket (its hello's `after`, then `received`). */
  #acked = 0;
  #ackTimer = null;
  #want = false;
  #attempt = 0;
  #retryTimer = null;
  #pingTimer = null;
  #pingSentAt = 0;
  #nonce = 0;
  /** The last error frame of this socket: it explains a close that follows (e.g. 1008). */
  #lastError = null;
  state = 'disconnected';
  reason = '';
  retryAt = 0;
  welcome = null;

  constructor(url) {
    super();
    this.#url = url;
  }

  get ready() {
    return this.state === 'connected';
  }

  /** Bytes given to `send` that the browser has not written to the network yet. */
  get bufferedAmount() {
    return this.#ws ? this.#ws.bufferedAmount : 0;
  }

  /**
   * Connects (or reconnects now) as `clientId` in `timezone`, resuming after `position`. With
   * a `token` (a server with auth on), the token says who the client is.
   */
  open(clientId, timezone, position, token = null) {
    // The old socket acknowledges the old id's replies before it goes.
    this.#teardown(1000, 'reconnecting with new details');
    this.#identity = { clientId, timezone, token };
    this.#position = position;
    this.#want = true;
    this.#attempt = 0;
    this.#connect();
  }

  /** Skips the rest of a backoff wait. */
  retryNow() {
    if (this.#want && this.state === 'reconnecting') this.#connect();
  }

  /** Disconnects for good, until `open` again. */
  close(reason = 'you disconnected') {
    this.#want = false;
    this.#teardown(1000, 'closed by the user');
    this.#setState('disconnected', reason);
  }

  /** Tells the server now about the replies processed since the last `received`. */
  acknowledge() {
    clearTimeout(this.#ackTimer);
    this.#ackTimer = null;
    const ws = this.#ws;
    const seq = this.#position?.get();
    if (!ws || ws.readyState !== WebSocket.OPEN || !this.welcome || seq === null || seq === undefined) return;
    // Not `>`: after a clamped `after` the position can be below what the hello claimed.
    if (seq === this.#acked) return;
    ws.send(JSON.stringify({ type: 'received', seq }));
    this.#acked = seq;
  }

  /**
   * A new token for this connection (the server asked, with `token_expired`, or the old one is
   * about to run out); later connections use it too.
   */
  refresh(token) {
    if (this.#identity) this.#identity.token = token;
    return this.send({ type: 'refresh', token });
  }

  /** Sends one JSON frame; false when not connected. */
  send(frame) {
    if (!this.ready) return false;
    this.#ws.send(JSON.stringify(frame));
    return true;
  }

  /** Sends a `send` frame with `binary: true` and the file right after it, as one unit. */
  sendFile(frame, bytes) {
    if (!this.ready) return false;
    this.#ws.send(JSON.stringify({ ...frame, binary: true }));
    this.#ws.send(bytes);
    return true;
  }

  #connect() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#teardown(1000, 'reconnecting');
    this.#lastError = null;
    this.welcome = null;
    this.#setState('connecting', '');
    let ws;
    try {
      ws = new WebSocket(this.#url, SUBPROTOCOL);
    } catch (err) {
      this.#closed(1006, String(err));
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.#ws = ws;
    ws.addEventListener('open', () => {
      if (ws !== this.#ws) return;
      const { clientId, timezone, token } = this.#identity;
      // Every reply after the last one processed comes first, marked missed, then `synced`.
      // Without a position the stream starts at the server's latest reply: the history this
      // page loads on welcome holds everything before it (see `replyPosition` in app.js).
      const after = this.#position.get() ?? LATEST;
      // The server counts `after` as acknowledged.
      this.#acked = after;
      const hello = { type: 'hello', client_id: clientId, timezone, after };
      // In the frame, not the URL: a URL may end up in logs on the way.
      if (token) hello.token = token;
      ws.send(JSON.stringify(hello));
    });
    ws.addEventListener('message', (event) => {
      if (ws !== this.#ws) return;
      this.#received(event.data);
    });
    ws.addEventListener('close', (event) => {
      if (ws !== this.#ws) return;
      this.#ws = null;
      this.#closed(event.code, event.reason);
    });
  }

  #received(data) {
    if (typeof data !== 'string') return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (!frame || typeof frame.type !== 'string') return;
    if (frame.type === 'pong') {
      this.#pingSentAt = 0;
      return;
    }
    if (frame.type === 'welcome') {
      this.welcome = frame;
      this.#attempt = 0;
      this.#startPinging();
      this.#setState('connected', '');
      this.dispatchEvent(new CustomEvent('welcome', { detail: frame }));
      return;
    }
    if (frame.type === 'error' && !frame.id) this.#lastError = frame;
    if (frame.type === 'reply' && Number.isSafeInteger(frame.seq)) {
      const at = this.#position.get();
      // The server never sends a reply twice on one connection nor one before `after`; a
      // reply at or before the position would be shown twice.
      if (at !== null && frame.seq <= at) return;
      this.dispatchEvent(new CustomEvent('frame', { detail: frame }));
      this.#position.set(frame.seq);
      this.#acknowledgeSoon();
      return;
    }
    if (frame.type === 'synced' && Number.isSafeInteger(frame.seq)) {
      // Where the server's stream stands: the last reply it sent, all processed by now. It is
      // below the position when the server has fewer replies than this browser has seen (its
      // database was reset, or the position came from another server): live replies go on
      // from its number, and would be dropped as seen if the position stayed ahead.
      this.#position.set(frame.seq);
      this.#acknowledgeSoon();
    }
    this.dispatchEvent(new CustomEvent('frame', { detail: frame }));
  }

  #acknowledgeSoon() {
    if (this.#ackTimer === null) this.#ackTimer = setTimeout(() => this.acknowledge(), ACK_EVERY_MS);
  }

  #closed(code, detail) {
    this.#stopPinging();
    if (!this.#want) {
      this.#setState('disconnected', this.reason || 'disconnected');
      return;
    }
    const { text, again } = describeClose(code, detail);
    // A refused handshake says why in the error frame just before the close.
    const why = code === 1008 && this.#lastError?.message ? `${text}: ${this.#lastError.message}` : text;
    if (again === 'stop') {
      this.#want = false;
      this.#setState('disconnected', why);
      return;
    }
    const base = code === 1013 ? BACKOFF_FULL_MS : BACKOFF_FIRST_MS;
    const delay = Math.min(BACKOFF_MAX_MS, base * 2 ** this.#attempt) * (0.8 + Math.random() * 0.4);
    this.#attempt += 1;
    this.retryAt = Date.now() + delay;
    this.#retryTimer = setTimeout(() => this.#connect(), delay);
    this.#setState('reconnecting', why);
  }

  /** Forgets the current socket without reacting to its close. */
  #teardown(code, reason) {
    // What was processed is acknowledged before the close, or it would be recorded as failed.
    this.acknowledge();
    this.#stopPinging();
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(code, reason);
  }

  #startPinging() {
    this.#stopPinging();
    let lastPing = Date.now();
    this.#pingTimer = setInterval(() => {
      const now = Date.now();
      if (this.#pingSentAt && now - this.#pingSentAt > PONG_WITHIN_MS) {
        // A dead peer may never deliver a close event: stop waiting for one.
        this.#teardown(4000, 'no pong');
        this.#closed(PING_TIMEOUT, '');
        return;
      }
      if (!this.#pingSentAt && now - lastPing >= PING_EVERY_MS) {
        this.#nonce += 1;
        this.#pingSentAt = now;
        lastPing = now;
        this.send({ type: 'ping', nonce: this.#nonce });
      }
    }, 1000);
  }

  #stopPinging() {
    clearInterval(this.#pingTimer);
    this.#pingTimer = null;
    this.#pingSentAt = 0;
  }

  #setState(state, reason) {
    this.state = state;
    this.reason = reason;
    if (state !== 'reconnecting') this.retryAt = 0;
    this.dispatchEvent(new CustomEvent('state', { detail: { state, reason, retryAt: this.retryAt } }));
  }
}
