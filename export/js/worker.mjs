// Web Worker running one EdgeLearner (module worker: new Worker(url, {type: 'module'})).
// Messages {id, method, args} -> {id, value} | {id, error, numeric}. `numeric` marks a bare
// number thrown by onnxruntime-web (a C++ exception pointer, no message) or a wasm trap
// (WebAssembly.RuntimeError): the wasm instance is then in an unknown state and the client
// must discard this worker.
import { EdgeLearner } from './softmask_edge.mjs';

let ort = null;
let learner = null;

const methods = {
  async init({ ortUrl, wasmPaths }) {
    ort = await import(ortUrl);
    ort.env.wasm.numThreads = 1;
    ort.env.logLevel = 'error';
    ort.env.wasm.wasmPaths = wasmPaths;
    return true;
  },
  async load(source) {
    if (learner) await learner.release();
    learner = await EdgeLearner.load(source, ort);
    return { manifest: learner.manifest };
  },
  learnTask: (batches, options) => learner.learnTask(batches, options),
  endTask: (batches, options) => learner.endTask(batches, options),
  predict: (inputs, options) => learner.predict(inputs, options),
  evaluate: (batches, options) => learner.evaluate(batches, options),
  parameters: () => learner.parameters(),
  importance: () => learner.importance(),
  save: () => learner.save(),
  numTasks: () => learner.numTasks,
  validationLosses: () => learner.validationLosses,
};

self.onmessage = async ({ data: { id, method, args } }) => {
  try {
    if (!(method in methods)) throw new Error(`unknown method ${method}`);
    if (method !== 'init' && method !== 'load' && !learner) throw new Error('load() the artifacts first');
    self.postMessage({ id, value: await methods[method](...args) });
  } catch (e) {
    // a bare number (a C++ exception pointer) or a wasm trap: the instance's state is unknown
    const trap = typeof WebAssembly !== 'undefined' && e instanceof WebAssembly.RuntimeError;
    const numeric = typeof e === 'number' || trap;
    const what = typeof e === 'number' ? `onnxruntime-web failed with bare code ${e}` : String(e?.stack ?? e);
    self.postMessage({ id, numeric, error: `${method}: ${what}` });
  }
};
