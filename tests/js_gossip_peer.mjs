// A js-libp2p peer for the interop tests (tests/test_p2p_interop.py).
//
// js-libp2p 3 with @libp2p/gossipsub, Noise, Yamux, TCP and identify, as a
// third-party JoyNet client would run it. It dials one node, subscribes to the
// given topics and talks to the test as JSON lines:
//   stdout: {"event": "ready", peer_id} once connected, with the negotiated
//           encryption and muxer; {"event": "subscribers", topic, peers} when
//           a peer (un)subscribes; {"event": "message", topic, from, data}
//           (data in hex) for every message delivered; {"event": "published",
//           recipients} after each publish; {"event": "error", message}.
//   stdin:  {"op": "publish_signed", network, topic, message} seals `message`
//           (a wire message as JSON, with its "type" tag) in a JoyNet gossip
//           envelope signed by this peer's key, as joynode/p2p/gossip.py does;
//           {"op": "publish_raw", topic, hex} publishes bytes as they are.
// Usage: node tests/js_gossip_peer.mjs --key secp256k1|Ed25519 --dial ADDR --topic T...
// It exits when stdin closes.

import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

// Node 20 lacks Promise.withResolvers (ES2024), which js-libp2p 3 uses.
if (Promise.withResolvers === undefined) {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { gossipsub } = await import('@libp2p/gossipsub')
const { generateKeyPair } = await import('@libp2p/crypto/keys')
const { multiaddr } = await import('@multiformats/multiaddr')
const { encode } = await import('@msgpack/msgpack')
const { secp256k1 } = await import('@noble/curves/secp256k1.js')
const { keccak_256: keccak256 } = await import('@noble/hashes/sha3.js')

const WIRE_VERSION = 1 // joynode/wire.py
const GOSSIP_DOMAIN = 'joynet/2/gossip' // joynode/p2p/gossip.py

const { values: args } = parseArgs({
  options: {
    key: { type: 'string', default: 'secp256k1' },
    dial: { type: 'string' },
    topic: { type: 'string', multiple: true, default: [] }
  }
})

function emit (event) {
  process.stdout.write(JSON.stringify(event) + '\n')
}

const toHex = (bytes) => Buffer.from(bytes).toString('hex')
const utf8 = (text) => new TextEncoder().encode(text)

function u32 (n) {
  const out = new Uint8Array(4)
  new DataView(out.buffer).setUint32(0, n)
  return out
}

function u64 (n) {
  const out = new Uint8Array(8)
  new DataView(out.buffer).setBigUint64(0, BigInt(n))
  return out
}

// signatures.digest: keccak256 over the domain tag and length-prefixed parts.
function digest (domain, ...parts) {
  const chunks = [utf8(domain)]
  for (const part of parts) chunks.push(u32(part.length), part)
  return keccak256(Buffer.concat(chunks))
}

// signatures.sign: r || s || v with v in {27, 28}, low s.
function sign (secret, messageDigest) {
  const recovered = secp256k1.sign(messageDigest, secret, { prehash: false, format: 'recovered' })
  return Buffer.concat([recovered.subarray(1), Uint8Array.of(recovered[0] + 27)])
}

// gossip.GossipSigner.seal
function seal (secret, network, topic, message) {
  const body = encode({ v: WIRE_VERSION, msg: message })
  const sentMs = Date.now()
  const signature = sign(secret, digest(GOSSIP_DOMAIN, utf8(network), utf8(topic), u64(sentMs), body))
  const envelope = { type: 'gossip', network, topic, sent_ms: sentMs, body, signature }
  return encode({ v: WIRE_VERSION, msg: envelope })
}

const privateKey = await generateKeyPair(args.key)
const node = await createLibp2p({
  privateKey,
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: { identify: identify(), pubsub: gossipsub() }
})
const pubsub = node.services.pubsub

pubsub.addEventListener('subscription-change', (event) => {
  for (const { topic } of event.detail.subscriptions) {
    emit({ event: 'subscribers', topic, peers: pubsub.getSubscribers(topic).map(String) })
  }
})
pubsub.addEventListener('message', (event) => {
  const { topic, data } = event.detail
  const from = event.detail.type === 'signed' ? event.detail.from.toString() : null
  emit({ event: 'message', topic, from, data: toHex(data) })
})
for (const topic of args.topic) pubsub.subscribe(topic)

const connection = await node.dial(multiaddr(args.dial))
emit({
  event: 'ready',
  peer_id: node.peerId.toString(),
  remote: connection.remotePeer.toString(),
  encryption: connection.encryption,
  muxer: connection.multiplexer
})

async function handle (line) {
  const command = JSON.parse(line)
  let data
  if (command.op === 'publish_signed') {
    data = seal(privateKey.raw, command.network, command.topic, command.message)
  } else if (command.op === 'publish_raw') {
    data = Buffer.from(command.hex, 'hex')
  } else {
    throw new Error(`unknown op ${command.op}`)
  }
  const result = await pubsub.publish(command.topic, data)
  emit({ event: 'published', recipients: result.recipients.map(String) })
}

for await (const line of createInterface({ input: process.stdin })) {
  try {
    await handle(line)
  } catch (error) {
    emit({ event: 'error', message: String(error) })
  }
}
await node.stop()
