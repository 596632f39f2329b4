// Generation saves: the next checkpoint generation (the original ORT checkpoint with its
// tensors overwritten), the history .npz and the manifest naming both with their SHA-256.
import { patchCheckpoint, sha256Hex, writeNpz } from './formats.mjs';
import { CONTRACT } from './contract.mjs';
import { checkpointName, historyName, manifestBytes } from './manifest.mjs';

/**
 * {manifest, checkpoint, files} of generation `manifest.generation + 1`. `files` maps file
 * names to bytes: write every other file first and manifest.json last (storage adapters do).
 */
export async function nextGeneration(manifest, checkpoint, state, history) {
  const generation = manifest.generation + 1;
  const bytes = patchCheckpoint(checkpoint, state);
  const npz = writeNpz(history);
  const names = { checkpoint: checkpointName(generation), history: historyName(generation) };
  const next = {
    ...manifest,
    generation,
    checkpoint: names.checkpoint,
    checkpoint_sha256: await sha256Hex(bytes),
    history: names.history,
    history_sha256: await sha256Hex(npz),
  };
  return {
    manifest: next,
    checkpoint: bytes,
    files: { [names.checkpoint]: bytes, [names.history]: npz, [CONTRACT.files.manifest]: manifestBytes(next) },
  };
}
