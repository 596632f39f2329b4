// softmask-edge: the package's entry point. In a page, WorkerLearner (client.mjs) runs the
// learner in a Web Worker; EdgeLearner runs it on the calling thread (a worker of your own,
// or node for tests); the stores keep saved generations; every error has a class and a .code.
export { WorkerLearner } from './client.mjs';
export { EdgeLearner, decodeImportance, FORMAT_VERSION, Plateau } from './softmask_edge.mjs';
export { IndexedDBStore, OPFSStore, readGeneration, writeGeneration } from './storage.mjs';
export { CONTRACT } from './contract.mjs';
export * from './errors.mjs';
