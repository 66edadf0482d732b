#!/usr/bin/env node
// Compile contracts/*.sol and contracts/verifiers/*.sol with solc-js (pinned in package-lock.json) and the
// OpenZeppelin sources from node_modules into joynode/chain/artifacts.json, the
// ABIs and bytecode the Python package loads. The output records a hash of the
// sources, so a test can tell when the artifacts are stale.
//
//   node contracts/build.mjs          # from the repository root
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const contractsDir = path.join(root, "contracts");
const nodeModules = path.join(root, "node_modules");
const outFile = path.join(root, "joynode", "chain", "artifacts.json");
const EVM_VERSION = "cancun";
const OPTIMIZER_RUNS = 200;

// Ours, and the Groth16 verifiers ZoKrates exported (`joynode circuits build`).
const solidityIn = (dir) =>
  fs.existsSync(path.join(contractsDir, dir))
    ? fs.readdirSync(path.join(contractsDir, dir)).filter((f) => f.endsWith(".sol")).map((f) => path.posix.join(dir, f))
    : [];
const files = [...solidityIn("."), ...solidityIn("verifiers")].map((f) => path.posix.normalize(f)).sort();
const sources = {};
const digest = crypto.createHash("sha256");
for (const file of files) {
  const content = fs.readFileSync(path.join(contractsDir, file), "utf8");
  sources[file] = { content };
  digest.update(file + "\0" + content + "\0");
}
// OpenZeppelin contracts JoyNet deploys as they are (imports of ours are compiled anyway,
// but only what is listed here is written out).
const LIBRARY = { "@openzeppelin/contracts/proxy/ERC1967/ERC1967Proxy.sol": ["ERC1967Proxy"] };
for (const file of Object.keys(LIBRARY)) {
  sources[file] = { content: fs.readFileSync(path.join(nodeModules, file), "utf8") };
}
digest.update(`solc=${solc.version()};evm=${EVM_VERSION};runs=${OPTIMIZER_RUNS}`);

function findImports(importPath) {
  const candidates = importPath.startsWith("@")
    ? [path.join(nodeModules, importPath)]
    : [path.join(contractsDir, importPath)];
  for (const candidate of candidates) {
    if (fs.existsSync(candidate)) return { contents: fs.readFileSync(candidate, "utf8") };
  }
  return { error: `not found: ${importPath}` };
}

const input = {
  language: "Solidity",
  sources,
  settings: {
    evmVersion: EVM_VERSION,
    optimizer: { enabled: true, runs: OPTIMIZER_RUNS },
    viaIR: true,
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
let failed = false;
for (const error of output.errors || []) {
  // Warnings inside OpenZeppelin are theirs to fix; ours and every error are shown.
  const file = error.sourceLocation?.file || "";
  if (error.severity !== "error" && file.startsWith("@")) continue;
  process.stderr.write(error.formattedMessage + "\n");
  if (error.severity === "error") failed = true;
}
if (failed) process.exit(1);

const contracts = {};
for (const file of files) {
  for (const [name, compiled] of Object.entries(output.contracts[file] || {})) {
    contracts[name] = { abi: compiled.abi, bytecode: "0x" + compiled.evm.bytecode.object };
  }
}
for (const [file, names] of Object.entries(LIBRARY)) {
  for (const name of names) {
    const compiled = output.contracts[file][name];
    contracts[name] = { abi: compiled.abi, bytecode: "0x" + compiled.evm.bytecode.object };
  }
}
const artifacts = {
  compiler: solc.version(),
  evmVersion: EVM_VERSION,
  optimizerRuns: OPTIMIZER_RUNS,
  sourcesHash: digest.digest("hex"),
  contracts,
};
fs.mkdirSync(path.dirname(outFile), { recursive: true });
fs.writeFileSync(outFile, JSON.stringify(artifacts, null, 1) + "\n");
console.log(`compiled ${Object.keys(contracts).join(", ")} with solc ${solc.version()} -> ${path.relative(root, outFile)}`);
