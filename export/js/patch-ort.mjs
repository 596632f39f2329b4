// Fix onnxruntime-web 1.19.2's training bundle (npm postinstall; idempotent).
//
// getContiguousParameters and loadParametersBuffer allocate the tensor's dims on the wasm
// stack (stackAlloc) and then pass that stack address to _free as if it were heap memory.
// On a 268k-parameter MLP the first call fails with "memory access out of bounds"; on small
// models the heap is corrupted silently. 1.19.2 is the last release with a training build,
// so no upstream fix will come: this script drops the two bogus _free calls from the bundle
// the learner imports (dist/ort.training.wasm.min.mjs). The stack memory is released by the
// stackRestore that follows anyway.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const EXPECTED_VERSION = '1.19.2';
const FIXES = [
  // getContiguousParameters: free the heap buffer u, not the stack dims l
  ['n._free(u),n._free(l),n.stackRestore(o)', 'n._free(u),n.stackRestore(o)'],
  // loadParametersBuffer: free the heap buffer u, not the stack dims f
  ['o.stackRestore(r),o._free(u),o._free(f)}}', 'o.stackRestore(r),o._free(u)}}'],
];

// a source checkout has it in ./node_modules; an installed package beside it (hoisted), or nested
function findOrt() {
  for (let dir = dirname(fileURLToPath(import.meta.url)); ; dir = dirname(dir)) {
    const candidate = join(dir, 'node_modules', 'onnxruntime-web');
    if (existsSync(join(candidate, 'package.json'))) return candidate;
    if (dirname(dir) === dir) throw new Error('patch-ort: onnxruntime-web is not installed');
  }
}
const root = findOrt();
const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
if (version !== EXPECTED_VERSION) {
  throw new Error(`patch-ort: onnxruntime-web ${version} installed, the patch is for ${EXPECTED_VERSION}`);
}
const bundle = join(root, 'dist', 'ort.training.wasm.min.mjs');
let text = readFileSync(bundle, 'utf8');
for (const [before, after] of FIXES) {
  const count = text.split(before).length - 1;
  if (count === 1) {
    text = text.replace(before, after);
  } else if (count !== 0 || !text.includes(after)) {
    throw new Error(`patch-ort: expected one '${before}' in ${bundle}, found ${count}`);
  }
}
writeFileSync(bundle, text);
console.log(`patch-ort: ${bundle} patched (stack pointers no longer freed)`);
