// Importance on the device: storage decoding (softmask_format.codec), the checks the Python
// learner applies to stored importance, and the update after a task (the raw-gradient pass
// per head, then the importance-update graph: γ = max_h |tanh(standardize(g_h))|, A <- max(A, γ)).
import { CONTRACT } from './contract.mjs';
import { ArtifactMismatchError, NonFiniteGradientError } from './errors.mjs';
import { TENSORS } from './manifest.mjs';

export const STORAGE = { float32: Float32Array, float16: Uint16Array, uint8: Uint8Array };
const UINT8 = CONTRACT.importance_dtypes.uint8;
const size = (shape) => shape.reduce((a, b) => a * b, 1);

/**
 * Stored importance -> float32, as softmask_format.codec.decode. uint8 (format 3): the keep
 * factor on a log grid, A = 1 - 2^(-c/16), code 255 = 1 (rounded once to float32, as numpy's
 * table); float16: its bit pattern in uint16.
 */
export function decodeImportance(stored, dtype) {
  if (dtype === 'float32') return Float32Array.from(stored);
  if (dtype === 'uint8') {
    return Float32Array.from(stored, (c) => (c === UINT8.zero_keep_code ? 1 : 1 - 2 ** (-c / UINT8.steps_per_octave)));
  }
  return Float32Array.from(stored, (b) => {
    const e = b >> 10;
    const m = b & 1023;
    return e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15);
  });
}

/** (name, data, storage dtype) entries: their type, and finite values in [0, 1]. */
function checkStored(entries) {
  for (const [name, data, stored] of entries) {
    if (!(data instanceof STORAGE[stored])) {
      throw new ArtifactMismatchError(`${name}: ${data?.constructor?.name}, the manifest's importance dtype stores ${stored}`);
    }
    if (!decodeImportance(data, stored).every((v) => Number.isFinite(v) && v >= 0 && v <= 1)) {
      throw new ArtifactMismatchError(`${name}: importance outside [0, 1] or not finite`);
    }
  }
}

/** The checkpoint's importance and ā as the Python learner checks them. */
export function checkImportance(manifest, state) {
  const dtype = manifest.importance_dtype;
  for (const n of manifest.masked) {
    const stored = state[n + TENSORS.importance_suffix];
    if (stored?.length !== size(manifest.params[n])) {
      throw new ArtifactMismatchError(`${n + TENSORS.importance_suffix}: ${stored?.length} values, the parameter has shape [${manifest.params[n]}]`);
    }
  }
  if (state[TENSORS.mean_importance]?.length !== 1) throw new ArtifactMismatchError(`${TENSORS.mean_importance} must hold one value`);
  checkStored([
    ...manifest.masked.map((n) => [n + TENSORS.importance_suffix, state[n + TENSORS.importance_suffix], dtype]),
    [TENSORS.mean_importance, state[TENSORS.mean_importance], 'float32'],
  ]);
}

/** The history holds exactly task.{k}.{P} for k < num_tasks, shaped like P (checkpoint.load_history). */
export function checkHistory(manifest, history) {
  const wanted = new Map();
  for (let k = 0; k < manifest.num_tasks; k++) for (const n of manifest.masked) wanted.set(`task.${k}.${n}`, manifest.params[n]);
  const problems = [...wanted.keys()].filter((k) => !(k in history)).sort().map((k) => `missing '${k}'`);
  problems.push(...Object.keys(history).filter((k) => !wanted.has(k)).sort().map((k) => `unexpected '${k}'`));
  for (const [k, shape] of wanted) {
    if (k in history && history[k].shape.join() !== shape.join()) problems.push(`${k}: shape [${history[k].shape}] != [${shape}]`);
  }
  if (problems.length) {
    throw new ArtifactMismatchError(`importance history ${manifest.history} does not fit the manifest: ${problems.slice(0, 10).join('; ')}`);
  }
  checkStored(Object.entries(history).map(([k, v]) => [k, v.data, manifest.importance_dtype]));
}

/**
 * Task t's importance: gradient sums per head (raw-gradient session, s = 0), then the update
 * graph. Returns {stored: {P: A'}, task: {P: γ (storage dtype)}, mean: ā'}.
 */
export async function measureImportance(ort, graph, manifest, state, session, feedsFor, heads) {
  const masked = manifest.masked;
  const sums = Object.fromEntries(masked.map((n) => [n, []]));
  for (const h of heads) {
    await session.lazyResetGrad();
    let out = null;
    for (const feeds of feedsFor(h)) out = await session.runTrainStep(feeds);
    for (const n of masked) sums[n].push(Float32Array.from(out[n + TENSORS.gradient_suffix].data));
  }
  const bad = masked.filter((n) => sums[n].some((g) => g.some((v) => !Number.isFinite(v))));
  if (bad.length) throw new NonFiniteGradientError(`importance: NaN/Inf gradients in ${bad.slice(0, 10).join(', ')}`);
  const dtype = manifest.importance_dtype;
  const ortType = CONTRACT.importance_dtypes[dtype].checkpoint;
  const feeds = {};
  for (const n of masked) {
    const shape = manifest.params[n];
    const stacked = new Float32Array(heads.length * size(shape));
    sums[n].forEach((g, i) => stacked.set(g, i * g.length));
    feeds[`${n}.grads`] = new ort.Tensor('float32', stacked, [heads.length, ...shape]);
    feeds[n + TENSORS.importance_suffix] = new ort.Tensor(ortType, state[n + TENSORS.importance_suffix], shape);
  }
  const update = await ort.InferenceSession.create(graph, { logSeverityLevel: 3 });
  let out;
  try {
    out = await update.run(feeds);
  } finally {
    await update.release();
  }
  const Stored = STORAGE[dtype];
  const stored = {};
  const task = {};
  for (const n of masked) {
    stored[n] = Stored.from(out[`${n}${TENSORS.importance_suffix}.updated`].data);
    task[n] = Stored.from(out[`${n}.task_importance`].data);
  }
  return { stored, task, mean: Float32Array.from(out[`${TENSORS.mean_importance}.updated`].data) };
}
