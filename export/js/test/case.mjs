// What the test pages share: the case folder named by ?case= (artifacts/ and data.json), its
// batches as the learner takes them, and a worker learner with the pinned onnxruntime-web.
import { WorkerLearner } from '../client.mjs';

const here = new URL('.', import.meta.url);
const dist = new URL('../node_modules/onnxruntime-web/dist/', here).href;

/** data.json batches [{x, dims, y}] -> learner batches on the single input `spec.input`. */
export const learnerBatches = (spec, list) =>
  list.map((b) => ({ inputs: { [spec.input]: { data: Float32Array.from(b.x), dims: b.dims } }, labels: b.y }));

/** {spec, batches, artifacts (URL), learner (not loaded yet)} of the page's case. */
export async function openCase() {
  const folder = new URL(new URLSearchParams(location.search).get('case'), location.href);
  const spec = await (await fetch(new URL('data.json', folder))).json();
  const learner = new WorkerLearner({ workerUrl: new URL('../worker.mjs', here), ortUrl: `${dist}ort.training.wasm.min.mjs`, wasmPaths: dist });
  return { spec, batches: learnerBatches(spec, spec.batches), artifacts: new URL('artifacts/', folder).href, learner };
}
