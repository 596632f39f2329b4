// softmask_edge for the browser: the Python EdgeLearner's life cycle on onnxruntime-web 1.19.2.
//
// Same artifacts (manifest format 2 to 4), same steps: learnTask trains the next task
// soft-masked (training.mjs; sessions: session.mjs), endTask measures and max-accumulates its
// importance (importance.mjs), save returns the next checkpoint generation (saves.mjs). Batches
// are checked before onnxruntime sees them (batches.mjs); the manifest is checked against the
// device contract like the Python learner (manifest.mjs). This file wires them: loading, the
// learner's state (weights, stored importance, ā, history) and the public calls.
import { checkBatchList, ordered, toFeeds } from './batches.mjs';
import {
  ArgumentError,
  CorruptArtifactError,
  EdgeError,
  MissingArtifactError,
  TaskOrderError,
} from './errors.mjs';
import { refuseWrongGradients } from './broadcasts.mjs';
import { checkpointTensors, checkpointValue, indexBounds, readNpz, sha256Hex } from './formats.mjs';
import { checkHistory, checkImportance, decodeImportance, measureImportance, STORAGE } from './importance.mjs';
import { checkSizes, FORMAT_VERSION, parseManifest, STATIC_FILES, TENSORS } from './manifest.mjs';
import { nextGeneration } from './saves.mjs';
import { Sessions } from './session.mjs';
import { checkAborted, Plateau, trainTask } from './training.mjs';

export * from './errors.mjs';
export { decodeImportance, FORMAT_VERSION, Plateau };

/**
 * Reads artifact files by name from a base URL (fetch), a {name: Uint8Array} object (bytes)
 * or any {read(name) -> Promise<Uint8Array>} (a storage adapter). A relative URL resolves
 * against `location` (in a worker: the worker's; WorkerLearner resolves it on the page).
 */
export function reader(source) {
  if (typeof source === 'string' || source instanceof URL) {
    const base = new URL(String(source).endsWith('/') ? String(source) : `${source}/`, globalThis.location?.href);
    return {
      async read(name) {
        const url = new URL(name, base);
        let response;
        try {
          response = await fetch(url, { cache: 'no-store' });
        } catch (e) {
          throw new MissingArtifactError(`cannot fetch ${url}: ${e.message}`);
        }
        if (!response.ok) throw new MissingArtifactError(`cannot read ${url}: HTTP ${response.status}`);
        return new Uint8Array(await response.arrayBuffer());
      },
    };
  }
  if (source && typeof source.read === 'function') return source;
  if (source && typeof source === 'object') {
    return {
      async read(name) {
        const bytes = source instanceof Map ? source.get(name) : Object.prototype.hasOwnProperty.call(source, name) ? source[name] : undefined;
        if (bytes === undefined) throw new MissingArtifactError(`the artifacts lack ${name}`);
        if (!(bytes instanceof Uint8Array)) throw new CorruptArtifactError(`${name}: expected a Uint8Array, got ${bytes?.constructor?.name}`);
        return bytes;
      },
    };
  }
  throw new ArgumentError(`load() takes a URL, a {name: Uint8Array} object or a {read(name)} adapter, got ${source === null ? 'null' : typeof source}`);
}

async function readBytes(files, name) {
  const bytes = await files.read(name);
  if (!(bytes instanceof Uint8Array)) throw new CorruptArtifactError(`${name}: the reader returned ${bytes?.constructor?.name}, not a Uint8Array`);
  return bytes;
}

/** Run `parse` on a file's bytes; a parser's plain Error becomes a CorruptArtifactError naming the file. */
function parsed(name, parse) {
  try {
    return parse();
  } catch (e) {
    if (e instanceof EdgeError) throw e;
    throw new CorruptArtifactError(`${name}: ${e?.message ?? e}`);
  }
}

export class EdgeLearner {
  /**
   * Load and check artifacts (manifest against the device contract, SHA-256 of every file
   * before any parser reads it, importance and history like the Python learner).
   * @param {string|URL|object} source base URL, {name: Uint8Array} or {read(name)} adapter
   * @param {object} ort the onnxruntime-web/training module (env.wasm set by the caller)
   */
  static async load(source, ort) {
    const files = reader(source);
    const manifest = parseManifest(await readBytes(files, 'manifest.json'));
    const hashes = manifest.format_version >= 3 ? manifest.graphs_sha256 : {};
    const [checkpoint, history] = [await readBytes(files, manifest.checkpoint), await readBytes(files, manifest.history)];
    checkSizes(manifest, checkpoint.length, history.length);
    const graphs = {};
    for (const name of STATIC_FILES) graphs[name] = await readBytes(files, name);
    // every hash is checked before any parser reads a byte
    for (const [name, bytes, expected] of [
      [manifest.checkpoint, checkpoint, manifest.checkpoint_sha256],
      [manifest.history, history, manifest.history_sha256],
      ...Object.entries(hashes).map(([n, h]) => [n, graphs[n], h]),
    ]) {
      if ((await sha256Hex(bytes)) !== expected) {
        throw new CorruptArtifactError(`${name} is damaged or belongs to another export: its SHA-256 differs from the manifest`);
      }
    }
    // artifacts before format 4 whose broadcast gradients onnxruntime built on a wrong guess
    await refuseWrongGradients(ort, manifest, graphs[STATIC_FILES[0]], graphs[STATIC_FILES[1]]);
    return new EdgeLearner(ort, manifest, checkpoint, parsed(manifest.history, () => readNpz(history)), graphs);
  }

  constructor(ort, manifest, checkpoint, history, graphs) {
    this.ort = ort;
    this.manifest = manifest;
    this.graphs = graphs;
    this.checkpoint = checkpoint;
    const tensors = parsed(manifest.checkpoint, () => checkpointTensors(checkpoint));
    const expected = [...Object.keys(manifest.params), ...manifest.masked.map((n) => n + TENSORS.importance_suffix), TENSORS.mean_importance];
    const missing = expected.filter((n) => !tensors.has(n));
    if (missing.length) throw new CorruptArtifactError(`checkpoint ${manifest.checkpoint} lacks ${missing.slice(0, 10).join(', ')}`);
    this.state = Object.fromEntries(expected.map((n) => [n, parsed(manifest.checkpoint, () => checkpointValue(checkpoint, tensors, n))]));
    for (const n of Object.keys(manifest.params)) {
      const shape = manifest.params[n];
      if (!(this.state[n] instanceof Float32Array) || this.state[n].length !== shape.reduce((a, b) => a * b, 1)) {
        throw new CorruptArtifactError(`checkpoint ${manifest.checkpoint}: ${n} does not hold float32 [${shape}]`);
      }
    }
    checkImportance(manifest, this.state);
    checkHistory(manifest, history);
    this.history = history;
    const integer = manifest.inputs.filter((i) => i.dtype === 'int64' || i.dtype === 'int32').map((i) => i.name);
    this.indexBounds = parsed(STATIC_FILES[0], () => indexBounds(graphs[STATIC_FILES[0]], integer, manifest.params));
    this.sessions = new Sessions(this);
    this.validationLosses = [];
  }

  get numTasks() {
    return this.manifest.num_tasks;
  }

  /** Copies of the trainable weights by parameter name (float32). */
  parameters() {
    return Object.fromEntries(Object.keys(this.manifest.params).map((n) => [n, Float32Array.from(this.state[n])]));
  }

  /** Accumulated importance A of every masked parameter (float32). */
  importance() {
    const dtype = this.manifest.importance_dtype;
    return Object.fromEntries(this.manifest.masked.map((n) => [n, decodeImportance(this.state[n + TENSORS.importance_suffix], dtype)]));
  }

  _nextTask() {
    const t = this.manifest.num_tasks;
    if (this.manifest.task_mode === 'task_incremental' && t >= this.manifest.head_classes.length) {
      throw new TaskOrderError(`all ${this.manifest.head_classes.length} declared heads are used; declare more heads at export time`);
    }
    return t;
  }

  /** The head `taskId` names (shared head: 0); TaskOrderError outside the declared heads. */
  _head(taskId) {
    if (this.manifest.task_mode === 'shared_head') return 0;
    const head = taskId ?? Math.max(this.numTasks - 1, 0);
    if (!(Number.isInteger(head) && head >= 0 && head < this.manifest.head_classes.length)) {
      throw new TaskOrderError(`taskId ${head} is not a declared head (0..${this.manifest.head_classes.length - 1})`);
    }
    return head;
  }

  _classes(head) {
    return this.manifest.head_classes[this.manifest.task_mode === 'shared_head' ? 0 : head];
  }

  _feeds(batch, head, { crossHead }) {
    return toFeeds(this.ort, this.manifest, this.indexBounds, batch, head, this._classes(head), { crossHead });
  }

  /**
   * Train the next task soft-masked; returns the mean loss per epoch.
   * `masked: false` trains with scale 0: plain fine-tuning, the baseline. With `validation`
   * batches, `epochs` is a maximum: the lr decays on validation-loss plateaus, training stops
   * early and the best weights are kept (`earlyStopping`: {patience, lrPatience, lrFactor,
   * lrMin}, the Python learner's EarlyStopping); `validationLosses` lists the losses.
   * `onEpoch({epoch, epochs, loss, valLoss, lr, ms})` reports progress; `signal` (AbortSignal)
   * cancels between steps (AbortError) with the weights back where the call started.
   */
  async learnTask(batches, { epochs = 1, lr = 0.05, masked = true, validation = null, earlyStopping = {}, onEpoch, signal } = {}) {
    const t = this._nextTask();
    checkBatchList(batches, `learnTask(${t})`);
    if (!(Number.isInteger(epochs) && epochs >= 1 && Number.isFinite(lr) && lr > 0)) {
      throw new ArgumentError(`epochs must be an integer >= 1 and lr a finite number > 0, got epochs=${epochs}, lr=${lr}`);
    }
    if (validation) checkBatchList(validation, `learnTask(${t}) validation`);
    const prepared = batches.map((b) => this._feeds(b, t, { crossHead: false }));
    const val = validation && validation.map((b) => this._feeds(b, t, { crossHead: false }));
    const plateau = new Plateau(earlyStopping, lr);
    const start = this.parameters();
    try {
      return await trainTask(this, t, prepared, val, masked ? 1 : 0, plateau, epochs, { onEpoch, signal });
    } catch (e) {
      // cancelled, or onnxruntime refused a batch mid-pass: the weights go back to the start
      Object.assign(this.state, start);
      await this.sessions.close().catch(() => {});
      throw e;
    }
  }

  /** Measure the finished task's importance, max-accumulate it; returns it (float32). */
  async endTask(batches, { name, signal } = {}) {
    const t = this._nextTask();
    checkBatchList(batches, `the importance pass of task ${t}`);
    const heads = this.manifest.task_mode === 'task_incremental' ? [...Array(t + 1).keys()] : [t];
    const feeds = Object.fromEntries(heads.map((h) => [h, batches.map((b) => this._feeds(b, h, { crossHead: h !== t }))]));
    checkAborted(signal);
    const session = await this.sessions.open(t, null, { scale: 0, gradients: true });
    const feedsFor = (h) => feeds[h].map((f) => ordered(f, session.trainingInputNames));
    let result;
    try {
      result = await measureImportance(this.ort, this.graphs[STATIC_FILES[3]], this.manifest, this.state, session, feedsFor, heads);
    } finally {
      await this.sessions.close(); // its checkpoint holds the old importance
    }
    const task = {};
    const dtype = this.manifest.importance_dtype;
    for (const n of this.manifest.masked) {
      this.state[n + TENSORS.importance_suffix] = result.stored[n];
      this.history[`task.${t}.${n}`] = { data: result.task[n], shape: this.manifest.params[n] };
      task[n] = decodeImportance(result.task[n], dtype);
    }
    this.state[TENSORS.mean_importance] = result.mean;
    this.manifest = {
      ...this.manifest,
      num_tasks: t + 1,
      task_names: [...this.manifest.task_names.slice(0, t), name ?? `task_${t}`],
    };
    return task;
  }

  /** Logits (flat, batch x classes) of head `taskId` (default: the latest learned) in eval mode. */
  async predict(inputs, { taskId } = {}) {
    const head = this._head(taskId);
    const first = inputs?.[this.manifest.inputs[0].name];
    const rows = first?.dims?.[0];
    const batch = { inputs, labels: new Array(Number.isInteger(rows) ? rows : 0).fill(0) };
    const feeds = this._feeds(batch, head, { crossHead: false });
    const session = this.sessions.session ?? (await this.sessions.open(null, null));
    const out = await session.runEvalStep(ordered(feeds, session.evalInputNames));
    return { data: Float32Array.from(out.logits.data), dims: out.logits.dims };
  }

  /** Accuracy of head `taskId` on batches. */
  async evaluate(batches, { taskId } = {}) {
    checkBatchList(batches, 'evaluate()');
    let correct = 0;
    let total = 0;
    for (const b of batches) {
      const { data, dims } = await this.predict(b.inputs, { taskId });
      const width = dims[dims.length - 1];
      Array.from(b.labels ?? []).forEach((y, i) => {
        const row = data.subarray(i * width, (i + 1) * width);
        correct += row.indexOf(Math.max(...row)) === Number(y) ? 1 : 0;
        total += 1;
      });
    }
    return correct / total;
  }

  /**
   * The next generation: {files: {name: Uint8Array}} with the patched checkpoint, the history
   * and manifest.json (write manifest.json last); the static graphs are unchanged.
   */
  async save() {
    const next = await this.prepareSave();
    this.commitSave(next);
    return { files: next.files, generation: next.manifest.generation };
  }

  /** The next generation without adopting it (a storage write may still refuse it). */
  prepareSave() {
    return nextGeneration(this.manifest, this.checkpoint, this.state, this.history);
  }

  /** Adopt a generation `prepareSave` returned (once it is stored). */
  commitSave({ manifest, checkpoint }) {
    this.manifest = manifest;
    this.checkpoint = checkpoint;
  }

  async release() {
    await this.sessions.close();
  }
}

export { STORAGE };
