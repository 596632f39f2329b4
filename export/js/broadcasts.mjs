// Artifacts exported before device format 4 (the exporter did not measure shapes): where
// onnxruntime 1.19.2 built a broadcast gradient on a guess, and where that guess was wrong, as
// softmask_edge.session_graphs (guessed_broadcasts, wrong_broadcasts) in Python. The rule's
// constants are the device contract's `measured_shapes`.
import { CONTRACT } from './contract.mjs';
import { UnsupportedFormatError } from './errors.mjs';
import { graphInfo, withOutputs } from './formats.mjs';

const RULE = CONTRACT.measured_shapes;
const isParam = (d) => d !== null && typeof d === 'object';

/**
 * [{node, operands, axes}] of a training graph: nodes of the contract's broadcast ops with an
 * operand onnxruntime built a gradient for (the graph computes `<operand>_grad`), whose two
 * operands carry different symbolic dimensions at a right-aligned axis (-1 the last). The
 * gradient builder assumed those sizes equal and summed nothing there.
 */
export function guessedBroadcasts(training) {
  const { nodes, values } = graphInfo(training);
  const produced = new Set(nodes.flatMap((n) => n.outputs));
  const guessed = [];
  for (const node of nodes) {
    if (!RULE.broadcast_ops.includes(node.op) || node.inputs.length !== 2) continue;
    const operands = [0, 1].filter((k) => produced.has(node.inputs[k] + RULE.gradient_name_suffix));
    const [a, b] = node.inputs.map((i) => values.get(i)?.dims ?? null);
    if (!operands.length || !a || !b) continue;
    const axes = [];
    for (let k = 1; k <= Math.min(a.length, b.length); k += 1) {
      const [x, y] = [a[a.length - k], b[b.length - k]];
      if (isParam(x) && isParam(y) && x.param !== y.param) axes.push(-k);
    }
    if (axes.length) guessed.push({ node: node.name || node.outputs[0], operands, axes });
  }
  return guessed;
}

// TensorProto.DataType -> [onnxruntime-web type, typed array]
const TYPES = {
  1: ['float32', Float32Array], 2: ['uint8', Uint8Array], 3: ['int8', Int8Array], 4: ['uint16', Uint16Array],
  5: ['int16', Int16Array], 6: ['int32', Int32Array], 7: ['int64', BigInt64Array], 9: ['bool', Uint8Array],
  10: ['float16', Uint16Array], 11: ['float64', Float64Array], 12: ['uint32', Uint32Array], 13: ['uint64', BigUint64Array],
};

/**
 * Names of the `guessed` nodes whose guess was wrong: the eval graph runs (zeros as inputs)
 * with every symbolic input dimension at the contract's probe sizes; a node is wrong where, at
 * a guessed axis, an operand with a gradient has another size than the node's output. A node
 * the eval graph lacks counts as wrong.
 */
export async function wrongBroadcasts(ort, evaluation, guessed) {
  const info = graphInfo(evaluation);
  const nodes = new Map(info.nodes.filter((n) => n.name).map((n) => [n.name, n]));
  const unmatched = guessed.filter((g) => nodes.get(g.node)?.inputs.length !== 2).map((g) => g.node);
  const checks = guessed.filter((g) => !unmatched.includes(g.node));
  if (!checks.length) return unmatched;
  const names = [...new Set(checks.flatMap((g) => [...nodes.get(g.node).inputs, nodes.get(g.node).outputs[0]]))].sort();
  const outputs = new Set(info.outputs.map((o) => o.name));
  const model = withOutputs(evaluation, names.filter((n) => !outputs.has(n)));
  const user = info.inputs.filter((i) => !info.initializers.has(i.name));
  const symbols = [...new Set(user.flatMap((i) => (i.dims ?? []).map((d, axis) => (typeof d === 'number' ? null : d?.param || `${i.name}:${axis}`)).filter((s) => s !== null)))];
  if (symbols.length > RULE.probe_sizes[0].length) throw new Error(`${symbols.length} symbolic input dimensions; at most ${RULE.probe_sizes[0].length}`);
  const session = await ort.InferenceSession.create(model, { graphOptimizationLevel: 'disabled', logSeverityLevel: 3 });
  const runs = [];
  try {
    for (const sizes of RULE.probe_sizes) {
      const feeds = {};
      for (const i of user) {
        const dims = (i.dims ?? []).map((d, axis) => (typeof d === 'number' ? d : sizes[symbols.indexOf(d?.param || `${i.name}:${axis}`)]));
        const [type, Array_] = TYPES[i.elemType] ?? [];
        if (!type) throw new Error(`input ${i.name}: element type ${i.elemType}`);
        feeds[i.name] = new ort.Tensor(type, new Array_(dims.reduce((a, b) => a * b, 1)), dims);
      }
      const out = await session.run(feeds, names);
      runs.push(Object.fromEntries(names.map((n) => [n, out[n].dims])));
    }
  } finally {
    await session.release?.();
  }
  const size = (dims, k) => dims[dims.length + k];
  const wrong = checks.filter((g) => {
    const node = nodes.get(g.node);
    return runs.some((run) => g.operands.some((i) => g.axes.some((k) => size(run[node.inputs[i]], k) !== size(run[node.outputs[0]], k))));
  });
  return [...unmatched, ...wrong.map((g) => g.node)];
}

/**
 * UnsupportedFormatError for artifacts exported before format 4 whose training graph has a
 * broadcast gradient onnxruntime built on a wrong guess: their gradients are wrong at batch
 * >= 2 (BERT's position table was; onnxruntime-web traps or hangs there). Without `ort`, or
 * when the eval graph cannot run, every guess counts as wrong.
 */
export async function refuseWrongGradients(ort, manifest, training, evaluation) {
  if (manifest.format_version >= RULE.since) return;
  const guessed = guessedBroadcasts(training);
  if (!guessed.length) return;
  let wrong;
  try {
    wrong = ort ? await wrongBroadcasts(ort, evaluation, guessed) : guessed.map((g) => g.node);
  } catch {
    wrong = guessed.map((g) => g.node);
  }
  if (wrong.length) {
    throw new UnsupportedFormatError(
      `device format ${manifest.format_version} artifacts whose gradient graph onnxruntime built on a wrong ` +
        `broadcast guess (${wrong.length} node(s), e.g. ${wrong[0]}): their gradients are wrong at batch >= 2 ` +
        `(BERT's position embedding was); export the model again with this release (device format ${RULE.since}): ` +
        'export_for_device(model, example, directory)',
    );
  }
}
