// Files to send: which message type a file is, whether the server will take its size, and voice
// recording with the microphone.

import { formatBytes } from './words.js';

const KIND_BY_EXTENSION = {
  png: 'image', jpg: 'image', jpeg: 'image', jfif: 'image', gif: 'image', webp: 'image',
  wav: 'voice', wave: 'voice', mp3: 'voice', ogg: 'voice', oga: 'voice', opus: 'voice', weba: 'voice',
  m4a: 'voice', aac: 'voice', flac: 'voice',
  mov: 'video', qt: 'video', mp4: 'video', m4v: 'video', '3gp': 'video', webm: 'video', mkv: 'video',
  ogv: 'video', avi: 'video',
};

/** The message type for a file: by its MIME type, else by its extension; null if neither fits. */
export function kindOf(file) {
  const type = (file.type || '').toLowerCase();
  if (type.startsWith('image/')) return 'image';
  if (type.startsWith('audio/')) return 'voice';
  if (type.startsWith('video/')) return 'video';
  const ext = (file.name || '').split('.').pop().toLowerCase();
  return KIND_BY_EXTENSION[ext] ?? null;
}

/** Why the server would refuse this file before it is uploaded, or null if it would not. */
export function checkFile(file, kind, limits) {
  if (!kind) return `“${file.name}” is not an image, video or voice file`;
  if (file.size === 0) return `“${file.name}” is empty`;
  if (limits) {
    const max = limits[`max_${kind}_bytes`];
    if (typeof max === 'number' && file.size > max) {
      return `“${file.name}” is ${formatBytes(file.size)}; the server takes ${kind === 'voice' ? 'voice files' : `${kind}s`} up to ${formatBytes(max)}`;
    }
  }
  return null;
}

/** Why the server would refuse this text, or null. */
export function checkText(text, limits) {
  const max = limits?.max_text_chars;
  // The server counts characters (Unicode scalar values), as the spread here does.
  if (typeof max === 'number' && [...text].length > max) return `the text is longer than the server's ${max} characters`;
  return null;
}

/** A file name the server accepts: no path, no control characters, an extension it knows. */
export function safeName(name, fallback) {
  const cleaned = (name || '').replace(/[\\/\u0000-\u001f\u007f]/g, '_').replace(/\.\.+/g, '.').trim();
  return (cleaned || fallback).slice(0, 200);
}

const RECORDING_TYPES = [
  ['audio/webm;codecs=opus', 'webm'],
  ['audio/webm', 'webm'],
  ['audio/ogg;codecs=opus', 'ogg'],
  ['audio/mp4', 'm4a'],
];

export function canRecord() {
  return Boolean(globalThis.MediaRecorder && navigator.mediaDevices?.getUserMedia);
}

/** A voice recording in progress: `stop()` resolves with the recorded File. */
export class VoiceRecorder {
  #recorder;
  #stream;
  #chunks = [];
  #done;
  startedAt = Date.now();

  static async start() {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    return new VoiceRecorder(stream);
  }

  constructor(stream) {
    this.#stream = stream;
    const [mimeType, ext] = RECORDING_TYPES.find(([type]) => MediaRecorder.isTypeSupported(type)) ?? ['', 'webm'];
    this.#recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
    this.#recorder.addEventListener('dataavailable', (event) => {
      if (event.data.size > 0) this.#chunks.push(event.data);
    });
    this.#done = new Promise((resolve, reject) => {
      this.#recorder.addEventListener('stop', () => {
        const type = (this.#recorder.mimeType || mimeType || 'audio/webm').split(';')[0];
        const stamp = new Date().toISOString().slice(0, 19).replace(/[-:T]/g, '');
        resolve(new File(this.#chunks, `voice-${stamp}.${ext}`, { type }));
      });
      this.#recorder.addEventListener('error', (event) => reject(event.error ?? new Error('recording failed')));
    });
    this.#recorder.start(250);
  }

  async stop() {
    if (this.#recorder.state !== 'inactive') this.#recorder.stop();
    for (const track of this.#stream.getTracks()) track.stop();
    return this.#done;
  }

  cancel() {
    this.stop().catch(() => {});
  }
}
