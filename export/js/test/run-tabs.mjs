// Two tabs on one stored learner state, in headless Chromium: two pages (tab.html) of one
// browser context, so they share the origin's IndexedDB, OPFS and Web Locks as two tabs of a
// browser do. For each store kind in ?stores= (default indexedDB,opfs):
//  1. tab A loads the exported artifacts, learns, saves generation 1 into the store;
//  2. both tabs load it; A learns and saves (generation 2); B learns and saves: refused;
//  3. B reloads (a new document and learner) and loads the store;
//  4. `rounds` times: both tabs learn, then save at the same moment; the loser reloads and loads.
// Each step's outcome (generations, {name, code} of errors, weight differences, stored files)
// goes to <out>/result.json; the test asserts on it. ?rounds=N (default 3); with
// ?legacy=<artifacts URL> tab A also loads those (artifacts the learners refuse) and reports
// the error.
// Usage: node run-tabs.mjs <tab.html URL> <out dir> [chromium path] [timeout ms]
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { launch, logConsole } from './browser.mjs';

const [url, out, executable = '/usr/bin/chromium', timeout = '120000'] = process.argv.slice(2);
const query = new URL(url).searchParams;
const rounds = Number(query.get('rounds') ?? 3);
const kinds = (query.get('stores') ?? 'indexedDB,opfs').split(',');
const browser = await launch(executable);
browser.context.setDefaultTimeout(Number(timeout));

const ready = (page) => page.waitForFunction(() => window.tabReady === true);
async function openTab(tag) {
  const page = await browser.context.newPage();
  logConsole(page, `tab ${tag}`);
  await page.goto(url);
  await ready(page);
  return page;
}
async function reload(page) {
  await page.reload();
  await ready(page);
}
const call = (page, method, ...args) => page.evaluate(([m, a]) => window.tab[m](...a), [method, args]);
const value = async (page, method, ...args) => {
  const r = await call(page, method, ...args);
  if (r.error) throw new Error(`${method}: ${r.error.name}: ${r.error.message}`);
  return r.value;
};
const outcome = (r) => (r.error ? { name: r.error.name, code: r.error.code } : { saved: r.value });
const maxDiff = (a, b) => Math.max(...Object.keys(a).map((k) => Math.max(...a[k].map((v, i) => Math.abs(v - b[k][i])))));

const result = {};
try {
  const legacy = query.get('legacy');
  for (const kind of kinds) {
    const store = `two-tabs-${kind}`;
    const [a, b] = [await openTab('A'), await openTab('B')];
    const r = { rounds: [] };
    await value(a, 'loadArtifacts');
    await value(a, 'learn', 1);
    r.seeded = await value(a, 'save', kind, store);
    r.loaded = [await value(a, 'load', kind, store), await value(b, 'load', kind, store)];
    r.startDiff = maxDiff(await value(a, 'parameters'), await value(b, 'parameters'));
    await value(a, 'learn', 2);
    await value(b, 'learn', 1);
    r.first = outcome(await call(a, 'save'));
    r.second = outcome(await call(b, 'save'));
    const saved = await value(a, 'parameters');
    r.files = await value(a, 'files', kind, store);
    await reload(b);
    r.reloaded = await value(b, 'load', kind, store);
    r.reloadedDiff = maxDiff(saved, await value(b, 'parameters'));
    for (let i = 0; i < rounds; i += 1) {
      await Promise.all([value(a, 'learn', 1), value(b, 'learn', 1)]);
      const saves = await Promise.all([call(a, 'save'), call(b, 'save')]);
      const [winner, loser] = saves[0].error ? [b, a] : [a, b];
      const expected = await value(winner, 'parameters');
      await reload(loser);
      const loaded = await value(loser, 'load', kind, store);
      r.rounds.push({
        saves: saves.map(outcome),
        loaded,
        diff: maxDiff(expected, await value(loser, 'parameters')),
        files: await value(a, 'files', kind, store),
      });
    }
    if (legacy && kind === kinds[0]) r.legacy = (await call(a, 'loadArtifacts', legacy)).error ?? 'loaded';
    result[kind] = r;
    await a.close();
    await b.close();
  }
} catch (e) {
  result.error = String(e?.stack ?? e);
  process.exitCode = 1;
} finally {
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, 'result.json'), JSON.stringify(result));
  await browser.close();
}
if (result.error) console.error(result.error);
