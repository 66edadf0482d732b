"""The node's configuration: one typed TOML schema with embedded-mode defaults.

Every section is a strict pydantic model, so a typo in a key is an error rather
than a silently ignored setting. Relative paths are resolved against the
directory of the config file, so a node home can be moved as a whole.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from joynode.storage.cid import Cid, CidError


class ConfigError(Exception):
    """A config file that cannot be used; the message names each bad key path."""


class SettingError(ConfigError):
    """A well-formed setting this machine cannot honour: a port in use, a folder that is
    not a model, a data dir that cannot be written.

    The actor that uses the setting raises it at start; the node then stops and
    ``joynode run`` prints one line, ``joynode: KEY: MESSAGE``, and exits 2, as
    for a config file that does not validate. ``key`` is the setting's path as
    written in the config (``http.listen``, ``inference.models[0].path``).
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {' '.join(message.split())}")
        self.key = key

    @classmethod
    def cannot_listen(cls, key: str, address: str, error: OSError) -> SettingError:
        return cls(key, f"cannot listen on {address}: {error.strerror or error}")


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not host:port (got {value!r})")
    ip = host.strip("[]")
    if ip != "localhost":
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"not an IP address or 'localhost' (got {host!r})") from None
    return value


HostPort = Annotated[StrictStr, AfterValidator(_host_port)]


def _multiaddr(value: str) -> str:
    from multiaddr import Multiaddr

    try:
        Multiaddr(value)
    except Exception:  # multiaddr raises several unrelated types for bad input
        raise ValueError(f"not a multiaddr (got {value!r})") from None
    return value


def _peer_multiaddr(value: str) -> str:
    _multiaddr(value)
    if "/p2p/" not in value:
        raise ValueError(f"missing /p2p/<peer id> (got {value!r})")
    return value


MultiaddrStr = Annotated[StrictStr, AfterValidator(_multiaddr)]
PeerMultiaddrStr = Annotated[StrictStr, AfterValidator(_peer_multiaddr)]
Seconds = Annotated[float, Field(gt=0, le=86_400)]
PerSecond = Annotated[float, Field(gt=0, le=1_000_000)]


def split_host_port(value: str) -> tuple[str, int]:
    """Split a validated ``host:port`` into its parts (IPv6 brackets removed)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port`` with IPv6 hosts bracketed."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    data_dir: Path = Field(Path("data"), description="SQLite state, runtime files, caches.")
    key_file: Path = Field(
        Path("node.key"),
        description="secp256k1 node key: a 0600 hex file or an encrypted eth keystore (JSON). "
        "The same key is the libp2p identity and the Ethereum account.",
    )
    key_password_file: Path | None = Field(
        None,
        description="Password for an encrypted keystore (0600). "
        "Alternatively set JOYNODE_KEY_PASSWORD.",
    )


class ControlSection(_Section):
    listen: HostPort = Field(
        "127.0.0.1:7760", description="Websocket JSON-RPC control socket (port 0: any free port)."
    )
    token_file: Path = Field(
        Path("control.token"), description="Bearer token for the control socket (0600)."
    )
    allow_remote: StrictBool = Field(
        False, description="Must be true to listen on a non-loopback address."
    )
    max_frame_bytes: StrictInt = Field(
        1 << 20,
        ge=1024,
        le=64 << 20,
        description="Larger request frames get a JSON-RPC error; over 4x this, the "
        "connection is closed (1009).",
    )
    max_connections: StrictInt = Field(
        64, ge=1, le=10_000, description="Further clients are refused (HTTP 503)."
    )
    max_inflight_per_connection: StrictInt = Field(
        32, ge=1, le=10_000, description="Concurrent calls per client before 'busy' errors."
    )


class HttpSection(_Section):
    enabled: StrictBool = Field(True, description="Serve /metrics and /healthz.")
    listen: HostPort = Field("127.0.0.1:7761", description="HTTP listen address.")
    max_connections: StrictInt = Field(
        64,
        ge=1,
        le=10_000,
        description="HTTP requests served at once; further ones get 503 at once.",
    )
    public_host: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$",
        description="The host (and port) wallets sign in to (EIP-4361 domain), as clients "
        "reach this node; unset: the request's Host header.",
    )
    wallet_session_s: Seconds = Field(
        3600.0, ge=60, description="How long a wallet's sign-in lasts."
    )
    wallet_rate_per_minute: StrictInt = Field(
        60, ge=1, le=100_000, description="Requests per minute for each signed-in wallet."
    )


class P2PSection(_Section):
    network_id: StrictStr = Field(
        "devnet",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="The JoyNet network this node is part of, signed into every gossip "
        "message: messages signed for another network are refused. All nodes of a network "
        "use the same name; give each public network its own.",
    )
    listen: list[MultiaddrStr] = Field(
        ["/ip4/127.0.0.1/tcp/7762"], description="TCP multiaddrs the libp2p host listens on."
    )
    announce: list[MultiaddrStr] = Field(
        [], description="Addresses advertised to peers instead of the listen addresses."
    )
    bootstrap: list[PeerMultiaddrStr] = Field(
        [], description="Peers to join through, each /ip4/.../tcp/.../p2p/<peer id>."
    )
    heartbeat_interval_s: Seconds = Field(
        3.0, description="How often this node gossips its status."
    )
    peer_timeout_s: Seconds = Field(
        15.0, description="A peer not heard from for this long is marked down."
    )
    discovery_interval_s: Seconds = Field(
        30.0, description="DHT lookups for new peers (more often while the node has few)."
    )
    max_peers: StrictInt = Field(
        64, ge=1, le=10_000, description="Discovery stops dialing new peers at this many."
    )
    reconnect_backoff_max_s: Seconds = Field(
        60.0, description="Longest wait between reconnection attempts to a lost peer."
    )
    gossip_rate: PerSecond = Field(
        100.0, description="Gossip messages per second accepted from one peer (sustained)."
    )
    gossip_burst: StrictInt = Field(
        400, ge=1, le=1_000_000, description="Gossip messages one peer may send in a burst."
    )
    rpc_rate: PerSecond = Field(
        50.0, description="Requests per second served to one peer (sustained)."
    )
    rpc_burst: StrictInt = Field(
        100, ge=1, le=1_000_000, description="Requests one peer may send in a burst."
    )
    rpc_timeout_s: Seconds = Field(10.0, description="Deadline of one request.")
    max_message_bytes: StrictInt = Field(
        256 * 1024,
        ge=1024,
        le=1 << 20,
        description="Largest gossip payload or request/response frame accepted.",
    )
    replay_window_s: Seconds = Field(
        120.0, description="Gossip older than this, or seen before within it, is rejected."
    )
    ban_score: float = Field(
        -100.0, lt=0, description="A peer whose score falls to this is disconnected and banned."
    )
    ban_s: Seconds = Field(300.0, description="How long a banned peer is refused.")


def _cid(value: str) -> str:
    try:
        Cid.parse(value)
    except CidError as exc:
        raise ValueError(str(exc)) from None
    return value


CidStr = Annotated[StrictStr, AfterValidator(_cid)]


class ModelEntry(_Section):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    path: Path | None = Field(
        None, description="A prepared model folder (see `joynode models prepare`)."
    )
    cid: CidStr | None = Field(
        None,
        description="The model's CID (`joynode models publish`): fetched from peers into the "
        "model cache on first start.",
    )
    verification: Literal["replicate", "prefill"] = Field(
        "replicate",
        description="How committees check this model's outputs: replicate (every member "
        "generates; exact votes) or prefill (one member generates, the others check its "
        "tokens with one prefill pass; tolerant of dtype and hardware). Every member must "
        "use the same policy (the model's registration on a chain).",
    )
    margin_nats: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="prefill: how far (in nats) below a verifier's own top-1 a claimed token "
        "may be (`joynode verify calibrate` measures it).",
    )
    max_outside: float = Field(
        0.02,
        ge=0,
        le=1,
        description="prefill, greedy jobs: the fraction of output positions allowed beyond "
        "margin_nats.",
    )
    max_outside_sampled: float = Field(
        0.5,
        ge=0,
        le=1,
        description="prefill, sampled jobs: the fraction of positions allowed beyond "
        "margin_nats (gaps divided by the temperature); an honest draw lands there often.",
    )

    @pydantic.model_validator(mode="after")
    def _path_or_cid(self) -> ModelEntry:
        if (self.path is None) == (self.cid is None):
            raise ValueError("give either path or cid")
        return self


class StorageSection(_Section):
    quota_gib: float = Field(
        50.0,
        gt=0,
        le=1 << 20,
        description="Most the block store may hold; adds and fetches "
        "beyond it fail until `storage.gc` frees space.",
    )
    cid_version: Literal[0, 1] = Field(
        0, description="CID version of added content: 0 as kubo's default, 1 with raw leaves."
    )
    provide: StrictBool = Field(True, description="Announce pinned content on the DHT.")
    fetch_window: StrictInt = Field(
        32, ge=1, le=1024, description="Blocks asked for at once during a fetch."
    )
    block_timeout_s: Seconds = Field(
        10.0, description="A block a peer has not sent in this time is asked of another."
    )
    stall_timeout_s: Seconds = Field(
        60.0, description="A fetch fails when no block arrives for this long."
    )
    gateway_cache_mib: StrictInt = Field(
        1024,
        ge=1,
        le=1 << 30,
        description="Content the /ipfs gateway fetched for clients, kept unpinned; the least "
        "recently used goes beyond this, or when the store nears its quota.",
    )


Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[Dtype, ...] = get_args(Dtype)


class InferenceSection(_Section):
    models: list[ModelEntry] = Field(
        [], description="Models to serve: [[inference.models]] name = ..., path = ..."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: whatever the installed vLLM build targets."
    )
    dtype: Dtype = Field(
        "float32", description="float32 keeps greedy outputs identical across batches."
    )
    batch_invariant: bool = Field(
        False,
        description="Run vLLM batch-invariant (VLLM_BATCH_INVARIANT; its CUDA build only) and "
        "announce this node's build (GPU, vLLM, torch, dtype) in heartbeats: prefill "
        "verifiers of the very same build then require every greedy token to be their own "
        "top-1, instead of the model's registered tolerance.",
    )
    max_num_seqs: StrictInt = Field(
        32, ge=1, le=4096, description="Sequences vLLM batches together per model."
    )
    max_model_len: StrictInt = Field(
        2048, ge=16, le=1 << 20, description="Prompt plus output tokens, at most."
    )
    kv_cache_gib: float = Field(1.0, gt=0, le=4096, description="KV cache size per model.")
    max_queue: StrictInt = Field(
        256, ge=1, le=100_000, description="Requests per model (running + waiting) before 'busy'."
    )
    max_tokens_limit: StrictInt = Field(
        1024, ge=1, le=1 << 20, description="Largest max_tokens a request may ask for."
    )


class ConsensusSection(_Section):
    committee_size: StrictInt = Field(
        3, ge=1, le=16, description="Members per job unless infer.submit asks otherwise."
    )
    commit_timeout_s: Seconds = Field(
        120.0, description="From offer to the end of the commit phase (members run the job)."
    )
    reveal_timeout_s: Seconds = Field(
        15.0, description="After the commit phase: members reveal; then the job is decided."
    )
    max_pending_jobs: StrictInt = Field(
        256,
        ge=1,
        le=100_000,
        description="Jobs this node follows at once; more offers are refused.",
    )
    max_pending_per_requester: StrictInt = Field(
        16, ge=1, le=100_000, description="Jobs from one requester this node follows at once."
    )
    settle_timeout_s: Seconds = Field(
        120.0,
        description="Paid jobs: time after the reveal phase to land the certificate on-chain "
        "(the request's on-chain deadline is commit + reveal + this).",
    )
    takeover_s: Seconds = Field(
        10.0,
        description="Paid jobs: how long each agreeing member waits for the one ranked above it "
        "to land the certificate before submitting it itself.",
    )


class PrepaidSection(_Section):
    """Prepaid (feeless) jobs: when this node's settler lands the certificates it holds."""

    batch_size: StrictInt = Field(
        16, ge=1, le=256, description="Settle as soon as this many certified requests wait."
    )
    max_age_s: Seconds = Field(
        30.0, description="Settle what waits once the oldest has waited this long, however few."
    )
    max_gas_price_gwei: float = Field(
        0.0,
        ge=0.0,
        le=1_000_000.0,
        description="Hold batches while gas costs more than this (0: no limit); requests "
        "close to their deadline are settled anyway.",
    )
    takeover_s: Seconds = Field(
        60.0,
        description="How long each member waits, per rank below the first in a request's "
        "committee, for those above it to settle the request before settling it itself.",
    )
    request_ttl_s: Seconds = Field(
        3600.0,
        description="The deadline this node puts in the requests it signs as a client "
        "(infer.submit with prepaid): they cannot settle later.",
    )

    @pydantic.model_validator(mode="after")
    def _requests_live_long_enough(self) -> PrepaidSection:
        least = self.takeover_s + self.max_age_s + 300
        if self.request_ttl_s < least:
            raise _KeyedError(
                ("prepaid", "request_ttl_s"),
                f"must leave time to run and settle: at least takeover_s + max_age_s + 300 "
                f"= {least:g}",
            )
        return self


class ChainSection(_Section):
    mode: Literal["off", "local", "rpc"] = Field(
        "off",
        description="off: no chain; local: the node runs anvil in its data dir and deploys "
        "the contracts there; rpc: an existing chain at rpc_url with a deployment file.",
    )
    rpc_url: StrictStr = Field("http://127.0.0.1:8545", description="JSON-RPC endpoint (mode rpc).")
    deployment_file: Path = Field(
        Path("deployment.json"),
        description="Contract addresses (written by `joynode deploy`; mode local keeps its own "
        "in the data dir).",
    )
    confirmations: StrictInt = Field(
        0, ge=0, le=1000, description="Blocks behind the head the watcher stays (reorg safety)."
    )
    poll_interval_s: Seconds = Field(1.0, description="How often the watcher looks for new blocks.")
    retry_max_s: Seconds = Field(
        30.0,
        description="Longest wait between attempts to reach an unreachable RPC (the wait "
        "starts at poll_interval_s and doubles, with jitter).",
    )
    block_range: StrictInt = Field(
        2000, ge=1, le=100_000, description="Most blocks read per log query."
    )
    local_stake_joy: StrictInt = Field(
        1000, ge=0, description="Mode local: JOY the node stakes for itself at start."
    )


class ZkModelEntry(_Section):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    weights: Path = Field(
        description="The int8 weights file `joynode zk quantize` writes (its weights "
        "commitment must be the one the model is registered with)."
    )


class ZkSection(_Section):
    models: list[ZkModelEntry] = Field(
        [],
        description="zk models this node proves paid requests for: [[zk.models]] name = "
        "(as registered in the marketplace), weights = ...",
    )
    proof_timeout_s: Seconds = Field(
        300.0, description="Longest one proof may take before it is abandoned."
    )
    max_queued_proofs: StrictInt = Field(
        64, ge=1, le=10_000, description="Proofs waiting for the prover; more are refused."
    )


def _upstream_url(value: str) -> str:
    scheme, _, rest = value.partition("://")
    if scheme not in ("http", "https") or not rest or any(c.isspace() for c in value):
        raise ValueError(f"not an http(s) URL (got {value!r})")
    return value


UpstreamUrl = Annotated[StrictStr, Field(max_length=2048), AfterValidator(_upstream_url)]


class RpcChainEntry(_Section):
    chain_id: StrictInt = Field(ge=1, le=2**53 - 1, description="The chain's EIP-155 id.")
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    upstreams: list[UpstreamUrl] = Field(
        min_length=1, max_length=16, description="JSON-RPC endpoints of this chain (http/https)."
    )
    finality_depth: StrictInt = Field(
        0,
        ge=0,
        le=100_000,
        description="Blocks under the head taken as final; 0: the chain's `finalized` tag.",
    )


class RpcSection(_Section):
    """The chain RPC gateway (``/rpc/{chain_id}``): upstreams, cache, failover."""

    chains: list[RpcChainEntry] = Field(
        [], max_length=32, description="Chains served: [[rpc.chains]] chain_id, name, upstreams."
    )
    cache_mib: float = Field(64.0, gt=0, le=65_536, description="Memory for cached answers.")
    head_poll_s: Seconds = Field(2.0, description="How often each chain's head is read.")
    request_timeout_s: Seconds = Field(10.0, description="One upstream call's deadline.")
    hedge_after_s: float = Field(
        0.5,
        ge=0,
        le=60,
        description="A read not answered by then is also sent to the next upstream (0: never).",
    )
    max_attempts: StrictInt = Field(
        3, ge=1, le=8, description="Upstreams tried for one call before it fails."
    )
    breaker_failures: StrictInt = Field(
        5, ge=1, le=1000, description="Failures in a row that open an upstream's circuit."
    )
    breaker_cooldown_s: Seconds = Field(
        10.0, description="How long an open circuit waits before one trial call."
    )
    max_logs_range: StrictInt = Field(
        2000, ge=1, le=1_000_000, description="eth_getLogs ranges are split into this many blocks."
    )
    rate_per_minute: StrictInt = Field(
        600, ge=1, le=1_000_000, description="Calls per minute for each client (batch items count)."
    )
    verify_state: StrictBool = Field(
        True,
        description="Check balances, nonces, code and storage read at a block number or hash "
        "against that block's state root (eth_getProof); a forged one excludes its upstream.",
    )
    wallets_need_plan: StrictBool = Field(
        True,
        description="A signed-in wallet calls /rpc only with a plan on the SovereignRPC "
        "contract (a subscription or credit), checked against its mirror; API keys always.",
    )
    report_interval_s: Seconds = Field(
        60.0,
        ge=5,
        description="How often the calls served to wallets are reported to the SovereignRPC "
        "contract (while this node is an active provider for the chain).",
    )

    @pydantic.field_validator("chains")
    @classmethod
    def _one_entry_per_chain(cls, chains: list[RpcChainEntry]) -> list[RpcChainEntry]:
        ids = [c.chain_id for c in chains]
        if len(set(ids)) != len(ids):
            raise ValueError("a chain id is listed twice")
        return chains


class LogSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error (--log-level overrides)."
    )
    format: Literal["text", "json"] = Field(
        "text", description="text for people, json for log collectors (--log-format overrides)."
    )


class Config(_Section):
    node: NodeSection = NodeSection()
    control: ControlSection = ControlSection()
    http: HttpSection = HttpSection()
    p2p: P2PSection = P2PSection()
    storage: StorageSection = StorageSection()
    inference: InferenceSection = InferenceSection()
    consensus: ConsensusSection = ConsensusSection()
    chain: ChainSection = ChainSection()
    prepaid: PrepaidSection = PrepaidSection()
    zk: ZkSection = ZkSection()
    rpc: RpcSection = RpcSection()
    log: LogSection = LogSection()
    path: Path | None = Field(None, exclude=True, description="Where this config was read from.")

    @pydantic.model_validator(mode="after")
    def _remote_control_is_explicit(self) -> Config:
        host, _ = split_host_port(self.control.listen)
        if not is_loopback(host) and not self.control.allow_remote:
            raise _KeyedError(
                ("control", "listen"),
                f"{host} is not a loopback address (set control.allow_remote = true to allow)",
            )
        return self


class _KeyedError(ValueError):
    """A cross-field error that still names one key path."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _format_errors(error: pydantic.ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        ctx_error = (item.get("ctx") or {}).get("error")
        loc = tuple(item["loc"])
        if isinstance(ctx_error, _KeyedError):
            loc = ctx_error.loc
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif ctx_error is not None:
            message = str(ctx_error)
        else:
            message = item["msg"]
        lines.append(f"{_format_loc(loc)}: {message}")
    return lines


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    node = config.node.model_copy(
        update={
            "data_dir": resolve(config.node.data_dir),
            "key_file": resolve(config.node.key_file),
            "key_password_file": (
                resolve(config.node.key_password_file)
                if config.node.key_password_file is not None
                else None
            ),
        }
    )
    control = config.control.model_copy(update={"token_file": resolve(config.control.token_file)})
    inference = config.inference.model_copy(
        update={
            "models": [
                m.model_copy(update={"path": resolve(m.path)}) if m.path else m
                for m in config.inference.models
            ]
        }
    )
    chain = config.chain.model_copy(
        update={"deployment_file": resolve(config.chain.deployment_file)}
    )
    zk = config.zk.model_copy(
        update={
            "models": [
                m.model_copy(update={"weights": resolve(m.weights)}) for m in config.zk.models
            ]
        }
    )
    return config.model_copy(
        update={
            "node": node,
            "control": control,
            "inference": inference,
            "chain": chain,
            "zk": zk,
        }
    )


def parse_config(data: dict[str, Any], base: Path, source: str = "<config>") -> Config:
    """Validate a decoded TOML document; raise ConfigError listing every bad key."""
    try:
        config = Config.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(
            f"invalid config {source}:\n  " + "\n  ".join(_format_errors(exc))
        ) from None
    return _resolve_paths(config, base)


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid config {path}: TOML syntax error: {exc}") from None
    config = parse_config(data, path.resolve().parent, source=str(path))
    return config.model_copy(update={"path": path.resolve()})


def render_default_config() -> str:
    """The config that ``joynode init`` writes: every key with its default and purpose."""
    lines = [
        "# joynode configuration. Relative paths are resolved against this file's directory.",
        "# Reference: README.md, section 'Configuration'.",
    ]
    defaults = Config()
    for section_name in Config.model_fields:
        section = getattr(defaults, section_name)
        if not isinstance(section, _Section):
            continue
        lines.append("")
        lines.append(f"[{section_name}]")
        for key, field in type(section).model_fields.items():
            value = getattr(section, key)
            if field.description:
                lines.append(f"# {field.description}")
            if value is None:
                lines.append(f'# {key} = ""')
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
