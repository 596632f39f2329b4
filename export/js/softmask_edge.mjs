// softmask_edge for the browser: the Python EdgeLearner's life cycle on onnxruntime-web 1.19.2.
//
// Same artifacts (manifest format 2 or 3), same steps: learnTask trains the next task soft-masked
// (the training graph scales each gradient by 1 - s*A, heads by 1 - s*ā, with s, A and ā
// folded into the session's graph as constants); endTask runs one raw-gradient pass (s = 0)
// per head h <= t, feeds the stacked gradient sums to the
// importance-update graph (γ = max_h |tanh(standardize(g_h))|, A <- max(A, γ)) in a plain
// InferenceSession and keeps the result; save returns a new checkpoint generation (the
// original ORT checkpoint with its tensors overwritten), the history .npz and the manifest.
//
// The learner holds the state in JS memory (weights, stored importance, ā, history) and
// builds a training session per task from a checkpoint patched with that state, with the
// task's learning rate written into the optimizer graph (onnxruntime-web cannot set it).
import {
  checkpointTensors,
  checkpointValue,
  indexBounds,
  patchCheckpoint,
  readNpz,
  setScalarInitializer,
  sha256Hex,
  specializeGraph,
  writeNpz,
} from './formats.mjs';

export const FORMAT_VERSION = 3;
// format 3 adds graphs_sha256, export_id and the log-keep uint8 code to format 2; both load
// (format 2 with uint8 importance stored the old linear code: refused, re-export)
const READABLE_FORMATS = [2, 3];
const PLAIN_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/;
const IMPORTANCE_SUFFIX = '.softmask_importance';
const GRADIENT_SUFFIX = '.softmask_gradient';
const MEAN_IMPORTANCE = 'softmask.mean_importance';
const SCALE = 'softmask_scale';
const LEARNING_RATE = 'softmask.learning_rate';
const STATIC_FILES = ['training_model.onnx', 'eval_model.onnx', 'optimizer_model.onnx', 'importance_update.onnx'];
const STORAGE = { float32: Float32Array, float16: Uint16Array, uint8: Uint8Array };
const ORT_TYPES = { float32: 'float32', float16: 'uint16', uint8: 'uint8' };
const ARRAY_TYPES = { float32: Float32Array, int64: BigInt64Array, int32: Int32Array, bool: Uint8Array };

export class EdgeError extends Error {}

/** The Python learner's schedule.Plateau: lr decay on plateaus, early stop, best epoch. */
export class Plateau {
  constructor({ patience = 10, lrPatience = 3, lrFactor = 1 / 3, lrMin = 1e-4 } = {}, lr) {
    if (!(patience >= 1 && lrPatience >= 1 && lrFactor > 0 && lrFactor < 1)) {
      throw new EdgeError('earlyStopping needs patience, lrPatience >= 1 and lrFactor in (0, 1)');
    }
    Object.assign(this, { patience, lrPatience, lrFactor, lrMin, lr });
    this.best = Infinity;
    this.sinceBest = 0;
    this.sinceChange = 0;
  }

  update(valLoss) {
    const improved = Number.isFinite(valLoss) && valLoss < this.best;
    if (improved) {
      this.best = valLoss;
      this.sinceBest = 0;
      this.sinceChange = 0;
    } else {
      this.sinceBest += 1;
      this.sinceChange += 1;
      if (this.sinceChange >= this.lrPatience) {
        this.lr *= this.lrFactor;
        this.sinceChange = 0;
      }
    }
    return { improved, stop: this.sinceBest >= this.patience || this.lr < this.lrMin };
  }
}

const pad = (n) => String(n).padStart(6, '0');
const size = (shape) => shape.reduce((a, b) => a * b, 1);

/**
 * Stored importance -> float32, as softmask_format.codec.decode. uint8 (format 3): the keep
 * factor on a log grid, A = 1 - 2^(-c/16), code 255 = 1 (rounded once to float32, as numpy's
 * table); float16: its bit pattern in uint16.
 */
export function decodeImportance(stored, dtype) {
  if (dtype === 'float32') return Float32Array.from(stored);
  if (dtype === 'uint8') return Float32Array.from(stored, (c) => (c === 255 ? 1 : 1 - 2 ** (-c / 16)));
  return Float32Array.from(stored, (b) => {
    const e = b >> 10;
    const m = b & 1023;
    return e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15);
  });
}

function sortedJson(value) {
  const sort = (v) => {
    if (Array.isArray(v)) return v.map(sort);
    if (v && typeof v === 'object') {
      return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sort(v[k])]));
    }
    return v;
  };
  return `${JSON.stringify(sort(value), null, 2)}\n`;
}

/** Reads artifact files by name: a base URL (fetch) or any {read(name) -> Uint8Array}. */
function reader(source) {
  if (typeof source !== 'string') return source;
  const base = source.endsWith('/') ? source : `${source}/`;
  return {
    async read(name) {
      const response = await fetch(base + name, { cache: 'no-store' });
      if (!response.ok) throw new EdgeError(`cannot read ${base + name}: HTTP ${response.status}`);
      return new Uint8Array(await response.arrayBuffer());
    },
  };
}

export class EdgeLearner {
  /**
   * Load and check an artifacts folder (manifest format, SHA-256 of checkpoint and history).
   * @param {string|{read(name: string): Promise<Uint8Array>}} source base URL or reader
   * @param {object} ort the onnxruntime-web/training module (env.wasm set by the caller)
   */
  static async load(source, ort) {
    const files = reader(source);
    const manifest = JSON.parse(new TextDecoder().decode(await files.read('manifest.json')));
    if (!READABLE_FORMATS.includes(manifest.format_version)) {
      throw new EdgeError(
        `manifest format_version ${manifest.format_version} is not supported by the JS learner ` +
          `(it reads ${READABLE_FORMATS.join(', ')}); re-export with this release's export_for_device`,
      );
    }
    if (manifest.format_version < 3 && manifest.importance_dtype === 'uint8') {
      throw new EdgeError(
        `manifest format_version ${manifest.format_version} stores uint8 importance on the old ` +
          'linear code; re-export with this release\'s export_for_device',
      );
    }
    for (const name of [manifest.checkpoint, manifest.history]) {
      if (typeof name !== 'string' || !PLAIN_NAME.test(name)) {
        throw new EdgeError(`the manifest names ${JSON.stringify(name)}: only plain file names inside the artifacts folder`);
      }
    }
    const hashes = manifest.format_version >= 3 ? manifest.graphs_sha256 : {};
    if (manifest.format_version >= 3 && !STATIC_FILES.every((n) => typeof hashes?.[n] === 'string')) {
      throw new EdgeError(`format 3 needs graphs_sha256 for ${STATIC_FILES.join(', ')}`);
    }
    const [checkpoint, history] = await Promise.all([files.read(manifest.checkpoint), files.read(manifest.history)]);
    const graphs = {};
    for (const name of STATIC_FILES) graphs[name] = await files.read(name);
    // every hash is checked before onnxruntime parses any byte
    for (const [name, bytes, expected] of [
      [manifest.checkpoint, checkpoint, manifest.checkpoint_sha256],
      [manifest.history, history, manifest.history_sha256],
      ...Object.entries(hashes).map(([n, h]) => [n, graphs[n], h]),
    ]) {
      if ((await sha256Hex(bytes)) !== expected) {
        throw new EdgeError(`${name} is damaged or belongs to another export: its SHA-256 differs from the manifest`);
      }
    }
    return new EdgeLearner(ort, manifest, checkpoint, readNpz(history), graphs);
  }

  constructor(ort, manifest, checkpoint, history, graphs) {
    this.ort = ort;
    this.manifest = manifest;
    this.graphs = graphs;
    this.checkpoint = checkpoint;
    const tensors = checkpointTensors(checkpoint);
    const expected = [...Object.keys(manifest.params), ...manifest.masked.map((n) => n + IMPORTANCE_SUFFIX), MEAN_IMPORTANCE];
    const missing = expected.filter((n) => !tensors.has(n));
    if (missing.length) throw new EdgeError(`checkpoint ${manifest.checkpoint} lacks ${missing.join(', ')}`);
    this.state = Object.fromEntries(expected.map((n) => [n, checkpointValue(checkpoint, tensors, n)]));
    this.history = history;
    EdgeLearner._checkImportance(manifest, this.state, history);
    this.trainableOrder = manifest.parameter_order.filter((n) => n in manifest.params);
    const integer = manifest.inputs.filter((i) => i.dtype === 'int64' || i.dtype === 'int32').map((i) => i.name);
    this.indexBounds = indexBounds(graphs['training_model.onnx'], integer, manifest.params);
    this.session = null;
    this.sessionKey = null;
  }

  /** Importance as the Python learner checks it: the storage dtype, finite, in [0, 1]. */
  static _checkImportance(manifest, state, history) {
    const dtype = manifest.importance_dtype;
    const tensors = [
      ...manifest.masked.map((n) => [n + IMPORTANCE_SUFFIX, state[n + IMPORTANCE_SUFFIX], dtype]),
      [MEAN_IMPORTANCE, state[MEAN_IMPORTANCE], 'float32'],
      ...Object.entries(history).map(([k, v]) => [k, v.data, dtype]),
    ];
    for (const [name, data, stored] of tensors) {
      if (!(data instanceof STORAGE[stored])) {
        throw new EdgeError(`${name}: ${data.constructor.name}, the manifest's importance dtype stores ${stored}`);
      }
      if (!decodeImportance(data, stored).every((v) => Number.isFinite(v) && v >= 0 && v <= 1)) {
        throw new EdgeError(`${name}: importance outside [0, 1] or not finite`);
      }
    }
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
    return Object.fromEntries(this.manifest.masked.map((n) => [n, decodeImportance(this.state[n + IMPORTANCE_SUFFIX], dtype)]));
  }

  _nextTask() {
    const t = this.manifest.num_tasks;
    if (this.manifest.task_mode === 'task_incremental' && t >= this.manifest.head_classes.length) {
      throw new EdgeError(`all ${this.manifest.head_classes.length} declared heads are used; declare more heads at export time`);
    }
    return t;
  }

  _classes(head) {
    return this.manifest.task_mode === 'shared_head' ? this.manifest.head_classes[0] : this.manifest.head_classes[head];
  }

  /**
   * The graphs of a session that trains with scale `scale`: s, the stored A and ā become
   * constants, so onnxruntime folds keep = 1 - s*A once (the Python learner's
   * graphs.specialize); only the raw-gradient pass (`gradients`) keeps the gradient outputs.
   */
  _graphsFor(scale, gradients) {
    const constants = { [SCALE]: { data: Float32Array.of(scale), dims: [] } };
    constants[MEAN_IMPORTANCE] = { data: this.state[MEAN_IMPORTANCE], dims: [1] };
    for (const n of this.manifest.masked) {
      constants[n + IMPORTANCE_SUFFIX] = { data: this.state[n + IMPORTANCE_SUFFIX], dims: this.manifest.params[n] };
    }
    const dropOutputs = (name) => !gradients && name.endsWith(GRADIENT_SUFFIX);
    const train = specializeGraph(this.graphs['training_model.onnx'], { constants, dropOutputs });
    const missing = Object.keys(constants).filter((n) => !train.folded.includes(n));
    if (missing.length) throw new EdgeError(`the training graph does not take ${missing.join(', ')}: it does not fit its checkpoint`);
    // the eval graph declares A and ā without reading them; onnxruntime feeds it the
    // parameters the training graph takes, so they go
    const evaluation = specializeGraph(this.graphs['eval_model.onnx'], { unused: Object.keys(constants) });
    return { trainModel: train.model, evalModel: evaluation.model };
  }

  /** A training session on the current state; the optimizer graph carries `lr`. */
  async _openSession(task, lr, { scale = 1, gradients = false } = {}) {
    const key = JSON.stringify([task, lr, scale, gradients]);
    if (this.session && this.sessionKey === key) return this.session;
    await this._closeSession();
    const values = Object.fromEntries(Object.entries(this.state));
    const optimizer = setScalarInitializer(this.graphs['optimizer_model.onnx'], LEARNING_RATE, lr ?? this.manifest.learning_rate);
    this.session = await this.ort.TrainingSession.create(
      {
        checkpointState: patchCheckpoint(this.checkpoint, values),
        ...this._graphsFor(scale, gradients),
        optimizerModel: optimizer,
      },
      // errors only: onnxruntime warns on every optimizer step that the SGD flag has shape
      // [1] where the graph declares rank 0 (the declaration createTrainingSession accepts);
      // that console line made a 9 k-parameter MLP's step 2.1 ms instead of 0.65 ms
      { logSeverityLevel: 3 },
    );
    this.sessionKey = key;
    return this.session;
  }

  async _closeSession() {
    if (this.session) await this.session.release();
    this.session = null;
  }

  /** The trained weights out of the session's flat buffer (training-graph parameter order). */
  async _syncWeights() {
    const flat = (await this.session.getContiguousParameters(true)).data;
    let at = 0;
    for (const n of this.trainableOrder) {
      const count = size(this.manifest.params[n]);
      this.state[n] = Float32Array.from(flat.subarray(at, at + count));
      at += count;
    }
    if (at !== flat.length) throw new EdgeError(`flat parameter buffer holds ${flat.length} values, the manifest ${at}`);
  }

  _feeds(batch, head, { crossHead }) {
    const T = this.ort.Tensor;
    const feeds = {};
    let rowsInBatch = null;
    for (const spec of this.manifest.inputs) {
      const x = batch.inputs?.[spec.name];
      if (!x) throw new EdgeError(`batch inputs: missing ${spec.name}`);
      // checked here, not by onnxruntime-web: its refusal mid-pass is a bare number (fatal)
      if (!(x.data instanceof ARRAY_TYPES[spec.dtype])) {
        throw new EdgeError(`input ${spec.name}: ${x.data?.constructor?.name} data, the graph needs ${ARRAY_TYPES[spec.dtype]?.name} (${spec.dtype})`);
      }
      const dims = Array.from(x.dims ?? []);
      const fits = dims.length === spec.shape.length && dims.every((d, i) => Number.isInteger(d) && d >= 0 && (spec.shape[i] === null || spec.shape[i] === d));
      if (!fits) throw new EdgeError(`input ${spec.name}: dims [${dims}] do not match [${spec.shape.map((d) => d ?? '?')}]`);
      if (x.data.length !== size(dims)) throw new EdgeError(`input ${spec.name}: ${x.data.length} values for dims [${dims}]`);
      if (rowsInBatch !== null && dims[0] !== rowsInBatch) throw new EdgeError(`inputs disagree on the batch size (${rowsInBatch} vs ${dims[0]})`);
      rowsInBatch = dims[0];
      if (x.data instanceof Float32Array && !x.data.every(Number.isFinite)) {
        throw new EdgeError(`input ${spec.name} holds NaN or Inf values`);
      }
      const rows = this.indexBounds[spec.name];
      if (rows !== undefined && x.data.some((v) => v < 0 || v >= rows)) {
        throw new EdgeError(`input ${spec.name} holds ids outside [0, ${rows}): the table it indexes has ${rows} rows`);
      }
      feeds[spec.name] = new T(spec.dtype, x.data, x.dims);
    }
    const n = batch.labels?.length;
    if (n !== rowsInBatch) throw new EdgeError(`${n} labels for a batch of ${rowsInBatch} rows`);
    // onnxruntime's mean cross-entropy divides by the batch size (a wasm trap)
    if (!n) throw new EdgeError('a batch needs at least one row, got 0');
    const classes = this._classes(head);
    const labels = new BigInt64Array(n);
    if (!crossHead) {
      batch.labels.forEach((y, i) => {
        if (!(Number.isInteger(Number(y)) && y >= 0 && y < classes)) throw new EdgeError(`labels must lie in [0, ${classes}), got ${y}`);
        labels[i] = BigInt(y);
      });
    }
    feeds.labels = new T('int64', labels, [n]);
    feeds.softmask_cross_head = new T('float32', Float32Array.of(crossHead ? 1 : 0), []);
    if (this.manifest.task_mode === 'task_incremental') feeds.task_id = new T('int64', BigInt64Array.of(BigInt(head)), []);
    return feeds;
  }

  /**
   * `feeds` re-keyed in the graph's input order: onnxruntime-web passes the feeds to the
   * wasm training API positionally, in the object's key order (the indices are dropped).
   */
  static _ordered(feeds, names) {
    return Object.fromEntries(names.map((n) => [n, feeds[n]]));
  }

  /**
   * Train the next task soft-masked; returns the mean loss per epoch.
   * `masked: false` trains with scale 0: plain fine-tuning, the baseline. With `validation`
   * batches, `epochs` is a maximum: the lr decays on validation-loss plateaus, training stops
   * early and the best weights are kept (`earlyStopping`: {patience, lrPatience, lrFactor,
   * lrMin}, the Python learner's EarlyStopping); `validationLosses` lists the losses.
   */
  async learnTask(batches, { epochs = 1, lr = 0.05, masked = true, validation = null, earlyStopping = {} } = {}) {
    const t = this._nextTask();
    if (!batches.length) throw new EdgeError(`learnTask(${t}) got no batches`);
    if (!(Number.isInteger(epochs) && epochs >= 1 && Number.isFinite(lr) && lr > 0)) {
      throw new EdgeError(`epochs must be an integer >= 1 and lr a finite number > 0, got epochs=${epochs}, lr=${lr}`);
    }
    if (validation && !validation.length) throw new EdgeError(`learnTask(${t}) got an empty validation set`);
    const prepared = batches.map((b) => this._feeds(b, t, { crossHead: false }));
    const val = validation && validation.map((b) => this._feeds(b, t, { crossHead: false }));
    const scale = masked ? 1 : 0;
    const plateau = new Plateau(earlyStopping, lr);
    const start = this.parameters();
    try {
      return await this._train(t, prepared, val, scale, plateau, epochs);
    } catch (e) {
      // onnxruntime refused a batch mid-pass: the weights go back to where the call started
      Object.assign(this.state, start);
      await this._closeSession().catch(() => {});
      throw e;
    }
  }

  async _train(t, prepared, val, scale, plateau, epochs) {
    let best = null;
    const losses = [];
    this.validationLosses = [];
    for (let e = 0; e < epochs; e++) {
      const session = await this._openSession(t, plateau.lr, { scale });
      let total = 0;
      for (const f of prepared) {
        await session.lazyResetGrad();
        const out = await session.runTrainStep(EdgeLearner._ordered(f, session.trainingInputNames));
        total += out.loss.data[0];
        await session.runOptimizerStep();
      }
      losses.push(total / prepared.length);
      if (!val) continue;
      await this._syncWeights(); // a new lr reopens the session from the synced state
      let valTotal = 0;
      for (const f of val) valTotal += (await session.runEvalStep(EdgeLearner._ordered(f, session.evalInputNames))).loss.data[0];
      const valLoss = valTotal / val.length;
      this.validationLosses.push(valLoss);
      const { improved, stop } = plateau.update(valLoss);
      if (improved) best = this.parameters();
      if (stop) break;
    }
    if (!val) await this._syncWeights();
    if (val && best) {
      Object.assign(this.state, best);
      await this._closeSession(); // the wasm copy holds the last weights, not the best
    }
    return losses;
  }

  /** Measure the finished task's importance, max-accumulate it; returns it (float32). */
  async endTask(batches, { name } = {}) {
    const t = this._nextTask();
    if (!batches.length) throw new EdgeError(`the importance pass of task ${t} got no batches`);
    const session = await this._openSession(t, null, { scale: 0, gradients: true });
    const heads = this.manifest.task_mode === 'task_incremental' ? [...Array(t + 1).keys()] : [t];
    const masked = this.manifest.masked;
    const sums = Object.fromEntries(masked.map((n) => [n, []]));
    for (const h of heads) {
      await session.lazyResetGrad();
      let out = null;
      for (const b of batches) {
        const feeds = this._feeds(b, h, { crossHead: h !== t });
        out = await session.runTrainStep(EdgeLearner._ordered(feeds, session.trainingInputNames));
      }
      for (const n of masked) sums[n].push(Float32Array.from(out[n + GRADIENT_SUFFIX].data));
    }
    const bad = masked.filter((n) => sums[n].some((g) => g.some((v) => !Number.isFinite(v))));
    if (bad.length) throw new EdgeError(`importance of task ${t}: NaN/Inf gradients in ${bad.slice(0, 10).join(', ')}`);
    const T = this.ort.Tensor;
    const dtype = this.manifest.importance_dtype;
    const feeds = {};
    for (const n of masked) {
      const shape = this.manifest.params[n];
      const stacked = new Float32Array(heads.length * size(shape));
      sums[n].forEach((g, i) => stacked.set(g, i * g.length));
      feeds[`${n}.grads`] = new T('float32', stacked, [heads.length, ...shape]);
      feeds[n + IMPORTANCE_SUFFIX] = new T(ORT_TYPES[dtype], this.state[n + IMPORTANCE_SUFFIX], shape);
    }
    const update = await this.ort.InferenceSession.create(this.graphs['importance_update.onnx'], { logSeverityLevel: 3 });
    let out;
    try {
      out = await update.run(feeds);
    } finally {
      await update.release();
    }
    const task = {};
    for (const n of masked) {
      const Stored = STORAGE[dtype];
      this.state[n + IMPORTANCE_SUFFIX] = Stored.from(out[`${n}${IMPORTANCE_SUFFIX}.updated`].data);
      const own = Stored.from(out[`${n}.task_importance`].data);
      this.history[`task.${t}.${n}`] = { data: own, shape: this.manifest.params[n] };
      task[n] = decodeImportance(own, dtype);
    }
    this.state[MEAN_IMPORTANCE] = Float32Array.from(out[`${MEAN_IMPORTANCE}.updated`].data);
    this.manifest = {
      ...this.manifest,
      num_tasks: t + 1,
      task_names: [...this.manifest.task_names.slice(0, t), name ?? `task_${t}`],
    };
    await this._closeSession(); // its checkpoint holds the old importance
    return task;
  }

  /** Logits (flat, batch x classes) of head `taskId` (default: the latest learned) in eval mode. */
  async predict(inputs, { taskId } = {}) {
    const head = this.manifest.task_mode === 'shared_head' ? 0 : taskId ?? Math.max(this.numTasks - 1, 0);
    const first = inputs[this.manifest.inputs[0].name];
    const batch = { inputs, labels: new Array(first.dims[0]).fill(0) };
    const session = this.session ?? (await this._openSession(null, null));
    const feeds = this._feeds(batch, head, { crossHead: false });
    const out = await session.runEvalStep(EdgeLearner._ordered(feeds, session.evalInputNames));
    return { data: Float32Array.from(out.logits.data), dims: out.logits.dims };
  }

  /** Accuracy of head `taskId` on batches. */
  async evaluate(batches, { taskId } = {}) {
    let correct = 0;
    let total = 0;
    for (const b of batches) {
      const { data, dims } = await this.predict(b.inputs, { taskId });
      const width = dims[dims.length - 1];
      b.labels.forEach((y, i) => {
        const row = data.subarray(i * width, (i + 1) * width);
        correct += row.indexOf(Math.max(...row)) === Number(y) ? 1 : 0;
        total += 1;
      });
    }
    if (!total) throw new EdgeError('evaluate() got no batches');
    return correct / total;
  }

  /**
   * The next generation: {files: {name: Uint8Array}} with the patched checkpoint, the history
   * and manifest.json (write manifest.json last); the static graphs are unchanged.
   */
  async save() {
    const generation = this.manifest.generation + 1;
    const checkpoint = patchCheckpoint(this.checkpoint, this.state);
    const history = writeNpz(this.history);
    const names = { checkpoint: `checkpoint-${pad(generation)}`, history: `importance_history-${pad(generation)}.npz` };
    this.manifest = {
      ...this.manifest,
      generation,
      checkpoint: names.checkpoint,
      checkpoint_sha256: await sha256Hex(checkpoint),
      history: names.history,
      history_sha256: await sha256Hex(history),
    };
    this.checkpoint = checkpoint;
    return {
      files: {
        [names.checkpoint]: checkpoint,
        [names.history]: history,
        'manifest.json': new TextEncoder().encode(sortedJson(this.manifest)),
      },
    };
  }

  async release() {
    await this._closeSession();
  }
}
