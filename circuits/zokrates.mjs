#!/usr/bin/env node
// The ZoKrates command line joynode drives, on zokrates-js (ZoKrates compiled to
// WebAssembly; no native ZoKrates is needed). Groth16 on bn128, ark backend.
//
// One-shot, as the ZoKrates CLI (prints one JSON object on stdout; errors on
// stderr, exit 1):
//
//   node circuits/zokrates.mjs compile -i prog.zok -o prog.out -s prog.abi.json
//   node circuits/zokrates.mjs setup -i prog.out -p proving.key -v verification.key [--entropy HEX]
//   node circuits/zokrates.mjs compute-witness -i prog.out -s prog.abi.json -o witness --args JSON
//   node circuits/zokrates.mjs generate-proof -i prog.out -w witness -p proving.key -j proof.json
//   node circuits/zokrates.mjs verify -v verification.key -j proof.json
//   node circuits/zokrates.mjs export-verifier -v verification.key -o Verifier.sol [--name NAME]
//
// Worker (one process for many requests, so repeated proofs do not pay Node and
// wasm start-up each time): `node circuits/zokrates.mjs worker` reads one JSON
// request per line, {"id", "command", "options"} with the options above by long
// name ("input", "output", "abi", "proving_key", "verification_key", "witness",
// "proof", "args", "entropy", "name"), plus "prove": compute-witness and
// generate-proof in one step, the program and keys cached in memory by path.
// Each reply is one line: {"id", "ok": true, "result"} or {"id", "ok": false,
// "error"}.
import fs from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { initialize } from "zokrates-js";

const OPTIONS = { backend: "ark", scheme: "g16", curve: "bn128" };
const SHORT = {
  i: "input", o: "output", s: "abi", p: "proving_key", v: "verification_key",
  w: "witness", j: "proof", a: "args",
};

function parseArgs(argv) {
  const options = {};
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^-+/, "");
    if (argv[i + 1] === undefined) throw new Error(`${argv[i]} needs a value`);
    options[SHORT[key] || key.replaceAll("-", "_")] = argv[i + 1];
  }
  return options;
}

// User imports come from the file system; the standard library is inside the wasm.
function resolver(location, importPath) {
  const base = path.dirname(location);
  for (const candidate of [path.resolve(base, importPath), path.resolve(base, importPath + ".zok")]) {
    if (fs.existsSync(candidate) && fs.statSync(candidate).isFile()) {
      return { source: fs.readFileSync(candidate, "utf8"), location: candidate };
    }
  }
  return null;
}

function need(options, name) {
  if (options[name] === undefined) throw new Error(`missing option ${name}`);
  return options[name];
}

function entropyOf(options) {
  // Fixed entropy makes setup reproducible from the sources: the keys are build
  // artifacts (and the setup is single-party: whoever knows the entropy can forge).
  return options.entropy;
}

class Zokrates {
  constructor(provider) {
    this.zk = provider.withOptions(OPTIONS);
    this.cache = new Map(); // path -> {mtime, data}
  }

  read(file, parse = (b) => b) {
    const stat = fs.statSync(file);
    const hit = this.cache.get(file);
    if (hit && hit.mtime === stat.mtimeMs && hit.size === stat.size) return hit.data;
    const data = parse(fs.readFileSync(file));
    this.cache.set(file, { mtime: stat.mtimeMs, size: stat.size, data });
    return data;
  }

  compile(o) {
    const input = path.resolve(need(o, "input"));
    const artifacts = this.zk.compile(fs.readFileSync(input, "utf8"), {
      location: input,
      resolveCallback: resolver,
    });
    fs.writeFileSync(need(o, "output"), artifacts.program);
    fs.writeFileSync(need(o, "abi"), JSON.stringify(artifacts.abi, null, 2));
    return { constraints: artifacts.constraintCount, program_bytes: artifacts.program.length };
  }

  setup(o) {
    const keypair = this.zk.setup(this.read(need(o, "input")), entropyOf(o));
    fs.writeFileSync(need(o, "proving_key"), keypair.pk);
    fs.writeFileSync(need(o, "verification_key"), JSON.stringify(keypair.vk, null, 2));
    return { proving_key_bytes: keypair.pk.length };
  }

  witness(o) {
    const program = this.read(need(o, "input"));
    const abi = this.read(need(o, "abi"), (b) => JSON.parse(b.toString("utf8")));
    const args = typeof o.args === "string" ? JSON.parse(o.args) : need(o, "args");
    return this.zk.computeWitness({ program, abi }, args);
  }

  computeWitness(o) {
    const result = this.witness(o);
    if (o.output) fs.writeFileSync(o.output, result.witness);
    return { output: JSON.parse(result.output), witness_bytes: result.witness.length };
  }

  generateProof(o) {
    const proof = this.zk.generateProof(
      this.read(need(o, "input")),
      fs.readFileSync(need(o, "witness")),
      this.read(need(o, "proving_key")),
      entropyOf(o),
    );
    Object.assign(proof, { scheme: OPTIONS.scheme, curve: OPTIONS.curve });
    if (o.proof) fs.writeFileSync(o.proof, JSON.stringify(proof, null, 2));
    return proof;
  }

  prove(o) {
    const result = this.witness(o);
    const proof = this.zk.generateProof(
      this.read(need(o, "input")),
      result.witness,
      this.read(need(o, "proving_key")),
      entropyOf(o),
    );
    Object.assign(proof, { scheme: OPTIONS.scheme, curve: OPTIONS.curve });
    if (o.proof) fs.writeFileSync(o.proof, JSON.stringify(proof, null, 2));
    return { output: JSON.parse(result.output), proof };
  }

  verify(o) {
    const vk = this.read(need(o, "verification_key"), (b) => JSON.parse(b.toString("utf8")));
    const proof = typeof o.proof === "string" && fs.existsSync(o.proof)
      ? JSON.parse(fs.readFileSync(o.proof, "utf8"))
      : need(o, "proof");
    return { verified: this.zk.verify(vk, proof) };
  }

  exportVerifier(o) {
    const vk = this.read(need(o, "verification_key"), (b) => JSON.parse(b.toString("utf8")));
    let source = this.zk.exportSolidityVerifier(vk);
    if (o.name) {
      // Each circuit's verifier gets its own contract name (and its library names
      // stay unique), so several compile together into one artifacts file.
      source = source
        .replace(/contract Verifier\b/g, `contract ${o.name}`)
        .replace(/\bPairing\b/g, `${o.name}Pairing`);
    }
    // ZoKrates' template says "This file is MIT Licensed"; solc wants it machine-readable.
    source = "// SPDX-License-Identifier: MIT\n" + source;
    fs.writeFileSync(need(o, "output"), source);
    return { bytes: source.length };
  }

  run(command, options) {
    const began = performance.now();
    const handlers = {
      compile: () => this.compile(options),
      setup: () => this.setup(options),
      "compute-witness": () => this.computeWitness(options),
      "generate-proof": () => this.generateProof(options),
      prove: () => this.prove(options),
      verify: () => this.verify(options),
      "export-verifier": () => this.exportVerifier(options),
    };
    const handler = handlers[command];
    if (!handler) throw new Error(`unknown command ${command}`);
    const result = handler();
    return { ...result, ms: +(performance.now() - began).toFixed(1) };
  }
}

async function worker(zokrates) {
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  process.stdout.write(JSON.stringify({ ready: true }) + "\n");
  for await (const line of lines) {
    if (!line.trim()) continue;
    let id = null;
    let reply;
    try {
      const request = JSON.parse(line);
      id = request.id ?? null;
      reply = { id, ok: true, result: zokrates.run(request.command, request.options || {}) };
    } catch (error) {
      reply = { id, ok: false, error: String(error && error.message ? error.message : error) };
    }
    process.stdout.write(JSON.stringify(reply) + "\n");
  }
}

async function main() {
  const [command, ...rest] = process.argv.slice(2);
  const zokrates = new Zokrates(await initialize());
  if (command === "worker") return worker(zokrates);
  const result = zokrates.run(command, parseArgs(rest));
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((error) => {
  process.stderr.write(`zokrates: ${error && error.message ? error.message : error}\n`);
  process.exit(1);
});
