// Main-thread handle of a learner running in a Web Worker (worker.mjs).
//
// onnxruntime-web 1.19.2's training build reports some C++ failures as a bare number; after
// one the wasm heap cannot be trusted. Such a rejection is fatal: the worker is terminated and
// a fresh one is started and reloaded from the last loaded artifacts (unsaved learning is
// lost), and the call rejects with a FatalRuntimeError.
export class FatalRuntimeError extends Error {}

export class WorkerLearner {
  /**
   * @param {{workerUrl: string|URL, ortUrl: string, wasmPaths: string}} urls absolute URLs
   */
  constructor({ workerUrl, ortUrl, wasmPaths }) {
    this.urls = { workerUrl, ortUrl, wasmPaths };
    this.source = null;
    this.restarts = 0;
    this._start();
  }

  _start() {
    this.worker = new Worker(this.urls.workerUrl, { type: 'module' });
    this.pending = new Map();
    this.nextId = 0;
    this.worker.onmessage = ({ data }) => {
      const { resolve, reject } = this.pending.get(data.id);
      this.pending.delete(data.id);
      if (!('error' in data)) resolve(data.value);
      else reject(data.numeric ? new FatalRuntimeError(data.error) : new Error(data.error));
    };
    this.ready = this._post('init', { ortUrl: this.urls.ortUrl, wasmPaths: this.urls.wasmPaths });
  }

  _post(method, ...args) {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, method, args });
    });
  }

  async call(method, ...args) {
    await this.ready;
    try {
      return await this._post(method, ...args);
    } catch (e) {
      if (!(e instanceof FatalRuntimeError)) throw e;
      this.worker.terminate();
      this.restarts += 1;
      this._start();
      await this.ready;
      if (this.source !== null) await this._post('load', this.source);
      throw e;
    }
  }

  load(source) {
    this.source = source;
    return this.call('load', source);
  }

  learnTask(batches, options) { return this.call('learnTask', batches, options); }
  endTask(batches, options) { return this.call('endTask', batches, options); }
  predict(inputs, options) { return this.call('predict', inputs, options); }
  evaluate(batches, options) { return this.call('evaluate', batches, options); }
  parameters() { return this.call('parameters'); }
  importance() { return this.call('importance'); }
  save() { return this.call('save'); }
  validationLosses() { return this.call('validationLosses'); }
  terminate() { this.worker.terminate(); }
}
