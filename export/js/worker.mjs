// Web Worker running one EdgeLearner (module worker: new Worker(url, {type: 'module'})).
// Messages in: {id, method, args} | {cancel: id}. Out: {id, value, transfer} | {id, error}
// (error: errors.mjs toWire, typed on the main thread) | {id, progress}. A bare number from
// onnxruntime-web or a wasm trap is a FatalRuntimeError: the client discards this worker.
import { EdgeLearner, TaskOrderError, toWire } from './softmask_edge.mjs';

let ort = null;
let learner = null;
let pending = null; // a prepared save, adopted by commitSave
const controllers = new Map();

const buffers = (files) => Object.values(files).map((b) => b.buffer);
const need = () => {
  if (!learner) throw new TaskOrderError('load() the artifacts first');
  return learner;
};

const methods = {
  async init({ ortUrl, wasmPaths, numThreads }) {
    ort = await import(ortUrl);
    ort.env.wasm.numThreads = numThreads;
    ort.env.logLevel = 'error';
    ort.env.wasm.wasmPaths = wasmPaths;
    return { threads: ort.env.wasm.numThreads, isolated: self.crossOriginIsolated === true };
  },
  async load(source) {
    const next = await EdgeLearner.load(source, ort);
    if (learner) await learner.release();
    learner = next;
    pending = null;
    return { manifest: learner.manifest };
  },
  learnTask: (id, batches, options = {}) =>
    need().learnTask(batches, {
      ...options,
      signal: controllers.get(id).signal,
      onEpoch: options.progress ? (p) => self.postMessage({ id, progress: p }) : undefined,
    }),
  endTask: (id, batches, options = {}) => need().endTask(batches, { ...options, signal: controllers.get(id).signal }),
  predict: (id, inputs, options) => need().predict(inputs, options),
  evaluate: (id, batches, options) => need().evaluate(batches, options),
  parameters: () => need().parameters(),
  importance: () => need().importance(),
  manifest: () => need().manifest,
  validationLosses: () => need().validationLosses,
  async prepareSave(id, { graphs = false } = {}) {
    pending = await need().prepareSave();
    // copies: the reply transfers them, `pending` keeps its own
    const all = { ...pending.files, ...(graphs ? learner.graphs : {}) };
    const files = Object.fromEntries(Object.entries(all).map(([k, v]) => [k, v.slice()]));
    return { files, generation: pending.manifest.generation, manifest: pending.manifest };
  },
  commitSave() {
    need().commitSave(pending);
    pending = null;
    return { generation: learner.manifest.generation };
  },
  async save() {
    const { files, generation } = await need().save();
    return { files: Object.fromEntries(Object.entries(files).map(([k, v]) => [k, v.slice()])), generation };
  },
};
const WITH_ID = new Set(['learnTask', 'endTask', 'predict', 'evaluate', 'prepareSave']);

self.onmessage = async ({ data }) => {
  if ('cancel' in data) {
    controllers.get(data.cancel)?.abort(new Error('cancelled by the caller'));
    return;
  }
  const { id, method, args } = data;
  controllers.set(id, new AbortController());
  try {
    if (!(method in methods)) throw new TaskOrderError(`unknown method ${method}`);
    const value = await methods[method](...(WITH_ID.has(method) ? [id, ...args] : args));
    const transfer = value?.files ? buffers(value.files) : [];
    self.postMessage({ id, value }, transfer);
  } catch (e) {
    self.postMessage({ id, error: toWire(e) });
  } finally {
    controllers.delete(id);
  }
};
