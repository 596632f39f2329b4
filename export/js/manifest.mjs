// The artifacts manifest, checked as the Python learner checks it (softmask_edge.manifest):
// the same schema (device_contract.json, through contract.mjs), the same cross-field rules,
// and sizes that must fit the files' bytes. Every refusal is an EdgeError subclass.
import { CONTRACT } from './contract.mjs';
import { ArtifactMismatchError, CorruptArtifactError, UnsupportedFormatError } from './errors.mjs';

const { files: FILES, limits: LIMITS, tensors: TENSORS, manifest: FIELDS } = CONTRACT;
export const FORMAT_VERSION = CONTRACT.format_version;
// format 1 lacks what onnxruntime-web needs (parameter_order, the lr in the optimizer graph)
export const READABLE_FORMATS = CONTRACT.readable_format_versions.filter((v) => v >= 2);
export const STATIC_FILES = [FILES.training_model, FILES.eval_model, FILES.optimizer_model, FILES.importance_model];
export { TENSORS };
const PLAIN = new RegExp(FILES.plain_name_pattern);
const HEX = /^[0-9a-f]*$/;

const generationFile = (prefix, generation, suffix = '') =>
  `${prefix}${String(generation).padStart(FILES.generation_digits, '0')}${suffix}`;
export const checkpointName = (generation) => generationFile(FILES.checkpoint_prefix, generation);
export const historyName = (generation) => generationFile(FILES.history_prefix, generation, FILES.history_suffix);

export const isPlainName = (v) => typeof v === 'string' && PLAIN.test(v) && v !== '.' && v !== '..';
const isInt = (v, low, high) => Number.isSafeInteger(v) && v >= low && v <= high;
const isHex = (v, length) => typeof v === 'string' && v.length === length && HEX.test(v);
const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const isStrList = (v) => Array.isArray(v) && v.every((x) => typeof x === 'string');
const isShape = (v, dynamic = false) =>
  Array.isArray(v) && v.length <= LIMITS.max_rank && v.every((d) => (dynamic && d === null) || isInt(d, 0, LIMITS.max_dim));
const isInput = (v) =>
  isObject(v) &&
  Object.keys(v).sort().join() === 'dtype,name,shape' &&
  typeof v.name === 'string' &&
  CONTRACT.input_dtypes.includes(v.dtype) &&
  isShape(v.shape, true);

const CHECKS = {
  int: (v, s) => isInt(v, s.min, s.max),
  int_list: (v, s) => Array.isArray(v) && v.every((x) => isInt(x, s.min, s.max)),
  number: (v, s) => typeof v === 'number' && Number.isFinite(v) && v >= s.min,
  bool: (v) => typeof v === 'boolean',
  enum: (v, s) => typeof v === 'string' && s.values.includes(v),
  hex: (v, s) => isHex(v, s.length),
  plain_name: isPlainName,
  str_list: isStrList,
  str_map: (v) => isObject(v) && Object.values(v).every((x) => typeof x === 'string'),
  hex_map: (v, s) => isObject(v) && Object.entries(v).every(([k, h]) => isPlainName(k) && isHex(h, s.length)),
  shape_map: (v) => isObject(v) && Object.values(v).every((s) => isShape(s)),
  inputs: (v) => Array.isArray(v) && v.length > 0 && v.every(isInput),
};
const isEmpty = (v) => v === '' || v === 0 || (Array.isArray(v) && !v.length) || (isObject(v) && !Object.keys(v).length);
const has = (o, k) => Object.prototype.hasOwnProperty.call(o, k);
const repr = (v) => JSON.stringify(v);

/** Type and range problems of a raw manifest (softmask_format.contract.manifest_problems). */
export function manifestProblems(raw) {
  const version = raw.format_version;
  const problems = Object.entries(FIELDS).filter(([k, s]) => s.required && !has(raw, k)).map(([k]) => `missing '${k}'`);
  problems.push(...Object.keys(raw).filter((k) => !has(FIELDS, k)).sort().map((k) => `unknown field '${k}'`));
  for (const [key, spec] of Object.entries(FIELDS)) {
    if (!has(raw, key) || CHECKS[spec.type](raw[key], spec)) continue;
    if (Number.isInteger(version) && version < (spec.since ?? 0) && isEmpty(raw[key])) continue;
    let detail = '';
    if (spec.type === 'plain_name') detail = `: the manifest names ${repr(raw[key])}: only plain file names inside the artifacts folder`;
    else if (spec.type === 'enum') detail = `: ${repr(raw[key])} not in ${repr(spec.values)}`;
    problems.push(`bad '${key}'${detail}`);
  }
  return problems;
}

/** Cross-field rules of softmask_edge.manifest.Manifest._check_values. */
function valueProblems(m) {
  const problems = [];
  const params = new Set(Object.keys(m.params));
  const stored = new Set([...m.masked.map((n) => n + TENSORS.importance_suffix), TENSORS.mean_importance]);
  const order = m.parameter_order ?? [];
  const unknown = [...new Set([...m.masked, ...m.heads])].filter((n) => !params.has(n)).sort();
  unknown.push(...[...new Set(order)].filter((n) => !params.has(n) && !stored.has(n)).sort());
  if (unknown.length) problems.push(`names without a parameter: ${repr(unknown.slice(0, 5))}`);
  if (new Set(m.masked).size !== m.masked.length || m.masked.some((n) => m.heads.includes(n))) {
    problems.push('masked and heads must be distinct names');
  }
  if (m.format_version >= 2 && !(order.length && m.learning_rate > 0)) {
    problems.push('format >= 2 needs parameter_order and a positive learning_rate');
  }
  const hashed = Object.keys(m.graphs_sha256 ?? {}).sort();
  if (m.format_version >= 3 && (m.export_id ?? '').length !== 32) problems.push('format 3 needs a 32-hex-digit export_id');
  if ((m.format_version >= 3 || hashed.length) && hashed.join() !== [...STATIC_FILES].sort().join()) {
    problems.push(`graphs_sha256 must cover exactly ${repr(STATIC_FILES)}`);
  }
  if (!m.head_classes.length) problems.push('head_classes is empty');
  if (m.task_mode === 'task_incremental' && m.num_tasks > m.head_classes.length) {
    problems.push(`num_tasks ${m.num_tasks} exceeds the ${m.head_classes.length} declared heads`);
  }
  const names = m.task_names ?? [];
  if (names.length > m.num_tasks + 1) problems.push(`${names.length} task_names for ${m.num_tasks} task(s)`);
  if (m.checkpoint !== checkpointName(m.generation) || m.history !== historyName(m.generation)) {
    problems.push(`generation ${m.generation} must name ${checkpointName(m.generation)} and ${historyName(m.generation)}`);
  }
  return problems;
}

/**
 * The checked manifest of `bytes` (manifest.json): JSON of at most max_manifest_bytes, a
 * readable format, the schema, the cross-field rules. Defaults of fields a format predates
 * are filled in, so the learner reads one shape.
 */
export function parseManifest(bytes) {
  if (!(bytes instanceof Uint8Array)) throw new CorruptArtifactError(`${FILES.manifest}: expected bytes, got ${typeof bytes}`);
  if (bytes.length > LIMITS.max_manifest_bytes) {
    throw new CorruptArtifactError(`${FILES.manifest} is larger than ${LIMITS.max_manifest_bytes} bytes`);
  }
  let raw;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (e) {
    throw new CorruptArtifactError(`cannot parse ${FILES.manifest}: ${e.name}: ${e.message}`);
  }
  if (!isObject(raw)) throw new CorruptArtifactError(`${FILES.manifest}: expected a JSON object`);
  const version = raw.format_version;
  if (!READABLE_FORMATS.includes(version)) {
    throw new UnsupportedFormatError(
      `manifest format_version ${repr(version)} is not supported by the JS learner (it reads ` +
        `${READABLE_FORMATS.join(', ')}); re-export with this release's export_for_device`,
    );
  }
  const schema = manifestProblems(raw);
  if (schema.length) throw new CorruptArtifactError(`${FILES.manifest}: malformed manifest: ${schema.slice(0, 10).join('; ')}`);
  const manifest = { task_names: [], parameter_order: [], learning_rate: 0, heads_scaled: true, export_id: '', graphs_sha256: {}, ...raw };
  const values = valueProblems(manifest);
  if (values.length) throw new CorruptArtifactError(`${FILES.manifest}: ${values.join('; ')}`);
  if (manifest.importance_dtype === 'uint8' && version < CONTRACT.log_uint8_since) {
    throw new UnsupportedFormatError(
      `manifest format_version ${version} stores uint8 importance on the old linear code; re-export with this release's export_for_device`,
    );
  }
  return manifest;
}

const numel = (shape) => shape.reduce((a, b) => a * b, 1);

/** Shapes and the task count may only claim what the files' bytes can hold. */
export function checkSizes(manifest, checkpointBytes, historyBytes) {
  const itemsize = CONTRACT.importance_dtypes[manifest.importance_dtype].bytes;
  const weights = Object.values(manifest.params).reduce((a, s) => a + numel(s), 0);
  const masked = manifest.masked.reduce((a, n) => a + numel(manifest.params[n]), 0);
  if (4 * weights + itemsize * masked > checkpointBytes) {
    throw new ArtifactMismatchError(
      `the parameter shapes claim ${4 * weights + itemsize * masked} bytes, more than ${manifest.checkpoint} holds (${checkpointBytes})`,
    );
  }
  if (manifest.num_tasks * itemsize * masked > historyBytes) {
    throw new ArtifactMismatchError(
      `${manifest.num_tasks} task(s) of importance need more bytes than ${manifest.history} holds (${historyBytes})`,
    );
  }
}

/** The manifest as Python writes it: keys sorted, two-space indent, a final newline. */
export function manifestBytes(manifest) {
  const sort = (v) => {
    if (Array.isArray(v)) return v.map(sort);
    if (isObject(v)) return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sort(v[k])]));
    return v;
  };
  return new TextEncoder().encode(`${JSON.stringify(sort(manifest), null, 2)}\n`);
}
