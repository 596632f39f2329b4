// What the test pages share: the case folder named by ?case= (artifacts/ and data.json), its
// batches as the learner takes them, and a worker learner with the pinned onnxruntime-web.
import { WorkerLearner } from '../client.mjs';

const here = new URL('.', import.meta.url);
const dist = new URL('../node_modules/onnxruntime-web/dist/', here).href;

const ARRAYS = { float32: Float32Array, int32: Int32Array, int64: BigInt64Array, bool: Uint8Array };
const typed = ({ data, dims, dtype }) => ({
  data: dtype === 'int64' ? BigInt64Array.from(data, BigInt) : ARRAYS[dtype].from(data),
  dims,
});

/** data.json batches -> learner batches: [{x, dims, y}] on the single float input
 * `spec.input`, or [{inputs: {name: {data, dims, dtype}}, y}]. */
export const learnerBatches = (spec, list) =>
  list.map((b) => ({
    inputs: b.inputs
      ? Object.fromEntries(Object.entries(b.inputs).map(([k, v]) => [k, typed(v)]))
      : { [spec.input]: { data: Float32Array.from(b.x), dims: b.dims } },
    labels: b.y,
  }));

/** {spec, batches, artifacts (URL), learner (not loaded yet)} of the page's case. */
export async function openCase() {
  const folder = new URL(new URLSearchParams(location.search).get('case'), location.href);
  const spec = await (await fetch(new URL('data.json', folder))).json();
  const learner = new WorkerLearner({ workerUrl: new URL('../worker.mjs', here), ortUrl: `${dist}ort.training.wasm.min.mjs`, wasmPaths: dist });
  return { spec, batches: learnerBatches(spec, spec.batches), artifacts: new URL('artifacts/', folder).href, learner };
}
