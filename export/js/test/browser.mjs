// Headless Chromium for the test runners: Debian's binary driven by playwright-core, a fresh
// profile per run (one browser context: every page in it shares the origin's IndexedDB, OPFS
// and Web Locks, as the tabs of one browser window do).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

/** {context, close()}: a persistent context on a new profile (playwright's --user-data-dir). */
export async function launch(executable = '/usr/bin/chromium') {
  const profile = mkdtempSync(join(tmpdir(), 'softmask-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: executable,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  return {
    context,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Forward a page's console lines and errors to stderr, tagged `[page …]` (or `[tab NAME …]`). */
export function logConsole(page, tag = 'page') {
  page.on('console', (m) => console.error(`[${tag} ${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => console.error(`[${tag} error] ${e}`));
}
