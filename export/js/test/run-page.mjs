// Open a page in headless Chromium (Debian's binary, via playwright-core) and write what it
// leaves in window.__result to <out>/result.json, plus any base64 files it returns.
// Usage: node run-page.mjs <url> <out dir> [chromium path] [timeout ms] [screenshot.png]
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [url, out, executable = '/usr/bin/chromium', timeout = '60000', screenshot] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), 'softmask-chromium-'));
// a fresh profile per run (playwright passes it as --user-data-dir)
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: executable,
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
try {
  const page = await browser.newPage();
  await page.setViewportSize({ width: 1100, height: 900 });
  page.on('console', (m) => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => console.error(`[page error] ${e}`));
  await page.goto(url);
  await page.waitForFunction(() => window.__result !== undefined, null, { timeout: Number(timeout) });
  const result = JSON.parse(await page.evaluate(() => window.__result));
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  mkdirSync(out, { recursive: true });
  for (const [name, data] of Object.entries(result.files ?? {})) {
    writeFileSync(join(out, name), Buffer.from(data, 'base64'));
  }
  delete result.files;
  writeFileSync(join(out, 'result.json'), JSON.stringify(result));
  if (result.error) {
    console.error(result.error);
    process.exitCode = 1;
  }
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
