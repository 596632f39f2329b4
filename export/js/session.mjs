// Training sessions on the learner's state: one per (task, lr, scale, gradient outputs), built
// from the checkpoint patched with the state, the graphs specialized (s, A and ā folded in as
// constants, as the Python learner's graphs.specialize) and the lr written into the optimizer
// graph (onnxruntime-web cannot set it).
import { ArtifactMismatchError } from './errors.mjs';
import { patchCheckpoint, setScalarInitializer, specializeGraph } from './formats.mjs';
import { STATIC_FILES, TENSORS } from './manifest.mjs';

const [TRAINING, EVAL, OPTIMIZER] = STATIC_FILES;
const size = (shape) => shape.reduce((a, b) => a * b, 1);

export class Sessions {
  /** @param learner {ort, manifest, graphs, checkpoint, state} (read at every open) */
  constructor(learner) {
    this.learner = learner;
    this.session = null;
    this.key = null;
  }

  /** The graphs of a session that trains with scale `scale` (gradient outputs only if asked). */
  graphsFor(scale, gradients) {
    const { manifest, graphs, state } = this.learner;
    const constants = { [TENSORS.scale_input]: { data: Float32Array.of(scale), dims: [] } };
    constants[TENSORS.mean_importance] = { data: state[TENSORS.mean_importance], dims: [1] };
    for (const n of manifest.masked) {
      constants[n + TENSORS.importance_suffix] = { data: state[n + TENSORS.importance_suffix], dims: manifest.params[n] };
    }
    const dropOutputs = (name) => !gradients && name.endsWith(TENSORS.gradient_suffix);
    const train = specializeGraph(graphs[TRAINING], { constants, dropOutputs });
    const missing = Object.keys(constants).filter((n) => !train.folded.includes(n));
    if (missing.length) throw new ArtifactMismatchError(`the training graph does not take ${missing.join(', ')}: it does not fit its checkpoint`);
    // the eval graph declares A and ā without reading them; onnxruntime feeds it the
    // parameters the training graph takes, so they go
    const evaluation = specializeGraph(graphs[EVAL], { unused: Object.keys(constants) });
    return { trainModel: train.model, evalModel: evaluation.model };
  }

  /** A training session on the current state; the optimizer graph carries `lr`. */
  async open(task, lr, { scale = 1, gradients = false } = {}) {
    const key = JSON.stringify([task, lr, scale, gradients]);
    if (this.session && this.key === key) return this.session;
    await this.close();
    const { ort, manifest, graphs, checkpoint, state } = this.learner;
    const optimizer = setScalarInitializer(graphs[OPTIMIZER], TENSORS.learning_rate_initializer, lr ?? manifest.learning_rate);
    this.session = await ort.TrainingSession.create(
      { checkpointState: patchCheckpoint(checkpoint, state), ...this.graphsFor(scale, gradients), optimizerModel: optimizer },
      // errors only: onnxruntime warns on every optimizer step that the SGD flag has shape
      // [1] where the graph declares rank 0 (the declaration createTrainingSession accepts);
      // that console line made a 9 k-parameter MLP's step 2.1 ms instead of 0.65 ms
      { logSeverityLevel: 3 },
    );
    this.key = key;
    return this.session;
  }

  async close() {
    const session = this.session;
    this.session = null;
    this.key = null;
    if (session) await session.release();
  }

  /** The trained weights out of the session's flat buffer (training-graph parameter order). */
  async syncWeights() {
    const { manifest, state } = this.learner;
    const flat = (await this.session.getContiguousParameters(true)).data;
    let at = 0;
    for (const n of manifest.parameter_order.filter((p) => p in manifest.params)) {
      const count = size(manifest.params[n]);
      state[n] = Float32Array.from(flat.subarray(at, at + count));
      at += count;
    }
    if (at !== flat.length) throw new ArtifactMismatchError(`flat parameter buffer holds ${flat.length} values, the manifest ${at}`);
  }
}
