// A dependency-free JavaScript implementation of kldiv-spec's kl_div and kl_div_backward
// (docs/spec.md, docs/gradients.md), to show the golden vectors at work on a port in
// another language: `node examples/js/run.js VECTORS > RESULTS`, then
// `kldiv-spec vectors verify VECTORS RESULTS`.
//
// An array is {dtype, shape, data}: dtype "float16", "float32" or "float64" (or an
// integer or boolean dtype, which is refused), shape an array of sizes, data the values
// in row-major order as JavaScript numbers (float64), each a value of the dtype.
//
// Arithmetic in the narrower dtypes is emulated: every operation is carried out in
// float64 and its result rounded to the dtype (Math.fround for float32, f16round below
// for float16). For +, -, * and / this is exactly the operation of the narrower dtype
// (float64 has more than twice their precision); exp and log are within a unit of the
// dtype's last place. The sums of the reductions are accumulated in float64.
"use strict";

const FLOAT_DTYPES = ["float16", "float32", "float64"];
const REDUCTIONS = ["none", "sum", "mean", "batchmean"];

class ValueError extends Error {
  constructor(message) {
    super(message);
    this.name = "ValueError";
  }
}

/** Round a float64 to the nearest float16 value (ties to even), as a float64. */
function f16round(x) {
  if (!Number.isFinite(x) || x === 0) return x;
  const a = Math.abs(x);
  if (a >= 65520) return x > 0 ? Infinity : -Infinity; // 65504 + half its ULP rounds up
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e -= 1;
  else if (2 ** (e + 1) <= a) e += 1;
  const quantum = 2 ** (Math.max(e, -14) - 10); // 11 significant bits; subnormals below 2^-14
  const y = a / quantum; // exact: a division by a power of two
  let m = Math.floor(y);
  const rest = y - m; // exact
  if (rest > 0.5 || (rest === 0.5 && m % 2 === 1)) m += 1;
  return Math.sign(x) * m * quantum;
}

/** The rounding function of a floating dtype. */
function rounder(dtype) {
  if (dtype === "float64") return (v) => v;
  if (dtype === "float32") return Math.fround;
  if (dtype === "float16") return f16round;
  throw new TypeError(`no rounding for dtype ${dtype}`);
}

/** The array API standard's promotion of two floating dtypes: the wider one. */
function promote(a, b) {
  return FLOAT_DTYPES[Math.max(FLOAT_DTYPES.indexOf(a), FLOAT_DTYPES.indexOf(b))];
}

const prod = (shape) => shape.reduce((p, n) => p * n, 1);

/** The broadcast shape of two shapes, or null when they do not broadcast. */
function broadcastShapes(a, b) {
  const n = Math.max(a.length, b.length);
  const out = [];
  for (let i = 0; i < n; i++) {
    const p = i - (n - a.length) >= 0 ? a[i - (n - a.length)] : 1;
    const q = i - (n - b.length) >= 0 ? b[i - (n - b.length)] : 1;
    if (p !== q && p !== 1 && q !== 1) return null;
    out.push(p === 1 ? q : p);
  }
  return out;
}

/** For each element of outShape (row-major), the index of the element of shape it reads. */
function indexMap(shape, outShape) {
  const n = prod(outShape);
  const lead = outShape.length - shape.length;
  const strides = new Array(outShape.length).fill(0);
  let stride = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    strides[i + lead] = shape[i] === 1 ? 0 : stride;
    stride *= shape[i];
  }
  const map = new Int32Array(n);
  const idx = new Array(outShape.length).fill(0);
  for (let k = 0; k < n; k++) {
    let src = 0;
    for (let d = 0; d < outShape.length; d++) src += idx[d] * strides[d];
    map[k] = src;
    for (let d = outShape.length - 1; d >= 0; d--) {
      if (++idx[d] < outShape[d]) break;
      idx[d] = 0;
    }
  }
  return map;
}

function checkArguments(input, target, reduction) {
  if (!REDUCTIONS.includes(reduction)) {
    throw new ValueError(
      `${reduction} is not a valid value for reduction; choose one of ${REDUCTIONS.join(", ")}`,
    );
  }
  for (const [name, a] of [["input", input], ["target", target]]) {
    if (!FLOAT_DTYPES.includes(a.dtype)) {
      throw new TypeError(`${name} must have a real floating-point dtype, not ${a.dtype}`);
    }
  }
  const shape = broadcastShapes(input.shape, target.shape);
  if (shape === null) {
    throw new ValueError(
      `input of shape [${input.shape}] and target of shape [${target.shape}] cannot be ` +
        "broadcast together",
    );
  }
  return shape;
}

/**
 * The divisor D of a reduction: the number of elements for "mean", input.shape[0] for
 * "batchmean" (1 for a 0-d input), else 1. bugs.batchmeanDivisor divides "batchmean" by
 * the first dimension of the broadcast output instead: a plausible bug, for the demo.
 */
function divisor(reduction, inputShape, outShape, bugs) {
  if (reduction === "mean") return prod(outShape);
  if (reduction === "batchmean") {
    const shape = bugs.batchmeanDivisor ? outShape : inputShape;
    return shape.length > 0 ? shape[0] : 1;
  }
  return 1;
}

/** fl(total / D), the specification's one rounding rule (float16: divided in float32). */
function divide(total, d, dtype) {
  if (d === 1) return total;
  if (d === 0) return NaN;
  if (dtype === "float16") return f16round(Math.fround(total / d));
  return rounder(dtype)(total / d);
}

/** The pointwise loss in the dtype whose rounding is R, as PyTorch's composite computes it. */
function pointwise(x, t, logTarget, R) {
  if (logTarget) return R(R(Math.exp(t)) * R(t - x)); // exp(t) * (t - x)
  const xlogy = t === 0 ? 0 : R(t * R(Math.log(t))); // xlogy(t, t): 0 where t == 0
  return R(xlogy - R(t * x));
}

/**
 * kl_div(input, target, {reduction, logTarget}): the loss, as an array (0-d when reduced).
 * Throws ValueError (unknown reduction, shapes that do not broadcast) or TypeError
 * (a dtype that is not floating).
 */
function klDiv(input, target, { reduction = "mean", logTarget = false, bugs = {} } = {}) {
  const outShape = checkArguments(input, target, reduction);
  const dtype = promote(input.dtype, target.dtype);
  const R = rounder(dtype);
  const n = prod(outShape);
  const ix = indexMap(input.shape, outShape);
  const it = indexMap(target.shape, outShape);
  const loss = new Float64Array(n);
  for (let i = 0; i < n; i++) loss[i] = pointwise(input.data[ix[i]], target.data[it[i]], logTarget, R);
  if (reduction === "none") return { dtype, shape: outShape, data: loss };
  let sum = 0;
  for (let i = 0; i < n; i++) sum += loss[i];
  const d = divisor(reduction, input.shape, outShape, bugs);
  return { dtype, shape: [], data: Float64Array.of(divide(R(sum), d, dtype)) };
}

/**
 * kl_div_backward(gradOutput, input, target, {reduction, logTarget}): [gradInput,
 * gradTarget], each of its argument's shape and dtype. gradOutput is 0-d for the
 * reductions, broadcastable to the broadcast shape for "none".
 */
function klDivBackward(gradOutput, input, target, { reduction = "mean", logTarget = false, bugs = {} } = {}) {
  const outShape = checkArguments(input, target, reduction);
  if (!FLOAT_DTYPES.includes(gradOutput.dtype)) {
    throw new TypeError(`grad_output must have a real floating-point dtype, not ${gradOutput.dtype}`);
  }
  const shape = reduction === "none" ? outShape : [];
  const joint = broadcastShapes(gradOutput.shape, shape);
  if (joint === null || joint.length !== shape.length || joint.some((n, i) => n !== shape[i])) {
    throw new ValueError(
      `grad_output of shape [${gradOutput.shape}] cannot be broadcast to the output shape [${shape}]`,
    );
  }
  const dtype = promote(input.dtype, target.dtype);
  const R = rounder(dtype);
  const n = prod(outShape);
  const d = divisor(reduction, input.shape, outShape, bugs);
  const ig = indexMap(gradOutput.shape, outShape);
  const ix = indexMap(input.shape, outShape);
  const it = indexMap(target.shape, outShape);
  // -0 is the identity of IEEE addition: a gradient that is not broadcast keeps its sign of zero
  const sumX = new Float64Array(prod(input.shape)).fill(-0);
  const sumT = new Float64Array(prod(target.shape)).fill(-0);
  for (let i = 0; i < n; i++) {
    const g = divide(R(gradOutput.data[ig[i]]), d, dtype);
    const x = input.data[ix[i]];
    const t = target.data[it[i]];
    let gx;
    let gt;
    if (logTarget) {
      const e = R(Math.exp(t));
      gx = -R(g * e);
      gt = R(R(R(g * R(t - x)) * e) + R(g * e)); // PyTorch's order: (g (t - x)) e^t + g e^t
    } else {
      gx = -R(t * g);
      gt = t > 0 && t < Infinity ? R(g * R(R(R(Math.log(t)) + 1) - x)) : NaN;
    }
    sumX[ix[i]] += gx;
    sumT[it[i]] += gt;
  }
  const cast = (sums, arg) => {
    const Rarg = rounder(arg.dtype);
    return { dtype: arg.dtype, shape: arg.shape.slice(), data: sums.map((v) => Rarg(R(v))) };
  };
  return [cast(sumX, input), cast(sumT, target)];
}

module.exports = { FLOAT_DTYPES, REDUCTIONS, ValueError, f16round, rounder, klDiv, klDivBackward };
