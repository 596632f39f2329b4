// Open a page in headless Chromium (Debian's binary, via playwright-core) and write what it
// leaves in window.__result to <out>/result.json, plus any base64 files it returns.
// Usage: node run-page.mjs <url> <out dir> [chromium path] [timeout ms] [screenshot.png]
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { launch, logConsole } from './browser.mjs';

const [url, out, executable = '/usr/bin/chromium', timeout = '60000', screenshot] = process.argv.slice(2);
const browser = await launch(executable);
try {
  const page = await browser.context.newPage();
  await page.setViewportSize({ width: 1100, height: 900 });
  logConsole(page);
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
}
