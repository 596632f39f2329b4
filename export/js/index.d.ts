// Types of softmask-edge (hand-written; the implementation is plain ES modules).

export type TypedArray = Float32Array | BigInt64Array | Int32Array | Uint8Array;
/** One input tensor: flat data and its dims (row-major). */
export interface InputTensor { data: TypedArray; dims: number[] }
/** One batch: every input the artifacts declare, and one label per row. */
export interface Batch { inputs: Record<string, InputTensor>; labels: ArrayLike<number | bigint> }
/** Files by name (manifest.json, checkpoint-NNNNNN, importance_history-NNNNNN.npz, graphs). */
export type Files = Record<string, Uint8Array>;

export interface Progress { epoch: number; epochs: number; loss: number; valLoss: number | null; lr: number; ms: number }
export interface EarlyStopping { patience?: number; lrPatience?: number; lrFactor?: number; lrMin?: number }
export interface LearnOptions {
  epochs?: number; lr?: number; masked?: boolean; validation?: Batch[] | null; earlyStopping?: EarlyStopping;
  onProgress?: (p: Progress) => void; signal?: AbortSignal;
}
export interface Manifest {
  format_version: number; generation: number; num_tasks: number; task_mode: 'task_incremental' | 'shared_head';
  head_classes: number[]; task_names: string[]; params: Record<string, number[]>; masked: string[]; heads: string[];
  importance_dtype: 'float32' | 'float16' | 'uint8'; inputs: { name: string; dtype: string; shape: (number | null)[] }[];
  [field: string]: unknown;
}

/** A place for saved generations: IndexedDBStore, OPFSStore or your own. */
export interface Store {
  readonly name: string;
  read(name: string): Promise<Uint8Array>;
  write(name: string, bytes: Uint8Array): Promise<void>;
  remove(name: string): Promise<void>;
  list(): Promise<string[]>;
}
export class IndexedDBStore implements Store { constructor(name?: string); readonly name: string; read(name: string): Promise<Uint8Array>; write(name: string, bytes: Uint8Array): Promise<void>; remove(name: string): Promise<void>; list(): Promise<string[]> }
export class OPFSStore implements Store { constructor(folder?: string); readonly name: string; read(name: string): Promise<Uint8Array>; write(name: string, bytes: Uint8Array): Promise<void>; remove(name: string): Promise<void>; list(): Promise<string[]> }
export function readGeneration(store: Store): Promise<Files>;
export function writeGeneration(store: Store, files: Files, expected: number | null): Promise<number>;

export interface WorkerLearnerOptions { workerUrl?: string | URL; ortUrl?: string | URL; wasmPaths?: string | URL; timeoutMs?: number; numThreads?: number }
/** The learner in a Web Worker: calls queue, promises always settle, errors keep their class. */
export class WorkerLearner extends EventTarget {
  constructor(options?: WorkerLearnerOptions);
  timeoutMs: number;
  readonly restarts: number;
  readonly generation: number | null;
  load(source: string | URL | Files | Store): Promise<{ manifest: Manifest }>;
  learnTask(batches: Batch[], options?: LearnOptions): Promise<number[]>;
  endTask(batches: Batch[], options?: { name?: string; signal?: AbortSignal }): Promise<Record<string, Float32Array>>;
  predict(inputs: Record<string, InputTensor>, options?: { taskId?: number }): Promise<{ data: Float32Array; dims: number[] }>;
  evaluate(batches: Batch[], options?: { taskId?: number }): Promise<number>;
  parameters(): Promise<Record<string, Float32Array>>;
  importance(): Promise<Record<string, Float32Array>>;
  manifest(): Promise<Manifest>;
  validationLosses(): Promise<number[]>;
  save(store?: Store | null): Promise<{ generation: number; files?: Files }>;
  terminate(): void;
}

/** The learner on the calling thread (the worker uses it; node tests too). */
export class EdgeLearner {
  static load(source: string | URL | Files | { read(name: string): Promise<Uint8Array> }, ort: unknown): Promise<EdgeLearner>;
  readonly manifest: Manifest;
  readonly numTasks: number;
  validationLosses: number[];
  parameters(): Record<string, Float32Array>;
  importance(): Record<string, Float32Array>;
  learnTask(batches: Batch[], options?: Omit<LearnOptions, 'onProgress'> & { onEpoch?: (p: Progress) => void }): Promise<number[]>;
  endTask(batches: Batch[], options?: { name?: string; signal?: AbortSignal }): Promise<Record<string, Float32Array>>;
  predict(inputs: Record<string, InputTensor>, options?: { taskId?: number }): Promise<{ data: Float32Array; dims: number[] }>;
  evaluate(batches: Batch[], options?: { taskId?: number }): Promise<number>;
  save(): Promise<{ files: Files; generation: number }>;
  release(): Promise<void>;
}
export class Plateau { constructor(options: EarlyStopping, lr: number); lr: number; update(valLoss: number): { improved: boolean; stop: boolean } }
export function decodeImportance(stored: Float32Array | Uint16Array | Uint8Array, dtype: 'float32' | 'float16' | 'uint8'): Float32Array;
export const FORMAT_VERSION: number;
/** device_contract.json: file names, manifest schema, storage dtypes, error codes. */
export const CONTRACT: Readonly<Record<string, any>>;

/** Every error the learner raises on purpose; `code` is the device contract's. */
export class EdgeError extends Error { readonly code: string; workerStack?: string }
export class ArtifactMismatchError extends EdgeError {}
export class MissingArtifactError extends EdgeError {}
export class CorruptArtifactError extends EdgeError {}
export class UnsupportedFormatError extends EdgeError {}
export class BatchError extends EdgeError {}
export class EmptyDataError extends EdgeError {}
export class NonFiniteGradientError extends EdgeError {}
export class TaskOrderError extends EdgeError {}
export class ExportError extends EdgeError {}
export class StaleWriterError extends EdgeError {}
export class SaveLocationError extends EdgeError {}
export class OnnxRuntimeError extends EdgeError {}
export class ArgumentError extends EdgeError {}
/** onnxruntime-web failed with a bare number or a wasm trap: the worker was replaced. */
export class FatalRuntimeError extends OnnxRuntimeError {}
export class AbortError extends EdgeError {}
export class TimeoutError extends EdgeError {}
export class TerminatedError extends EdgeError {}
export const ERROR_CLASSES: Readonly<Record<string, typeof EdgeError>>;
export function toWire(error: unknown): { name: string; code: string; message: string; stack?: string };
export function fromWire(wire: { name: string; message: string; stack?: string }, prefix?: string): EdgeError;
