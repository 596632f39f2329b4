// Main-thread handle of a learner running in a Web Worker (worker.mjs): what a page calls.
//
// * load(source): a URL (relative to the page), {name: Uint8Array} bytes, or a storage
//   adapter (IndexedDBStore, OPFSStore: read on this thread, the bytes go to the worker).
// * save(store): the next generation written into a store, manifest last (the switch), old
//   files removed, under the store's Web Lock and only if the store still holds the
//   generation this learner loaded (else StaleWriterError: another tab saved).
// * Calls run one at a time in call order (a queue); every promise settles: worker errors,
//   terminate() (TerminatedError) and a per-call watchdog (TimeoutError; the worker is
//   restarted and reloaded) reject it. learnTask reports progress (onProgress and 'progress'
//   events) and takes an AbortSignal (AbortError, weights back where the call started).
// * Errors are rebuilt as their own class (errors.mjs) with a `.code`. A bare number from
//   onnxruntime-web or a wasm trap is a FatalRuntimeError: the worker is replaced and reloaded
//   from the last loaded source (unsaved learning is lost).
import {
  AbortError,
  ArgumentError,
  FatalRuntimeError,
  TerminatedError,
  TimeoutError,
  fromWire,
} from './errors.mjs';
import { readGeneration, writeGeneration } from './storage.mjs';

export * from './errors.mjs';
export { IndexedDBStore, OPFSStore } from './storage.mjs';

const here = new URL('.', import.meta.url);
// a source checkout keeps onnxruntime-web in ./node_modules; an installed package beside it
const installed = /\/node_modules\/(@[^/]+\/)?[^/]+\/$/.test(here.pathname);
const DIST = new URL(installed ? '../onnxruntime-web/dist/' : './node_modules/onnxruntime-web/dist/', here);
const pageBase = () => globalThis.document?.baseURI ?? globalThis.location?.href;
const INIT_TIMEOUT_MS = 60_000;
const isStore = (s) => s && typeof s.read === 'function'; // a reader is enough to load

export class WorkerLearner extends EventTarget {
  /**
   * @param {object} [options]
   * @param {string|URL} [options.workerUrl] worker.mjs (default: beside this file)
   * @param {string|URL} [options.ortUrl] onnxruntime-web's ort.training.wasm.min.mjs
   * @param {string|URL} [options.wasmPaths] the folder of its .wasm files
   * @param {number} [options.timeoutMs] per-call watchdog (default 300 s; 0: none)
   * @param {number} [options.numThreads] wasm threads (default: 4 when cross-origin isolated, else 1)
   */
  constructor({ workerUrl, ortUrl, wasmPaths, timeoutMs = 300_000, numThreads } = {}) {
    super();
    const base = pageBase();
    this.urls = {
      workerUrl: new URL(workerUrl ?? './worker.mjs', workerUrl ? base : here).href,
      ortUrl: new URL(ortUrl ?? 'ort.training.wasm.min.mjs', ortUrl ? base : DIST).href,
      wasmPaths: new URL(wasmPaths ?? '.', wasmPaths ? base : DIST).href,
    };
    const isolated = globalThis.crossOriginIsolated === true;
    this.numThreads = numThreads ?? (isolated ? Math.min(4, globalThis.navigator?.hardwareConcurrency ?? 1) : 1);
    this.timeoutMs = timeoutMs;
    this.source = null; // what the worker last loaded (bytes or URL), to reload after a restart
    this.store = null;
    this.generation = null; // the generation this learner holds (as loaded or saved)
    this.restarts = 0;
    this.terminated = false;
    this._tail = Promise.resolve();
    this._start();
  }

  _start() {
    this.worker = new Worker(this.urls.workerUrl, { type: 'module' });
    this.pending = new Map();
    this.nextId = 0;
    this.worker.onmessage = ({ data }) => {
      const call = this.pending.get(data.id);
      if (!call) return;
      if ('progress' in data) {
        call.onProgress?.(data.progress);
        this.dispatchEvent(Object.assign(new Event('progress'), { detail: data.progress }));
        return;
      }
      this._settle(data.id, 'error' in data ? fromWire(data.error) : null, data.value);
    };
    // a worker script that fails to load (404, syntax) or dies: every waiting call rejects
    this.worker.onerror = (event) => {
      event.preventDefault?.();
      const error = new FatalRuntimeError(`the learner's worker failed: ${event.message || `cannot run ${this.urls.workerUrl}`}`);
      for (const id of [...this.pending.keys()]) this._settle(id, error);
      this.broken = error;
    };
    this.broken = null;
    const { ortUrl, wasmPaths } = this.urls;
    // loading onnxruntime's wasm may take long on a slow network: a watchdog of its own
    const timeoutMs = this.timeoutMs > 0 ? Math.max(this.timeoutMs, INIT_TIMEOUT_MS) : 0;
    this.ready = this._post('init', [{ ortUrl, wasmPaths, numThreads: this.numThreads }], { timeoutMs }).then((info) => {
      this.info = info;
    });
    this.ready.catch(() => {}); // observed by the first call
  }

  _settle(id, error, value) {
    const call = this.pending.get(id);
    if (!call) return;
    this.pending.delete(id);
    clearTimeout(call.timer);
    call.cleanup?.();
    if (error) call.reject(error);
    else call.resolve(value);
  }

  _post(method, args, { onProgress, signal, transfer = [], timeoutMs = this.timeoutMs } = {}) {
    return new Promise((resolve, reject) => {
      if (this.terminated) return reject(new TerminatedError(`${method}: the learner was terminated`));
      if (this.broken) return reject(this.broken);
      if (signal?.aborted) return reject(new AbortError(`${method}: cancelled before it started`));
      const id = this.nextId++;
      const call = { resolve, reject, onProgress };
      if (timeoutMs > 0) {
        const ms = timeoutMs;
        call.timer = setTimeout(() => this._timeout(id, method, ms), ms);
      }
      if (signal) {
        const abort = () => this.worker.postMessage({ cancel: id });
        signal.addEventListener('abort', abort, { once: true });
        call.cleanup = () => signal.removeEventListener('abort', abort);
      }
      this.pending.set(id, call);
      this.worker.postMessage({ id, method, args }, transfer);
    });
  }

  /** The watchdog fired: the worker may be stuck inside wasm; replace it and reload. */
  _timeout(id, method, ms) {
    this._settle(id, new TimeoutError(`${method} did not finish within ${ms} ms; the worker was restarted`));
    this._restart();
  }

  _restart() {
    this.worker.terminate();
    const restarted = Object.assign(new FatalRuntimeError('the worker was restarted'), { restarted: true });
    for (const id of [...this.pending.keys()]) this._settle(id, restarted);
    this.restarts += 1;
    this._start();
    if (this.source !== null) this._queue(() => this._exec('load', [copySource(this.source)]));
  }

  /** Run `job` after every earlier call settled (the call queue). */
  _queue(job) {
    const result = this._tail.then(job, job);
    this._tail = result.catch(() => {});
    return result;
  }

  /** One worker call now (inside a queued job); a fatal error restarts the worker. */
  async _exec(method, args = [], options = {}) {
    await this.ready;
    try {
      return await this._post(method, args, options);
    } catch (e) {
      if (e instanceof FatalRuntimeError && !e.restarted && !this.broken && !this.terminated) this._restart();
      throw e;
    }
  }

  /** Queue `method` after every earlier call. */
  call(method, args = [], options = {}) {
    return this._queue(() => this._exec(method, args, options));
  }

  /**
   * Load artifacts: a URL (resolved against the page), {name: Uint8Array} bytes, or a store.
   * Resolves {manifest}.
   */
  load(source) {
    let message = source;
    let store = null;
    if (typeof source === 'string' || source instanceof URL) message = new URL(String(source), pageBase()).href;
    else if (isStore(source)) store = source;
    else if (!source || typeof source !== 'object') {
      return Promise.reject(new ArgumentError(`load() takes a URL, bytes or a store, got ${source === null ? 'null' : typeof source}`));
    }
    return this._queue(async () => {
      // the worker gets its own copy (transferred): the caller's arrays stay usable
      const payload = store ? await readGeneration(store) : copySource(message);
      this.source = copySource(payload);
      const transfer = typeof payload === 'string' ? [] : transferList(payload);
      const out = await this._exec('load', [payload], { transfer });
      this.store = store;
      this.generation = out.manifest.generation;
      return out;
    });
  }

  learnTask(batches, { onProgress, signal, ...options } = {}) {
    return this.call('learnTask', [batches, { ...options, progress: true }], { onProgress, signal });
  }

  endTask(batches, { signal, ...options } = {}) {
    return this.call('endTask', [batches, options], { signal });
  }

  predict(inputs, options) { return this.call('predict', [inputs, options]); }
  evaluate(batches, options) { return this.call('evaluate', [batches, options]); }
  parameters() { return this.call('parameters'); }
  importance() { return this.call('importance'); }
  manifest() { return this.call('manifest'); }
  validationLosses() { return this.call('validationLosses'); }

  /**
   * Save the next generation. With a store (or the store it was loaded from): written there
   * (StaleWriterError if another writer moved it on; nothing written) and {generation}
   * resolves; without: {files, generation} for the caller to keep (manifest.json last).
   */
  save(store = this.store) {
    return this._queue(async () => {
      if (!store) {
        const out = await this._exec('save');
        this.generation = out.generation;
        return out;
      }
      if (typeof store.write !== 'function' || typeof store.list !== 'function') {
        throw new ArgumentError(`save(store): ${store.name ?? 'the store'} has no write() and list(): it can only be loaded from`);
      }
      const prepared = await this._exec('prepareSave', [{ graphs: true }]);
      const source = copySource(prepared.files); // before the store keeps the arrays
      await writeGeneration(store, prepared.files, this.store === store ? this.generation : null);
      await this._exec('commitSave');
      this.store = store;
      this.generation = prepared.generation;
      this.source = source;
      return { generation: prepared.generation };
    });
  }

  /** Stop the worker; every waiting and later call rejects with TerminatedError. */
  terminate() {
    if (this.terminated) return;
    this.terminated = true;
    this.worker.terminate();
    for (const id of [...this.pending.keys()]) this._settle(id, new TerminatedError('the learner was terminated'));
  }
}

function copySource(files) {
  if (typeof files === 'string') return files;
  return Object.fromEntries(Object.entries(files).map(([k, v]) => [k, v.slice()]));
}

function transferList(files) {
  return Object.values(files).map((b) => b.buffer);
}
