// A dapp's workload with viem, through a JoyNet node's /rpc/{chainId} and straight to the
// chain, to compare: reads {"gateway", "direct", "token", "emitter"} as JSON on stdin
// (emitter: the init code of a contract that logs its calldata), deploys it, sends
// transfers and logging calls through the gateway, then reads every block, transaction,
// receipt, log and balance both ways. Writes {"chainId", "hashes", "mismatches"} as JSON.
import { createPublicClient, createWalletClient, http } from "viem";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { gateway, direct, token, emitter } = JSON.parse(input);
const transport = http(gateway, {
  fetchOptions: { headers: { authorization: `Bearer ${token}` } },
  retryCount: 0,
});
const viaGateway = createPublicClient({ transport });
const viaChain = createPublicClient({ transport: http(direct, { retryCount: 0 }) });
const [sender, receiver] = await viaChain.request({ method: "eth_accounts" });
const wallet = createWalletClient({ account: sender, transport });
const chainId = await viaGateway.getChainId();
const chain = { id: chainId, name: "devnet", nativeCurrency: { name: "ETH", symbol: "ETH", decimals: 18 }, rpcUrls: { default: { http: [gateway] } } };

const hashes = [];
const deploy = await wallet.sendTransaction({ chain, data: emitter });
const { contractAddress } = await viaGateway.waitForTransactionReceipt({ hash: deploy, pollingInterval: 50 });
hashes.push(deploy);
for (let i = 0; i < 3; i++) {
  hashes.push(await wallet.sendTransaction({ chain, to: receiver, value: 1000n + BigInt(i) }));
  hashes.push(
    await wallet.sendTransaction({ chain, to: contractAddress, data: `0x${i.toString(16).padStart(64, "0")}` }),
  );
  for (const hash of hashes.slice(-2)) {
    await viaGateway.waitForTransactionReceipt({ hash, pollingInterval: 50 });
  }
}

const mismatches = [];
const same = (what, a, b) => {
  const text = (v) => JSON.stringify(v, (_, x) => (typeof x === "bigint" ? x.toString() : x));
  if (text(a) !== text(b)) mismatches.push(what);
};
const head = await viaChain.getBlockNumber();
same("blockNumber", await viaGateway.getBlockNumber(), head);
for (let n = 0n; n <= head; n++) {
  same(`block ${n}`, await viaGateway.getBlock({ blockNumber: n, includeTransactions: true }),
    await viaChain.getBlock({ blockNumber: n, includeTransactions: true }));
}
for (const hash of hashes) {
  same(`tx ${hash}`, await viaGateway.getTransaction({ hash }), await viaChain.getTransaction({ hash }));
  same(`receipt ${hash}`, await viaGateway.getTransactionReceipt({ hash }),
    await viaChain.getTransactionReceipt({ hash }));
}
const logs = { address: contractAddress, fromBlock: 0n, toBlock: head };
same("logs", await viaGateway.getLogs(logs), await viaChain.getLogs(logs));
for (const address of [sender, receiver, contractAddress]) {
  same(`balance ${address}`, await viaGateway.getBalance({ address }), await viaChain.getBalance({ address }));
  same(`code ${address}`, await viaGateway.getCode({ address }), await viaChain.getCode({ address }));
}
process.stdout.write(JSON.stringify({ chainId, hashes, mismatches }));
