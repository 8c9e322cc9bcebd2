// A real kaiwa for a test: the binary cargo built, on a free port, with its own data directory.

import { execFileSync, spawn } from 'node:child_process';
import { createWriteStream, existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { request as httpsRequest } from 'node:https';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { once } from 'node:events';
import { REPO, outputPath } from './paths.js';

const START_TIMEOUT_MS = 20000;

/**
 * The kaiwa binary: $KAIWA_BIN, else the debug build, else the release build, in cargo's target
 * directory: $CARGO_TARGET_DIR (a relative one from the repository root, where cargo is run),
 * else target/. A target directory set in a cargo config is not seen here: set KAIWA_BIN then.
 */
export function kaiwaBinary() {
  if (process.env.KAIWA_BIN) {
    if (!existsSync(process.env.KAIWA_BIN)) throw new Error(`KAIWA_BIN is ${process.env.KAIWA_BIN}, which does not exist`);
    return process.env.KAIWA_BIN;
  }
  const targetDir = resolve(REPO, process.env.CARGO_TARGET_DIR || 'target');
  const candidates = [join(targetDir, 'debug/kaiwa'), join(targetDir, 'release/kaiwa')];
  const found = candidates.find((path) => existsSync(path));
  if (!found) {
    throw new Error(`no kaiwa binary at ${candidates.join(' or ')}: build it with \`cargo build -p kaiwa\`, or set KAIWA_BIN to the binary's path`);
  }
  return found;
}

/**
 * A certificate made for this test run by the `dev_cert` example (rcgen): `{ cert, key, pem }`
 * for localhost. The example is $KAIWA_DEV_CERT_BIN, else the debug build beside kaiwa's.
 */
export function devCertificate(dir) {
  const binary = process.env.KAIWA_DEV_CERT_BIN
    || join(resolve(REPO, process.env.CARGO_TARGET_DIR || 'target'), 'debug/examples/dev_cert');
  if (!existsSync(binary)) {
    throw new Error(`no dev_cert example at ${binary}: build it with \`cargo build -p kaiwa --example dev_cert\`, or set KAIWA_DEV_CERT_BIN`);
  }
  execFileSync(binary, [dir]);
  const cert = join(dir, 'cert.pem');
  return { cert, key: join(dir, 'key.pem'), pem: readFileSync(cert) };
}

/** GET `url` (http or https, trusting `ca` as well): `{ status, body }`. */
function get(url, ca) {
  if (!url.startsWith('https:')) {
    return fetch(url).then(async (response) => ({ status: response.status, body: await response.text() }));
  }
  return new Promise((resolvePromise, reject) => {
    const request = httpsRequest(url, { ca }, (response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk) => { body += chunk; });
      response.on('end', () => resolvePromise({ status: response.statusCode, body }));
    });
    request.on('error', reject);
    request.end();
  });
}

/** A port that was free a moment ago (kaiwa must bind a known one, to come back on it). */
export async function freePort() {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  server.close();
  await once(server, 'close');
  return port;
}

export class Kaiwa {
  #child = null;
  #exited = null;
  #log;

  constructor({ port, dataDir, flags, logName, tls }) {
    this.port = port;
    this.dataDir = dataDir;
    this.flags = tls ? [...flags, '--tls-cert', tls.cert, '--tls-key', tls.key] : flags;
    this.tls = tls;
    // A certificate names a host: with TLS, the page is reached by the name it was made for.
    this.url = tls ? `https://localhost:${port}` : `http://127.0.0.1:${port}`;
    this.#log = createWriteStream(outputPath(`${logName}.kaiwa.log`), { flags: 'a' });
  }

  /** Starts kaiwa with `flags` added to the defaults of the tests; with `tls` (from
   * `devCertificate`), over TLS. */
  static async start({ name, flags = [], tls }) {
    const dataDir = await mkdtemp(join(tmpdir(), 'kaiwa-browser-test-'));
    const kaiwa = new Kaiwa({ port: await freePort(), dataDir, flags, logName: name, tls });
    await kaiwa.run();
    return kaiwa;
  }

  /** Runs the server (again, after `stop`) on the same port and data directory. */
  async run() {
    const defaults = ['--reply-delay-scale', '0.05', '--log', 'info,kaiwa=debug'];
    const args = ['serve', '--bind', `127.0.0.1:${this.port}`, '--data-dir', this.dataDir];
    for (let i = 0; i < defaults.length; i += 2) {
      // A flag given twice is an error: the test's own value wins.
      if (!this.flags.includes(defaults[i])) args.push(defaults[i], defaults[i + 1]);
    }
    args.push(...this.flags);
    this.#log.write(`\n$ kaiwa ${args.join(' ')}\n`);
    const child = spawn(kaiwaBinary(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout.pipe(this.#log, { end: false });
    child.stderr.pipe(this.#log, { end: false });
    this.#child = child;
    this.#exited = once(child, 'exit');
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (Date.now() < deadline) {
      if (child.exitCode !== null) throw new Error(`kaiwa exited with ${child.exitCode} at start; see its log in ${outputPath('')}`);
      try {
        const response = await get(`${this.url}/health`, this.tls?.pem);
        if (response.status === 200) return;
      } catch {
        // Not listening yet.
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    throw new Error(`kaiwa did not answer /health within ${START_TIMEOUT_MS} ms`);
  }

  /** Stops the server with `signal` and waits for the process to end. */
  async stop(signal = 'SIGTERM') {
    const child = this.#child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    child.kill(signal);
    const killer = setTimeout(() => child.kill('SIGKILL'), 15000);
    await this.#exited;
    clearTimeout(killer);
    this.#child = null;
  }

  async dispose() {
    await this.stop();
    this.#log.end();
    await rm(this.dataDir, { recursive: true, force: true });
  }

  async json(path) {
    const response = await get(`${this.url}${path}`, this.tls?.pem);
    return JSON.parse(response.body);
  }
}
