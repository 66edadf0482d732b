// Signs EIP-712 typed data with viem, as a browser or Node client of JoyNet does:
// reads {"key": "0x..", "typed_data": {...}} as JSON on stdin (the typed data exactly
// as a node's prepaid.quote returned it), writes the 65-byte signature as 0x-hex.
import { privateKeyToAccount } from "viem/accounts";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { key, typed_data: typed } = JSON.parse(input);
const account = privateKeyToAccount(key);
const { EIP712Domain, ...types } = typed.types;
const signature = await account.signTypedData({
  domain: typed.domain,
  types,
  primaryType: typed.primaryType,
  message: typed.message,
});
process.stdout.write(signature);
