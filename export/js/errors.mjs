// Error kinds of the device contract (device_contract.json "errors"): the Python learner's
// EdgeError family plus the client's own (aborted, timeout, busy, terminated, fatal runtime).
// Every error carries `.code`; `toWire` / `fromWire` carry one across postMessage, so the main
// thread rethrows the same class the worker threw.
import { CONTRACT } from './contract.mjs';

export class EdgeError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }

  get code() {
    return CONTRACT.errors[this.name]?.code ?? CONTRACT.errors.EdgeError.code;
  }
}

const classes = { EdgeError };
const define = (name) => {
  if (!classes[name]) {
    const Parent = define(CONTRACT.errors[name].base);
    classes[name] = { [name]: class extends Parent {} }[name]; // a class named `name`
  }
  return classes[name];
};
Object.keys(CONTRACT.errors).forEach(define);

export const {
  ArgumentError,
  ArtifactMismatchError,
  BatchError,
  CorruptArtifactError,
  EmptyDataError,
  ExportError,
  FatalRuntimeError,
  MissingArtifactError,
  NonFiniteGradientError,
  OnnxRuntimeError,
  SaveLocationError,
  StaleWriterError,
  TaskOrderError,
  TerminatedError,
  TimeoutError,
  UnsupportedFormatError,
} = classes;
export const AbortError = classes.AbortError;
export const ERROR_CLASSES = Object.freeze({ ...classes });

/** A plain object for postMessage: {name, code, message, stack}. */
export function toWire(error) {
  if (error instanceof EdgeError) return { name: error.name, code: error.code, message: error.message, stack: error.stack };
  // onnxruntime-web throws a bare number (a C++ exception pointer) or traps: fatal
  const trap = typeof WebAssembly !== 'undefined' && error instanceof WebAssembly.RuntimeError;
  if (typeof error === 'number' || trap) {
    const what = typeof error === 'number' ? `onnxruntime-web failed with bare code ${error}` : String(error.message);
    return { name: 'FatalRuntimeError', code: CONTRACT.errors.FatalRuntimeError.code, message: what };
  }
  const message = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  return { name: 'OnnxRuntimeError', code: CONTRACT.errors.OnnxRuntimeError.code, message, stack: error?.stack };
}

/** The error `toWire` described, as its own class (EdgeError for an unknown name). */
export function fromWire(wire, prefix = '') {
  const Kind = classes[wire?.name] ?? EdgeError;
  const error = new Kind(`${prefix}${wire?.message ?? 'unknown error'}`);
  if (wire?.stack) error.workerStack = wire.stack;
  return error;
}
