// Storage adapters for saved learner state: {read(name), write(name, bytes), remove(name),
// list()} over IndexedDB or the Origin Private File System, and the generation switch.
//
// A save writes the new generation's checkpoint and history first and manifest.json last: the
// manifest is the switch, so a reader sees the old or the new generation, never a mix; the
// old generation's files go after the switch. Under a Web Lock named after the store (all
// tabs of the origin share it), the stored manifest's generation must still be the one this
// learner loaded, else StaleWriterError and nothing is written (the JS twin of Python's
// expected-generation check).
import { CONTRACT } from './contract.mjs';
import { MissingArtifactError, SaveLocationError, StaleWriterError } from './errors.mjs';
import { isPlainName, parseManifest, STATIC_FILES } from './manifest.mjs';

const MANIFEST = CONTRACT.files.manifest;
const request = (r) => new Promise((resolve, reject) => {
  r.onsuccess = () => resolve(r.result);
  r.onerror = () => reject(r.error);
});

/** Files in one IndexedDB object store (database `softmask-edge`, store `name`). */
export class IndexedDBStore {
  constructor(name = 'default') {
    this.name = `idb:${name}`;
    this.store = name;
    this.db = null;
  }

  async _db() {
    if (!this.db) {
      const open = indexedDB.open(`softmask-edge:${this.store}`, 1);
      open.onupgradeneeded = () => open.result.createObjectStore('files');
      this.db = await request(open);
    }
    return this.db;
  }

  async _run(mode, fn) {
    const tx = (await this._db()).transaction('files', mode);
    const result = await request(fn(tx.objectStore('files')));
    return result;
  }

  async read(name) {
    const bytes = await this._run('readonly', (s) => s.get(name));
    if (bytes === undefined) throw new MissingArtifactError(`${this.name} has no ${name}`);
    return new Uint8Array(bytes);
  }

  async write(name, bytes) {
    await this._run('readwrite', (s) => s.put(bytes, name));
  }

  async remove(name) {
    await this._run('readwrite', (s) => s.delete(name));
  }

  async list() {
    return (await this._run('readonly', (s) => s.getAllKeys())).map(String);
  }
}

/** Files in a folder of the Origin Private File System (navigator.storage.getDirectory()). */
export class OPFSStore {
  constructor(name = 'softmask-edge') {
    this.name = `opfs:${name}`;
    this.folder = name;
  }

  async _dir() {
    return (await navigator.storage.getDirectory()).getDirectoryHandle(this.folder, { create: true });
  }

  async read(name) {
    try {
      const file = await (await (await this._dir()).getFileHandle(name)).getFile();
      return new Uint8Array(await file.arrayBuffer());
    } catch (e) {
      if (e?.name === 'NotFoundError') throw new MissingArtifactError(`${this.name} has no ${name}`);
      throw e;
    }
  }

  async write(name, bytes) {
    const writable = await (await (await this._dir()).getFileHandle(name, { create: true })).createWritable();
    await writable.write(bytes);
    await writable.close(); // the new content replaces the old one at close, atomically
  }

  async remove(name) {
    await (await this._dir()).removeEntry(name).catch((e) => {
      if (e?.name !== 'NotFoundError') throw e;
    });
  }

  async list() {
    const names = [];
    for await (const key of (await this._dir()).keys()) names.push(key);
    return names;
  }
}

/** Run `fn` holding the store's Web Lock (every tab of the origin), or directly where there are none. */
export function withLock(store, fn) {
  const locks = globalThis.navigator?.locks;
  return locks ? locks.request(`softmask-edge:${store.name ?? 'unnamed store'}`, fn) : fn();
}

async function storedGeneration(store) {
  try {
    return parseManifest(await store.read(MANIFEST)).generation;
  } catch (e) {
    if (e instanceof MissingArtifactError) return null;
    throw e;
  }
}

/**
 * Write `files` ({name: bytes}, manifest.json among them) as the store's new generation.
 * `expected`: the generation the writer loaded (null: the store must be empty); static files
 * (graphs) in `files` are written only when missing. Returns the new generation.
 */
export async function writeGeneration(store, files, expected) {
  const manifest = parseManifest(files[MANIFEST]);
  return withLock(store, async () => {
    const current = await storedGeneration(store);
    if (current !== expected) {
      throw new StaleWriterError(
        `${store.name} holds generation ${current}, this learner loaded ${expected}: another tab saved in between; load it again`,
      );
    }
    const keep = new Set([MANIFEST, manifest.checkpoint, manifest.history, ...STATIC_FILES]);
    const before = await store.list();
    try {
      for (const [name, bytes] of Object.entries(files)) {
        if (name === MANIFEST || !isPlainName(name)) continue;
        if (STATIC_FILES.includes(name) && before.includes(name)) continue;
        await store.write(name, bytes);
      }
      await store.write(MANIFEST, files[MANIFEST]); // the switch
    } catch (e) {
      throw new SaveLocationError(`cannot write into ${store.name}: ${e?.message ?? e}`);
    }
    for (const name of before) if (!keep.has(name)) await store.remove(name).catch(() => {});
    return manifest.generation;
  });
}

/** Every file of the store's current generation, {name: bytes}, read under its lock. */
export function readGeneration(store) {
  return withLock(store, async () => {
    const manifestBytes = await store.read(MANIFEST);
    const manifest = parseManifest(manifestBytes);
    const files = { [MANIFEST]: manifestBytes };
    for (const name of [manifest.checkpoint, manifest.history, ...STATIC_FILES]) files[name] = await store.read(name);
    return files;
  });
}
