#!/usr/bin/env node
// Run kldiv.js on every case of a kldiv-spec vectors file; write the results file to stdout.
//
//   kldiv-spec vectors export vectors.json
//   node examples/js/run.js vectors.json > results.json
//   kldiv-spec vectors verify vectors.json results.json
//
// Options:
//   --bug batchmean-divisor   run the deliberately broken variant ("batchmean" divides by
//                             the broadcast output's first dimension, not the input's)
//   --skip-dtype DTYPE        leave out the cases with an array of DTYPE (reported as skipped)
"use strict";

const fs = require("fs");
const path = require("path");
const { FLOAT_DTYPES, rounder, klDiv, klDivBackward } = require("./kldiv.js");

const BUGS = { "batchmean-divisor": "batchmeanDivisor" };

function usage(message) {
  process.stderr.write(
    `run.js: ${message}\nusage: node run.js VECTORS [--bug ${Object.keys(BUGS).join("|")}] ` +
      "[--skip-dtype DTYPE]...\n",
  );
  process.exit(2);
}

/** A vectors array {dtype, shape, data: [strings]} as {dtype, shape, data: Float64Array}. */
function parseArray(a) {
  const special = { nan: NaN, inf: Infinity, "-inf": -Infinity, true: 1, false: 0 };
  const values = a.data.map((s) => (s in special ? special[s] : Number(s)));
  const R = FLOAT_DTYPES.includes(a.dtype) ? rounder(a.dtype) : (v) => v;
  return { dtype: a.dtype, shape: a.shape, data: Float64Array.from(values, R) };
}

/** The shortest decimal string that reads back (as float64, then rounded) to v in dtype. */
function formatValue(v, dtype) {
  if (Number.isNaN(v)) return "nan";
  if (v === Infinity) return "inf";
  if (v === -Infinity) return "-inf";
  if (v === 0) return Object.is(v, -0) ? "-0.0" : "0.0";
  if (dtype === "float64") return String(v); // ECMAScript's shortest round-trip digits
  const R = rounder(dtype);
  for (let p = 1; p < 17; p++) {
    const s = v.toPrecision(p);
    if (R(Number(s)) === v) return s;
  }
  return String(v);
}

function formatArray(a) {
  return {
    dtype: a.dtype,
    shape: a.shape,
    data: Array.from(a.data, (v) => formatValue(v, a.dtype)),
  };
}

function main(argv) {
  const args = argv.slice(2);
  let file = null;
  const bugs = {};
  const skip = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--bug") {
      const name = args[++i];
      if (!(name in BUGS)) usage(`unknown bug ${name}`);
      bugs[BUGS[name]] = true;
    } else if (args[i] === "--skip-dtype") {
      skip.push(args[++i]);
    } else if (file === null) {
      file = args[i];
    } else {
      usage(`unexpected argument ${args[i]}`);
    }
  }
  if (file === null) usage("no vectors file");
  const doc = JSON.parse(fs.readFileSync(file, "utf8"));
  if (doc.format !== "kldiv-spec-vectors" || doc.version !== 1) {
    usage(`${file} is not a kldiv-spec-vectors file of version 1`);
  }
  const results = {};
  for (const c of doc.cases) {
    const arrays = [c.input, c.target, c.grad_output].filter((a) => a !== undefined);
    if (arrays.some((a) => skip.includes(a.dtype))) continue;
    const options = { reduction: c.reduction, logTarget: c.log_target, bugs };
    try {
      const x = parseArray(c.input);
      const t = parseArray(c.target);
      if (c.function === "kl_div") {
        results[c.id] = formatArray(klDiv(x, t, options));
      } else if (c.function === "kl_div_backward") {
        const [gx, gt] = klDivBackward(parseArray(c.grad_output), x, t, options);
        results[c.id] = { grad_input: formatArray(gx), grad_target: formatArray(gt) };
      } // a function this port does not have is left out: skipped
    } catch (e) {
      results[c.id] = { error: `${e.name}: ${e.message}` };
    }
  }
  const bugNames = Object.keys(BUGS).filter((b) => bugs[BUGS[b]]);
  const name = path.join("examples", "js", "kldiv.js");
  const implementation = bugNames.length ? `${name} --bug ${bugNames.join(",")}` : name;
  const out = { format: "kldiv-spec-results", version: 1, implementation, results };
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main(process.argv);
