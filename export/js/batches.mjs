// Batch checks: a batch is refused here, with a BatchError naming the input, before
// onnxruntime-web sees it (its refusal mid-pass is a bare number, fatal for the worker).
import { BatchError, EmptyDataError } from './errors.mjs';
import { TENSORS } from './manifest.mjs';

const ARRAY_TYPES = { float32: Float32Array, int64: BigInt64Array, int32: Int32Array, bool: Uint8Array };
const size = (shape) => shape.reduce((a, b) => a * b, 1);

/** `batches` must be a non-empty array of objects. */
export function checkBatchList(batches, what) {
  if (!Array.isArray(batches)) throw new BatchError(`${what}: batches must be an array, got ${batches === null ? 'null' : typeof batches}`);
  if (!batches.length) throw new EmptyDataError(`${what} got no batches`);
  batches.forEach((b, i) => {
    if (b === null || typeof b !== 'object') throw new BatchError(`${what}: batch ${i} is ${b === null ? 'null' : typeof b}, not {inputs, labels}`);
  });
}

/**
 * The feeds of one batch for head `head`: every declared input checked (array type, dims,
 * length, finite floats, ids inside the table they index), labels in [0, classes) unless
 * `crossHead` (SPG's cross-head term ignores labels).
 */
export function toFeeds(ort, manifest, indexBounds, batch, head, classes, { crossHead }) {
  const T = ort.Tensor;
  const feeds = {};
  let rowsInBatch = null;
  if (batch === null || typeof batch !== 'object') throw new BatchError(`a batch must be {inputs, labels}, got ${batch === null ? 'null' : typeof batch}`);
  for (const spec of manifest.inputs) {
    const x = batch.inputs?.[spec.name];
    if (!x) throw new BatchError(`batch inputs: missing ${spec.name}`);
    if (!(x.data instanceof ARRAY_TYPES[spec.dtype])) {
      throw new BatchError(`input ${spec.name}: ${x.data?.constructor?.name} data, the graph needs ${ARRAY_TYPES[spec.dtype]?.name} (${spec.dtype})`);
    }
    const dims = Array.from(x.dims ?? []);
    const fits = dims.length === spec.shape.length && dims.every((d, i) => Number.isInteger(d) && d >= 0 && (spec.shape[i] === null || spec.shape[i] === d));
    if (!fits) throw new BatchError(`input ${spec.name}: dims [${dims}] do not match [${spec.shape.map((d) => d ?? '?')}]`);
    if (x.data.length !== size(dims)) throw new BatchError(`input ${spec.name}: ${x.data.length} values for dims [${dims}]`);
    if (rowsInBatch !== null && dims[0] !== rowsInBatch) throw new BatchError(`inputs disagree on the batch size (${rowsInBatch} vs ${dims[0]})`);
    rowsInBatch = dims[0];
    if (x.data instanceof Float32Array && !x.data.every(Number.isFinite)) throw new BatchError(`input ${spec.name} holds NaN or Inf values`);
    const rows = indexBounds[spec.name];
    if (rows !== undefined && x.data.some((v) => v < 0 || v >= rows)) {
      throw new BatchError(`input ${spec.name} holds ids outside [0, ${rows}): the table it indexes has ${rows} rows`);
    }
    feeds[spec.name] = new T(spec.dtype, x.data, dims);
  }
  const labels = batch.labels;
  const n = labels?.length;
  if (n !== rowsInBatch) throw new BatchError(`${n} labels for a batch of ${rowsInBatch} rows`);
  // onnxruntime's mean cross-entropy divides by the batch size (a wasm trap)
  if (!n) throw new BatchError('a batch needs at least one row, got 0');
  const ids = new BigInt64Array(n);
  if (!crossHead) {
    for (let i = 0; i < n; i++) {
      const y = Number(labels[i]);
      if (!(Number.isInteger(y) && y >= 0 && y < classes)) throw new BatchError(`labels must lie in [0, ${classes}), got ${labels[i]}`);
      ids[i] = BigInt(y);
    }
  }
  feeds[TENSORS.labels_input] = new T('int64', ids, [n]);
  feeds[TENSORS.cross_head_input] = new T('float32', Float32Array.of(crossHead ? 1 : 0), []);
  if (manifest.task_mode === 'task_incremental') feeds[TENSORS.task_input] = new T('int64', BigInt64Array.of(BigInt(head)), []);
  return feeds;
}

/**
 * `feeds` re-keyed in the graph's input order: onnxruntime-web passes the feeds to the wasm
 * training API positionally, in the object's key order (the indices are dropped).
 */
export const ordered = (feeds, names) => Object.fromEntries(names.map((n) => [n, feeds[n]]));
