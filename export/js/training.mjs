// Training one task: epochs of masked SGD steps, with the Python learner's plateau schedule
// (lr decay, early stop, best weights kept) when validation batches are given.
import { AbortError, ArgumentError } from './errors.mjs';
import { ordered } from './batches.mjs';

/** The Python learner's schedule.Plateau: lr decay on plateaus, early stop, best epoch. */
export class Plateau {
  constructor({ patience = 10, lrPatience = 3, lrFactor = 1 / 3, lrMin = 1e-4 } = {}, lr) {
    if (!(patience >= 1 && lrPatience >= 1 && lrFactor > 0 && lrFactor < 1)) {
      throw new ArgumentError('earlyStopping needs patience, lrPatience >= 1 and lrFactor in (0, 1)');
    }
    Object.assign(this, { patience, lrPatience, lrFactor, lrMin, lr });
    this.best = Infinity;
    this.sinceBest = 0;
    this.sinceChange = 0;
  }

  update(valLoss) {
    const improved = Number.isFinite(valLoss) && valLoss < this.best;
    if (improved) {
      this.best = valLoss;
      this.sinceBest = 0;
      this.sinceChange = 0;
    } else {
      this.sinceBest += 1;
      this.sinceChange += 1;
      if (this.sinceChange >= this.lrPatience) {
        this.lr *= this.lrFactor;
        this.sinceChange = 0;
      }
    }
    return { improved, stop: this.sinceBest >= this.patience || this.lr < this.lrMin };
  }
}

export function checkAborted(signal) {
  if (signal?.aborted) throw new AbortError(`cancelled: ${signal.reason?.message ?? signal.reason ?? 'aborted'}`);
}

const YIELD_MS = 50;
let lastYield = 0;
/** Let queued events run (a worker's cancel message) at most every YIELD_MS: a wasm step
 * runs synchronously and awaits between steps resolve as microtasks, before any message. A
 * MessageChannel round trip is one task, without setTimeout's 4 ms clamp. */
async function yieldToEvents(signal) {
  if (!signal || performance.now() - lastYield < YIELD_MS) return;
  if (typeof MessageChannel === 'undefined') {
    await new Promise((resolve) => setTimeout(resolve, 0));
  } else {
    const { port1, port2 } = new MessageChannel();
    await new Promise((resolve) => {
      port1.onmessage = resolve;
      port2.postMessage(null);
    });
    port1.close();
  }
  lastYield = performance.now();
}

/**
 * Epochs over `prepared` feeds; returns the mean loss per epoch. `onEpoch({epoch, loss,
 * valLoss, lr, ms})` after each epoch; `signal` (AbortSignal) is checked before every step.
 * `learner` provides sessions, state and parameters(); validation losses land in
 * `learner.validationLosses`.
 */
export async function trainTask(learner, t, prepared, val, scale, plateau, epochs, { onEpoch, signal } = {}) {
  let best = null;
  const losses = [];
  const start = performance.now();
  learner.validationLosses = [];
  for (let e = 0; e < epochs; e++) {
    const session = await learner.sessions.open(t, plateau.lr, { scale });
    let total = 0;
    for (const f of prepared) {
      await yieldToEvents(signal);
      checkAborted(signal);
      await session.lazyResetGrad();
      const out = await session.runTrainStep(ordered(f, session.trainingInputNames));
      total += out.loss.data[0];
      await session.runOptimizerStep();
    }
    losses.push(total / prepared.length);
    let valLoss = null;
    const lr = plateau.lr;
    let stop = false;
    if (val) {
      await learner.sessions.syncWeights(); // a new lr reopens the session from the synced state
      let valTotal = 0;
      for (const f of val) valTotal += (await session.runEvalStep(ordered(f, session.evalInputNames))).loss.data[0];
      valLoss = valTotal / val.length;
      learner.validationLosses.push(valLoss);
      const update = plateau.update(valLoss);
      if (update.improved) best = learner.parameters();
      stop = update.stop;
    }
    onEpoch?.({ epoch: e, epochs, loss: losses[e], valLoss, lr, ms: performance.now() - start });
    if (stop) break;
  }
  if (!val) await learner.sessions.syncWeights();
  if (val && best) {
    Object.assign(learner.state, best);
    await learner.sessions.close(); // the wasm copy holds the last weights, not the best
  }
  return losses;
}
