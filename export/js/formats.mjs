// The file formats the browser learner reads and writes, without a protobuf, flatbuffer or
// zip library: ORT checkpoints (flatbuffer, patched in place), the optimizer graph's recorded
// learning rate (protobuf, patched in place), graph inputs turned into constants (protobuf,
// rewritten), .npz importance histories, SHA-256.

const TEXT = new TextDecoder();

// --- ORT checkpoint (onnxruntime/core/flatbuffers/schema/ort_training_checkpoint.fbs) ------
// Checkpoint { version, module_state, optimizer_groups, property_bag }
// ModuleState { requires_grad_params: [Tensor], frozen_params: [Tensor], ... }
// Tensor { name, doc_string, dims: [int64], data_type, raw_data: [uint8], ... }
const CHECKPOINT = { moduleState: 1 };
const MODULE_STATE = { trainable: 0, frozen: 1 };
const TENSOR = { name: 0, dims: 2, dataType: 3, rawData: 4 };

function fbField(view, table, slot) {
  const vtable = table - view.getInt32(table, true);
  const vtableSize = view.getUint16(vtable, true);
  const at = 4 + 2 * slot;
  if (at >= vtableSize) return 0;
  const offset = view.getUint16(vtable + at, true);
  return offset ? table + offset : 0;
}

function fbDeref(view, position) {
  return position + view.getUint32(position, true);
}

function fbVector(view, table, slot) {
  const field = fbField(view, table, slot);
  if (!field) return { start: 0, length: 0 };
  const vector = fbDeref(view, field);
  return { start: vector + 4, length: view.getUint32(vector, true) };
}

/** name -> {dims, dataType, offset, byteLength, trainable} of every tensor in a checkpoint. */
export function checkpointTensors(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (TEXT.decode(bytes.subarray(4, 8)) !== 'ODTC') {
    throw new Error('not an ONNX Runtime training checkpoint (file identifier ODTC missing)');
  }
  const root = fbDeref(view, 0);
  const moduleField = fbField(view, root, CHECKPOINT.moduleState);
  if (!moduleField) throw new Error('the checkpoint has no module state');
  const moduleState = fbDeref(view, moduleField);
  const out = new Map();
  for (const [kind, slot] of Object.entries(MODULE_STATE)) {
    const { start, length } = fbVector(view, moduleState, slot);
    for (let i = 0; i < length; i++) {
      const tensor = fbDeref(view, start + 4 * i);
      const nameField = fbDeref(view, fbField(view, tensor, TENSOR.name));
      const nameLength = view.getUint32(nameField, true);
      const name = TEXT.decode(bytes.subarray(nameField + 4, nameField + 4 + nameLength));
      const dimsVector = fbVector(view, tensor, TENSOR.dims);
      const dims = [];
      for (let d = 0; d < dimsVector.length; d++) {
        dims.push(Number(view.getBigInt64(dimsVector.start + 8 * d, true)));
      }
      const typeField = fbField(view, tensor, TENSOR.dataType);
      const raw = fbVector(view, tensor, TENSOR.rawData);
      out.set(name, {
        dims,
        dataType: typeField ? view.getInt32(typeField, true) : 0,
        offset: bytes.byteOffset + raw.start,
        byteLength: raw.length,
        trainable: kind === 'trainable',
      });
    }
  }
  return out;
}

/** A copy of `bytes` whose tensors named in `values` (typed arrays) are overwritten. */
export function patchCheckpoint(bytes, values) {
  const copy = new Uint8Array(bytes);
  const tensors = checkpointTensors(copy);
  for (const [name, value] of Object.entries(values)) {
    const tensor = tensors.get(name);
    if (!tensor) throw new Error(`the checkpoint has no tensor ${JSON.stringify(name)}`);
    const raw = new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
    if (raw.byteLength !== tensor.byteLength) {
      throw new Error(`${name}: ${raw.byteLength} bytes given, the checkpoint holds ${tensor.byteLength}`);
    }
    copy.set(raw, tensor.offset - copy.byteOffset);
  }
  return copy;
}

const CHECKPOINT_TYPES = { 1: Float32Array, 2: Uint8Array, 4: Uint16Array, 7: BigInt64Array };

/** The tensor `name` of a checkpoint as a typed array (a copy). */
export function checkpointValue(bytes, tensors, name) {
  const t = tensors.get(name);
  const Type = CHECKPOINT_TYPES[t.dataType];
  if (!Type) throw new Error(`${name}: unsupported checkpoint data type ${t.dataType}`);
  const copy = bytes.slice(t.offset - bytes.byteOffset, t.offset - bytes.byteOffset + t.byteLength);
  return new Type(copy.buffer);
}

// --- protobuf: the optimizer graph's learning-rate initializer --------------------------
function readVarint(bytes, pos) {
  let value = 0;
  let shift = 0;
  for (;;) {
    if (pos >= bytes.length || shift > 63) throw new Error('truncated or overlong protobuf varint');
    const b = bytes[pos++];
    value += (b & 0x7f) * 2 ** shift;
    if (b < 0x80) return [value, pos];
    shift += 7;
  }
}

/** {field, wire, at, start, end} of each field of one message (`at`: its key, `start`: its value). */
function* fields(bytes, begin, finish) {
  let pos = begin;
  while (pos < finish) {
    const at = pos;
    let key;
    [key, pos] = readVarint(bytes, pos);
    const wire = key % 8;
    const field = Math.floor(key / 8);
    let start = pos;
    if (wire === 0) [, pos] = readVarint(bytes, pos);
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      let length;
      [length, start] = readVarint(bytes, pos);
      pos = start + length;
    } else throw new Error(`unsupported protobuf wire type ${wire}`);
    if (pos > finish) throw new Error('truncated protobuf message');
    yield { field, wire, at, start, end: pos };
  }
}

/** [fieldNumber, start, end] of each length-delimited field of one message. */
function* lengthDelimited(bytes, start, end) {
  for (const f of fields(bytes, start, end)) if (f.wire === 2) yield [f.field, f.start, f.end];
}

function varint(value) {
  const out = [];
  let v = value;
  while (v >= 0x80) {
    out.push((v % 0x80) | 0x80);
    v = Math.floor(v / 0x80);
  }
  out.push(v);
  return Uint8Array.from(out);
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

const ENCODER = new TextEncoder();
const delimited = (field, bytes) => concat([varint(field * 8 + 2), varint(bytes.length), bytes]);
// TensorProto.DataType of the typed arrays constants are given as
const ONNX_TYPES = [[Float32Array, 1], [Uint8Array, 2], [Uint16Array, 4]];

/** TensorProto {dims = 1, data_type = 2, name = 8, raw_data = 9} (little-endian raw data). */
function tensorProto(name, { data, dims }) {
  const type = ONNX_TYPES.find(([Type]) => data instanceof Type);
  if (!type) throw new Error(`${name}: no ONNX type for ${data.constructor.name}`);
  if (data.length !== dims.reduce((a, b) => a * b, 1)) throw new Error(`${name}: ${data.length} values for dims ${dims}`);
  return concat([
    ...dims.map((d) => concat([varint(1 * 8), varint(d)])),
    varint(2 * 8), varint(type[1]),
    delimited(8, ENCODER.encode(name)),
    delimited(9, new Uint8Array(data.buffer, data.byteOffset, data.byteLength)),
  ]);
}

function valueName(bytes, start, end) {
  for (const [f, s, e] of lengthDelimited(bytes, start, end)) if (f === 1) return TEXT.decode(bytes.subarray(s, e));
  return '';
}

// ModelProto.graph = 7; GraphProto.initializer = 5, .input = 11, .output = 12; ValueInfoProto.name = 1
/**
 * A copy of an ONNX model, as softmask_edge.graphs.specialize: graph inputs named in
 * `constants` ({name: {data, dims}}) become initializers (onnxruntime folds what only depends
 * on them once, when it creates the session), inputs named in `unused` are dropped, and
 * outputs for which `dropOutputs(name)` holds are removed. Returns {model, folded}: the
 * constants that were inputs (the others are left out).
 */
export function specializeGraph(model, { constants = {}, unused = [], dropOutputs = () => false } = {}) {
  const folded = [];
  const out = rewriteGraph(model, (graphFields) => {
    const graph = [];
    for (const g of graphFields) {
      const name = g.wire === 2 && (g.field === 11 || g.field === 12) ? valueName(model, g.start, g.end) : null;
      if (g.field === 11 && Object.hasOwn(constants, name)) folded.push(name);
      else if (!((g.field === 11 && unused.includes(name)) || (g.field === 12 && dropOutputs(name)))) {
        graph.push(model.subarray(g.at, g.end));
      }
    }
    for (const name of folded) graph.push(delimited(5, tensorProto(name, constants[name])));
    return graph;
  });
  return { model: out, folded };
}

/** A copy of `model` whose GraphProto (field 7) is the concatenation of `edit(its fields)`. */
function rewriteGraph(model, edit) {
  const parts = [];
  for (const f of fields(model, 0, model.length)) {
    if (f.field === 7 && f.wire === 2) parts.push(delimited(7, concat(edit(fields(model, f.start, f.end)))));
    else parts.push(model.subarray(f.at, f.end));
  }
  return concat(parts);
}

// GraphProto.node = 1; NodeProto.input = 1, .op_type = 4, .attribute = 5;
// AttributeProto.name = 1, .i = 3; TensorProto.dims = 1 (plain or packed varints)
function strings(bytes, start, end, field) {
  return [...lengthDelimited(bytes, start, end)].filter(([f]) => f === field).map(([, s, e]) => TEXT.decode(bytes.subarray(s, e)));
}

function firstDim(bytes, start, end) {
  for (const f of fields(bytes, start, end)) {
    if (f.field === 1) return readVarint(bytes, f.start)[0]; // packed: the run's first value
  }
  return undefined;
}

/**
 * {input: rows} of the smallest table a Gather indexes with each of `inputs` directly, as
 * softmask_edge.graphs.index_bounds (`shapes`: the parameters' shapes; frozen tables are
 * initializers). Token ids outside [0, rows) are refused before the first step.
 */
export function indexBounds(model, inputs, shapes) {
  const rows = new Map(Object.entries(shapes).map(([n, shape]) => [n, shape[0]]));
  const gathers = [];
  for (const f of fields(model, 0, model.length)) {
    if (f.field !== 7 || f.wire !== 2) continue;
    for (const g of fields(model, f.start, f.end)) {
      if (g.wire !== 2) continue;
      if (g.field === 5) {
        const [name] = strings(model, g.start, g.end, 8);
        rows.set(name, firstDim(model, g.start, g.end));
      } else if (g.field === 1 && strings(model, g.start, g.end, 4)[0] === 'Gather') {
        let axis = 0;
        for (const [a, as, ae] of lengthDelimited(model, g.start, g.end)) {
          if (a !== 5 || strings(model, as, ae, 1)[0] !== 'axis') continue;
          for (const v of fields(model, as, ae)) if (v.field === 3) axis = readVarint(model, v.start)[0];
        }
        if (axis === 0) gathers.push(strings(model, g.start, g.end, 1));
      }
    }
  }
  const bounds = {};
  for (const [table, index] of gathers) {
    const n = rows.get(table);
    if (inputs.includes(index) && n !== undefined) bounds[index] = Math.min(bounds[index] ?? n, n);
  }
  return bounds;
}

// GraphProto.input = 11, .output = 12, .value_info = 13; ValueInfoProto.name = 1, .type = 2;
// TypeProto.tensor_type = 1; TypeProto.Tensor.elem_type = 1, .shape = 2; TensorShapeProto.dim = 1;
// Dimension.dim_value = 1 (varint), .dim_param = 2; NodeProto.output = 2, .name = 3
/** {elemType, dims} of a ValueInfoProto: dims null without a shape, else numbers, {param} or null. */
function valueType(bytes, start, end) {
  const out = { elemType: 0, dims: null };
  for (const [t, ts, te] of lengthDelimited(bytes, start, end)) {
    if (t !== 2) continue;
    for (const [tt, tts, tte] of lengthDelimited(bytes, ts, te)) {
      if (tt !== 1) continue;
      for (const f of fields(bytes, tts, tte)) {
        if (f.field === 1 && f.wire === 0) out.elemType = readVarint(bytes, f.start)[0];
        if (f.field !== 2 || f.wire !== 2) continue;
        out.dims = [];
        for (const [d, ds, de] of lengthDelimited(bytes, f.start, f.end)) {
          if (d !== 1) continue;
          let dim = null;
          for (const x of fields(bytes, ds, de)) {
            if (x.field === 1 && x.wire === 0) dim = readVarint(bytes, x.start)[0];
            else if (x.field === 2 && x.wire === 2) dim = { param: TEXT.decode(bytes.subarray(x.start, x.end)) };
          }
          out.dims.push(dim);
        }
      }
    }
  }
  return out;
}

/**
 * What a graph declares: nodes [{name, op, inputs, outputs}] in order, inputs and outputs
 * [{name, elemType, dims}], initializer names, and the recorded type of every named value.
 */
export function graphInfo(model) {
  const info = { nodes: [], inputs: [], outputs: [], initializers: new Set(), values: new Map() };
  for (const f of fields(model, 0, model.length)) {
    if (f.field !== 7 || f.wire !== 2) continue;
    for (const g of fields(model, f.start, f.end)) {
      if (g.wire !== 2) continue;
      if (g.field === 11 || g.field === 12 || g.field === 13) {
        const value = { name: valueName(model, g.start, g.end), ...valueType(model, g.start, g.end) };
        info.values.set(value.name, value);
        if (g.field === 11) info.inputs.push(value);
        if (g.field === 12) info.outputs.push(value);
      } else if (g.field === 5) {
        info.initializers.add(strings(model, g.start, g.end, 8)[0]);
      } else if (g.field === 1) {
        info.nodes.push({
          inputs: strings(model, g.start, g.end, 1),
          outputs: strings(model, g.start, g.end, 2),
          name: strings(model, g.start, g.end, 3)[0] ?? '',
          op: strings(model, g.start, g.end, 4)[0],
        });
      }
    }
  }
  return info;
}

/** A copy of an ONNX model without value_info and with `names` as extra graph outputs. */
export function withOutputs(model, names) {
  return rewriteGraph(model, (graphFields) => [
    ...[...graphFields].filter((g) => !(g.wire === 2 && g.field === 13)).map((g) => model.subarray(g.at, g.end)),
    ...names.map((name) => delimited(12, delimited(1, ENCODER.encode(name)))),
  ]);
}

// ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8, .raw_data = 9
/** A copy of an ONNX model whose float32 initializer `name` (one element) holds `value`. */
export function setScalarInitializer(model, name, value) {
  const copy = new Uint8Array(model);
  for (const [f, gs, ge] of lengthDelimited(copy, 0, copy.length)) {
    if (f !== 7) continue;
    for (const [g, is, ie] of lengthDelimited(copy, gs, ge)) {
      if (g !== 5) continue;
      let found = false;
      let raw = null;
      for (const [t, ts, te] of lengthDelimited(copy, is, ie)) {
        if (t === 8) found = TEXT.decode(copy.subarray(ts, te)) === name;
        if (t === 9) raw = [ts, te];
      }
      if (found) {
        if (!raw || raw[1] - raw[0] !== 4) throw new Error(`${name} is not one raw float32`);
        new DataView(copy.buffer, raw[0], 4).setFloat32(0, value, true);
        return copy;
      }
    }
  }
  throw new Error(`the model has no initializer ${JSON.stringify(name)}`);
}

// --- .npz (uncompressed zip of .npy files; numpy writes zip64 extras) -------------------
const NPY_TYPES = { '<f4': Float32Array, '|u1': Uint8Array, '<u2': Uint16Array };

function parseNpy(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = TEXT.decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  if (/'fortran_order':\s*True/.test(header)) throw new Error('fortran-ordered .npy');
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(',').filter((s) => s.trim()).map(Number);
  const Type = NPY_TYPES[descr];
  if (!Type) throw new Error(`unsupported .npy dtype ${descr}`);
  const data = bytes.slice(start + headerLength);
  return { data: new Type(data.buffer, 0, data.byteLength / Type.BYTES_PER_ELEMENT), shape };
}

/** {key: {data, shape}} of an uncompressed .npz file. */
export function readNpz(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let eocd = bytes.length - 22;
  while (eocd >= 0 && view.getUint32(eocd, true) !== 0x06054b50) eocd--;
  if (eocd < 0) throw new Error('not a zip file');
  let count = view.getUint16(eocd + 10, true);
  let pos = view.getUint32(eocd + 16, true);
  const out = {};
  for (; count > 0; count--) {
    if (view.getUint32(pos, true) !== 0x02014b50) throw new Error('bad zip central directory');
    const method = view.getUint16(pos + 10, true);
    let size = view.getUint32(pos + 20, true);
    const nameLength = view.getUint16(pos + 28, true);
    const extraLength = view.getUint16(pos + 30, true);
    const commentLength = view.getUint16(pos + 32, true);
    let local = view.getUint32(pos + 42, true);
    const name = TEXT.decode(bytes.subarray(pos + 46, pos + 46 + nameLength));
    // zip64 extra: the 0xFFFFFFFF fields follow in order (uncompressed, compressed, offset)
    let extra = pos + 46 + nameLength;
    const extraEnd = extra + extraLength;
    while (extra < extraEnd) {
      const id = view.getUint16(extra, true);
      const length = view.getUint16(extra + 2, true);
      if (id === 1) {
        let at = extra + 4;
        const uncompressed = view.getUint32(pos + 24, true);
        if (uncompressed === 0xffffffff) at += 8;
        if (size === 0xffffffff) { size = Number(view.getBigUint64(at, true)); at += 8; }
        if (local === 0xffffffff) local = Number(view.getBigUint64(at, true));
      }
      extra += 4 + length;
    }
    if (method !== 0) throw new Error(`${name}: compressed .npz entries are not supported`);
    const dataStart = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    out[name.replace(/\.npy$/, '')] = parseNpy(bytes.subarray(dataStart, dataStart + size));
    pos += 46 + nameLength + extraLength + commentLength;
  }
  return out;
}

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function npy({ data, shape }) {
  const descr = Object.keys(NPY_TYPES).find((k) => data instanceof NPY_TYPES[k]);
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(', ');
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${dims}), }`;
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n';
  const bytes = new Uint8Array(10 + header.length + data.byteLength);
  bytes.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  new DataView(bytes.buffer).setUint16(8, header.length, true);
  bytes.set(new TextEncoder().encode(header), 10);
  bytes.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), 10 + header.length);
  return bytes;
}

/** An uncompressed .npz of {key: {data, shape}} (as numpy.savez writes, without zip64). */
export function writeNpz(arrays) {
  const encoder = new TextEncoder();
  const locals = [];
  const centrals = [];
  let offset = 0;
  for (const [key, array] of Object.entries(arrays)) {
    const name = encoder.encode(`${key}.npy`);
    const body = npy(array);
    const crc = crc32(body);
    const local = new Uint8Array(30 + name.length);
    const lv = new DataView(local.buffer);
    lv.setUint32(0, 0x04034b50, true);
    lv.setUint16(4, 20, true);
    lv.setUint32(14, crc, true);
    lv.setUint32(18, body.length, true);
    lv.setUint32(22, body.length, true);
    lv.setUint16(26, name.length, true);
    local.set(name, 30);
    const central = new Uint8Array(46 + name.length);
    const cv = new DataView(central.buffer);
    cv.setUint32(0, 0x02014b50, true);
    cv.setUint16(4, 20, true);
    cv.setUint16(6, 20, true);
    cv.setUint32(16, crc, true);
    cv.setUint32(20, body.length, true);
    cv.setUint32(24, body.length, true);
    cv.setUint16(28, name.length, true);
    cv.setUint32(42, offset, true);
    central.set(name, 46);
    locals.push(local, body);
    centrals.push(central);
    offset += local.length + body.length;
  }
  const centralSize = centrals.reduce((s, c) => s + c.length, 0);
  const end = new Uint8Array(22);
  const ev = new DataView(end.buffer);
  ev.setUint32(0, 0x06054b50, true);
  ev.setUint16(8, centrals.length, true);
  ev.setUint16(10, centrals.length, true);
  ev.setUint32(12, centralSize, true);
  ev.setUint32(16, offset, true);
  return concat([...locals, ...centrals, end]);
}

/** Hex SHA-256 (WebCrypto: browsers and workers on a secure origin such as 127.0.0.1; Node). */
export async function sha256Hex(bytes) {
  // Node 18 has WebCrypto only as node:crypto's webcrypto (global from Node 19)
  const subtle = globalThis.crypto?.subtle ?? (await import('node:crypto')).webcrypto.subtle;
  const digest = new Uint8Array(await subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}
