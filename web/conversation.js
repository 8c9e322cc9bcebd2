// The conversation as the page knows it: messages and their replies, from three sources that
// overlap (what this page sent, live frames, pages of history), merged into one entry per message
// and one reply per reply id.

/** How far along a message is; a merge never moves a message backwards. */
const RANK = { unknown: -1, error: 0, queued: 0, sending: 0, uploading: 0, busy: 0, accepted: 1, processing: 2, replied: 3, rejected: 3 };

let localKeys = 0;

/**
 * @typedef {object} Entry
 * @property {string} key           stable local key (for the view)
 * @property {?string} clientMsgId   the `send` id, when sent by the native protocol
 * @property {?number} messageId     the server's id, once known
 * @property {string} type          text, voice, video, image ('' while unknown)
 * @property {string} text          the text of a text message
 * @property {?string} mediaUrl      where the file can be shown from (a blob: or /media/ URL)
 * @property {?string} filename
 * @property {?number} size
 * @property {string} status        see RANK
 * @property {?string} reason        rejection reason or error text
 * @property {?number} progress      0..1 while uploading
 * @property {?string} stream        the text reply so far, while it streams in
 * @property {Map<number, object>} replies  by reply id, oldest first
 * @property {?string} receivedAt
 */

function newEntry(fields) {
  localKeys += 1;
  return {
    key: `m${localKeys}`,
    clientMsgId: null,
    messageId: null,
    type: '',
    text: '',
    mediaUrl: null,
    filename: null,
    size: null,
    status: 'unknown',
    reason: null,
    progress: null,
    stream: null,
    fallbackStream: false,
    replies: new Map(),
    receivedAt: null,
    ...fields,
  };
}

/**
 * The observer is told about every change:
 * `added(entry)`, `changed(entry)`, `replied(entry, reply, {live, missed})`.
 */
export class Conversation {
  #byKey = new Map();
  #byMessageId = new Map();
  #byClientId = new Map();
  #observer;

  constructor(observer) {
    this.#observer = observer;
  }

  clear() {
    for (const entry of this.#byKey.values()) {
      if (entry.mediaUrl?.startsWith('blob:')) URL.revokeObjectURL(entry.mediaUrl);
    }
    this.#byKey.clear();
    this.#byMessageId.clear();
    this.#byClientId.clear();
  }

  entries() {
    return [...this.#byKey.values()];
  }

  /** A message this page is about to send. */
  addOutgoing(fields) {
    const entry = newEntry({ status: 'queued', ...fields });
    this.#index(entry);
    this.#observer.added(entry);
    return entry;
  }

  update(entry, fields) {
    Object.assign(entry, fields);
    this.#index(entry);
    this.#observer.changed(entry);
  }

  /** Finds the message a server frame is about, by the page's id first, then the server's. */
  find(frame) {
    return (frame.id && this.#byClientId.get(frame.id)) || this.#byMessageId.get(frame.message_id) || null;
  }

  /** Applies an ack, status, delta or reply frame. Returns the entry it concerned. */
  apply(frame) {
    let entry = this.find(frame);
    if (!entry) {
      if (typeof frame.message_id !== 'number') return null;
      // A reply to a message this page has not seen (sent before it was opened, replayed on
      // resume before history arrived): history fills in the message later.
      entry = newEntry({ messageId: frame.message_id, clientMsgId: frame.id || null });
      this.#index(entry);
      this.#observer.added(entry);
    }
    if (typeof frame.message_id === 'number' && entry.messageId !== frame.message_id) {
      entry.messageId = frame.message_id;
      this.#index(entry);
    }
    switch (frame.type) {
      case 'ack':
        this.#advance(entry, frame.status, frame.reason ?? null);
        if (frame.received_at) entry.receivedAt = frame.received_at;
        entry.progress = null;
        this.#observer.changed(entry);
        break;
      case 'status':
        this.#advance(entry, frame.status, null);
        this.#observer.changed(entry);
        break;
      case 'delta':
        if (!this.#hasTextReply(entry)) {
          entry.stream = (entry.stream ?? '') + String(frame.delta ?? '');
          this.#observer.changed(entry);
        }
        break;
      case 'reply':
        this.#addReply(entry, frame.reply, { live: true, missed: Boolean(frame.missed) });
        break;
      default:
        break;
    }
    return entry;
  }

  /** Merges a page of history (newest first). Returns how many messages were new. */
  merge(messages) {
    let added = 0;
    for (const message of messages) {
      let entry = this.#byMessageId.get(message.id)
        || (message.client_message_id && this.#byClientId.get(message.client_message_id))
        || null;
      const fields = {
        messageId: message.id,
        clientMsgId: message.client_message_id ?? null,
        type: message.message_type,
        filename: message.filename ?? null,
        size: message.size_bytes ?? null,
        receivedAt: message.received_at ?? null,
      };
      if (message.message_type === 'text') fields.text = message.content;
      const isNew = !entry;
      if (isNew) {
        entry = newEntry(fields);
        added += 1;
      } else {
        for (const [name, value] of Object.entries(fields)) {
          if (value !== null && value !== undefined && value !== '') entry[name] = value;
        }
      }
      // A file sent from this page keeps its local preview; the stored copy is the same file.
      if (message.message_type !== 'text' && message.content && !entry.mediaUrl) entry.mediaUrl = message.content;
      this.#advance(entry, message.status, message.reason ?? null);
      this.#index(entry);
      if (isNew) this.#observer.added(entry);
      else this.#observer.changed(entry);
      for (const reply of message.replies ?? []) this.#addReply(entry, reply, { live: false, missed: false });
    }
    return added;
  }

  #advance(entry, status, reason) {
    if (!(status in RANK)) return;
    if (RANK[status] >= RANK[entry.status] || entry.status === 'error') {
      entry.status = status;
      if (status === 'rejected' || reason) entry.reason = reason;
      else if (RANK[status] > 0) entry.reason = null;
    }
  }

  #hasTextReply(entry) {
    for (const reply of entry.replies.values()) if (reply.reply_type === 'text') return true;
    return false;
  }

  #addReply(entry, reply, how) {
    if (!reply || typeof reply.id !== 'number' || entry.replies.has(reply.id)) return;
    entry.replies.set(reply.id, reply);
    if (reply.reply_type === 'text') entry.stream = null;
    // A reply means the message was accepted, even if its ack was missed in a reconnect.
    if (RANK[entry.status] < RANK.accepted) this.#advance(entry, 'accepted', null);
    this.#observer.replied(entry, reply, how);
  }

  #index(entry) {
    this.#byKey.set(entry.key, entry);
    if (entry.messageId !== null) {
      const other = this.#byMessageId.get(entry.messageId);
      if (other && other !== entry) this.#absorb(entry, other);
      this.#byMessageId.set(entry.messageId, entry);
    }
    if (entry.clientMsgId) this.#byClientId.set(entry.clientMsgId, entry);
  }

  /** Two entries turned out to be one message (a placeholder and the real one): keep `entry`. */
  #absorb(entry, other) {
    for (const [id, reply] of other.replies) {
      if (!entry.replies.has(id)) entry.replies.set(id, reply);
    }
    entry.replies = new Map([...entry.replies].sort(([a], [b]) => a - b));
    if (RANK[other.status] > RANK[entry.status]) entry.status = other.status;
    this.#byKey.delete(other.key);
    if (other.clientMsgId && this.#byClientId.get(other.clientMsgId) === other) this.#byClientId.delete(other.clientMsgId);
    this.#observer.removed(other);
    this.#observer.changed(entry);
  }
}
