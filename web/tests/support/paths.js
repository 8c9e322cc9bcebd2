// Where things are: the repository, and the folder tests write screenshots and logs into.

import { mkdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');

/** $BROWSER_TEST_OUTPUT, else target/browser-tests in the repository. */
export const OUTPUT = process.env.BROWSER_TEST_OUTPUT || join(REPO, 'target/browser-tests');
mkdirSync(OUTPUT, { recursive: true });

export function outputPath(name) {
  return join(OUTPUT, name);
}

/** A file name from a test name: `a text gets its reply` becomes `a-text-gets-its-reply`. */
export function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '').slice(0, 80);
}
