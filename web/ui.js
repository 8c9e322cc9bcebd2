// What the page draws: the messages with their replies, the connection status, notices.
// Every text that comes from the server or the person goes in through textContent.

import { STATES, clockFormat, formatBytes } from './words.js';

/**
 * How the page shows an uploaded file. On a server with auth on, `/media/` links need the
 * token in a header, which `src` cannot send: the page sets `fetcher` to one that fetches the
 * file with it and returns a `blob:` URL.
 */
export const uploads = { fetcher: null };

/** `element` showing the uploaded file at `url`. */
function showUpload(element, url) {
  if (uploads.fetcher && url.startsWith('/media/') && !url.startsWith('/media/replies/')) {
    uploads.fetcher(url).then((blobUrl) => { if (blobUrl) element.src = blobUrl; });
  } else {
    element.src = url;
  }
  return element;
}

/** Shorthand for building elements: `el('p', {className: 'x'}, 'text', child)`. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'dataset') Object.assign(node.dataset, value);
    else if (name in node && !name.includes('-')) node[name] = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const TYPE_NAMES = { text: 'text', voice: 'voice message', video: 'video', image: 'image', '': 'message' };
const STICK_PX = 80;

/**
 * The message list. It implements the conversation's observer; it keeps messages in server
 * order, keeps the view at the bottom while the person is there, and keeps it still when older
 * messages are added above.
 */
export class ChatView {
  #scroller;
  #list;
  #nodes = new Map();
  #stick = true;
  #timeFormat;

  constructor({ scroller, list }) {
    this.#scroller = scroller;
    this.#list = list;
    this.setTimezone(undefined);
    scroller.addEventListener('scroll', () => {
      this.#stick = this.#distanceFromBottom() < STICK_PX;
    }, { passive: true });
    // Replies, streamed text and media finishing loading all change the height: follow them
    // while the person is at the bottom.
    new ResizeObserver(() => {
      if (this.#stick) this.scrollToBottom();
    }).observe(list);
  }

  setTimezone(timeZone) {
    try {
      this.#timeFormat = clockFormat(timeZone);
    } catch {
      this.#timeFormat = clockFormat(undefined);
    }
  }

  clear() {
    this.#list.replaceChildren();
    this.#nodes.clear();
    this.#stick = true;
  }

  scrollToBottom() {
    this.#scroller.scrollTop = this.#scroller.scrollHeight;
    this.#stick = true;
  }

  get nearTop() {
    return this.#scroller.scrollTop < 150;
  }

  get overflowing() {
    return this.#scroller.scrollHeight > this.#scroller.clientHeight + 4;
  }

  /** Runs `change` (which adds content above) without moving what the person is looking at. */
  keepingPosition(change) {
    const scroller = this.#scroller;
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    const stick = this.#stick;
    change();
    if (stick) this.scrollToBottom();
    else scroller.scrollTop = scroller.scrollHeight - fromBottom;
  }

  #distanceFromBottom() {
    const s = this.#scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight;
  }

  // --- conversation observer ---

  added(entry) {
    const node = this.#build(entry);
    this.#nodes.set(entry.key, node);
    this.#list.insertBefore(node.root, this.#placeFor(entry.messageId));
    this.changed(entry);
  }

  removed(entry) {
    const node = this.#nodes.get(entry.key);
    node?.root.remove();
    this.#nodes.delete(entry.key);
  }

  changed(entry) {
    const node = this.#nodes.get(entry.key);
    if (!node) return;
    const { root } = node;
    if (entry.messageId !== null) root.dataset.messageId = String(entry.messageId);
    if (entry.clientMsgId) root.dataset.clientId = entry.clientMsgId;
    root.dataset.status = entry.status;
    const signature = `${entry.type}|${entry.mediaUrl}|${entry.text}|${entry.filename}`;
    if (node.signature !== signature) {
      node.signature = signature;
      // A file known only from history may have no URL (a rejected one is not kept), and
      // replaceChildren would write a missing part as the text "null".
      node.body.replaceChildren(...this.#body(entry).filter(Boolean));
      node.article.setAttribute('aria-label', `You sent a ${TYPE_NAMES[entry.type] ?? 'message'}`);
    }
    node.state.textContent = STATES[entry.status] ?? entry.status;
    node.state.className = `state state-${entry.status}`;
    node.time.textContent = entry.receivedAt ? this.#timeFormat.format(new Date(entry.receivedAt)) : '';
    if (entry.receivedAt) node.time.dateTime = entry.receivedAt;
    node.reason.hidden = !entry.reason;
    node.reason.textContent = entry.reason ?? '';
    node.progress.hidden = entry.progress === null;
    if (entry.progress !== null) {
      node.progress.value = entry.progress;
      node.progress.textContent = `${Math.round(entry.progress * 100)}%`;
    }
    node.again.hidden = entry.status !== 'error' || !entry.canRetry;
    this.#renderStream(entry, node);
  }

  replied(entry, reply, { missed }) {
    const node = this.#nodes.get(entry.key);
    if (!node) return;
    const item = this.#reply(reply, missed);
    if (reply.reply_type === 'text' && node.stream) {
      // The whole text replaces the pieces streamed so far, in the same place.
      node.stream.replaceWith(item);
      node.stream = null;
    } else {
      const later = [...node.replies.children].find((other) => Number(other.dataset.replyId) > reply.id);
      node.replies.insertBefore(item, later ?? (node.stream || null));
    }
  }

  // --- building ---

  #placeFor(messageId) {
    if (messageId === null) return null;
    // Newer messages sit lower; messages still without a server id (being sent) are the newest.
    for (let child = this.#list.lastElementChild; child; child = child.previousElementSibling) {
      const id = child.dataset.messageId;
      if (id !== undefined && Number(id) < messageId) return child.nextElementSibling;
    }
    return this.#list.firstElementChild;
  }

  #build(entry) {
    const body = el('div', { className: 'body' });
    const state = el('span', { className: 'state' });
    const time = el('time');
    const progress = el('progress', { className: 'upload', max: 1, value: 0, hidden: true, 'aria-label': 'Upload progress' });
    const reason = el('p', { className: 'reason', hidden: true });
    const again = el('button', { type: 'button', className: 'again link', hidden: true }, 'Send again');
    again.dataset.action = 'again';
    again.dataset.key = entry.key;
    const article = el('article', { className: 'message mine' },
      body, el('p', { className: 'meta' }, state, ' ', time), progress, reason, again);
    const replies = el('ol', { className: 'replies', 'aria-label': 'Replies' });
    const root = el('li', { className: 'entry', dataset: { key: entry.key } }, article, replies);
    return { root, article, body, state, time, progress, reason, again, replies, stream: null, signature: '' };
  }

  #body(entry) {
    const url = entry.mediaUrl;
    const caption = entry.filename ? el('span', { className: 'filename' }, entry.filename, entry.size ? ` · ${formatBytes(entry.size)}` : '') : null;
    switch (entry.type) {
      case 'text':
        return [el('p', { className: 'text' }, entry.text)];
      case 'image':
        return [url ? showUpload(el('img', { alt: entry.filename ? `Image ${entry.filename}` : 'Image you sent', className: 'sent-image' }), url) : null, caption];
      case 'voice':
        return [url ? showUpload(el('audio', { controls: true, preload: 'metadata', 'aria-label': 'Your voice message' }), url) : null, caption];
      case 'video':
        return [url ? showUpload(el('video', { controls: true, preload: 'metadata', playsInline: true, className: 'sent-video', 'aria-label': 'Your video' }), url) : null, caption];
      default:
        return [el('p', { className: 'text muted' }, entry.messageId ? `Message #${entry.messageId} (sent earlier)` : 'Message')];
    }
  }

  #renderStream(entry, node) {
    if (entry.stream === null || entry.stream === undefined) {
      if (node.stream) {
        node.stream.remove();
        node.stream = null;
      }
      return;
    }
    if (!node.stream) {
      node.stream = el('li', { className: 'reply reply-text streaming', 'aria-busy': 'true' }, el('p', { className: 'text' }));
      node.replies.append(node.stream);
    }
    node.stream.firstElementChild.textContent = entry.stream;
  }

  #reply(reply, missed) {
    const item = el('li', { className: `reply reply-${reply.reply_type}`, dataset: { replyId: String(reply.id) } });
    if (reply.fallback) item.classList.add('fallback');
    const url = reply.content;
    switch (reply.reply_type) {
      case 'text':
        item.append(el('p', { className: 'text' }, reply.content));
        break;
      case 'voice':
        item.append(el('audio', { src: url, controls: true, preload: 'auto', 'aria-label': 'Voice reply' }));
        break;
      case 'image':
        // The server's image replies are 256×256: reserving the space keeps the view still.
        item.append(el('img', { src: url, alt: 'Image reply', width: 256, height: 256 }));
        break;
      case 'video':
        item.append(el('video', { src: url, controls: true, preload: 'metadata', 'aria-label': 'Video reply' }));
        break;
      default:
        item.append(el('p', { className: 'text' }, `${reply.reply_type}: ${reply.content}`));
    }
    const notes = [];
    if (reply.fallback) notes.push('stand-in reply: the language model did not answer');
    if (missed) notes.push('arrived after reconnecting');
    if (notes.length) item.append(el('p', { className: 'reply-note' }, notes.join(' · ')));
    return item;
  }
}

/** The connection indicator: a dot, a line of words, and a countdown while reconnecting. */
export class StatusView {
  #root;
  #text;
  #countdown;
  #retry;
  #timer = null;

  constructor({ root, text, countdown, retry }) {
    this.#root = root;
    this.#text = text;
    this.#countdown = countdown;
    this.#retry = retry;
  }

  show({ state, reason, retryAt }, who) {
    clearInterval(this.#timer);
    this.#timer = null;
    this.#root.dataset.state = state;
    this.#retry.hidden = state !== 'reconnecting';
    switch (state) {
      case 'connecting':
        this.#text.textContent = 'Connecting…';
        break;
      case 'connected':
        this.#text.textContent = `Connected as ${who.clientId} (${who.timezone})`;
        break;
      case 'reconnecting':
        this.#text.textContent = `Reconnecting: ${reason}`;
        break;
      default:
        this.#text.textContent = reason ? `Disconnected: ${reason}` : 'Disconnected';
    }
    // The countdown is outside the live region: a screen reader hears the state, not every tick.
    const tick = () => {
      const seconds = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
      this.#countdown.textContent = seconds > 0 ? `next try in ${seconds} s` : 'trying now';
    };
    this.#countdown.textContent = '';
    if (state === 'reconnecting') {
      tick();
      this.#timer = setInterval(tick, 250);
    }
  }
}

/** A readable notice at the top of the page, dismissable, for errors that concern no message. */
export function notice(container, text, kind = 'error') {
  const close = el('button', { type: 'button', className: 'dismiss', 'aria-label': 'Dismiss notice' }, '×');
  const item = el('li', { className: `notice notice-${kind}` }, el('span', {}, text), close);
  close.addEventListener('click', () => item.remove());
  container.append(item);
  // Keep the last few: an error repeated on every reconnect must not fill the screen.
  while (container.children.length > 4) container.firstElementChild.remove();
  return item;
}
