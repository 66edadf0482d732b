"""The ``joynode`` command line: init, run, ctl, gov, keys, version.

Exit codes: 0 success, 1 runtime failure (an actor failed, a control call
returned an error), 2 usage or configuration error (with one clear message,
never a traceback).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from joynode import __version__
from joynode.config import (
    DTYPES,
    Config,
    ConfigError,
    load_config,
    render_default_config,
    split_host_port,
    url,
)
from joynode.control.client import ControlClient
from joynode.control.jsonrpc import RpcError
from joynode.endpoints import Endpoints
from joynode.exceptiongroups import leaves
from joynode.inference.models import PREPARABLE, ModelError, model_id
from joynode.secret_files import ControlToken, SecretFileError, read_secret_file

if TYPE_CHECKING:
    from joynode.console import Payment
    from joynode.node import Node

# Each command imports what only it needs (the node, vLLM, ZoKrates, the Ethereum and
# libp2p stacks) in its own body, so that `joynode ctl` starts in a fraction of a second.

log = logging.getLogger("joynode")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
CONFIG_NAME = "joynode.toml"


class UsageError(Exception):
    """A problem the operator must fix before running again (exit 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="joynode", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("init", help="create a node home: config, node key, control token")
    p.add_argument("dir", type=Path, help="directory for the new node home")
    p.add_argument("--force", action="store_true", help="overwrite an existing home")
    p.add_argument(
        "--password-file",
        type=Path,
        help="encrypt the node key as an eth keystore with this password",
    )

    p = commands.add_parser("run", help="run the node until SIGINT/SIGTERM")
    _config_arg(p)
    p.add_argument("--log-format", choices=["text", "json"], help="override log.format")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override log.level"
    )

    p = commands.add_parser(
        "ctl",
        help="call a control method and print its JSON result; "
        'or `ctl infer "PROMPT"`: a verified inference, shown as it goes',
    )
    _config_arg(p)
    p.add_argument("method", help="e.g. node.status, or infer")
    p.add_argument(
        "params", nargs="?", default=None, help="JSON object of named params (infer: the prompt)"
    )
    p.add_argument("--model", help="infer: the model (default: the node's first)")
    p.add_argument("--max-tokens", type=int, default=48, help="infer: most tokens to generate")
    paying = p.add_mutually_exclusive_group()
    paying.add_argument(
        "--unpaid", action="store_true", help="infer: no payment (default: paid if on a chain)"
    )
    paying.add_argument(
        "--prepaid",
        action="store_true",
        help="infer: pay from the node account's prepaid balance, a request signed with the "
        "node's key (no transaction; see balance.deposit)",
    )

    p = commands.add_parser("keys", help="inspect or create the node key and control token")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys.add_parser("show", help="print the node's address and peer id (never the secret)")
    _config_arg(k)
    k = keys.add_parser(
        "generate", help="create the key and token files the config names, if missing"
    )
    _config_arg(k)
    k.add_argument("--force", action="store_true", help="replace existing files")
    k.add_argument("--password-file", type=Path, help="encrypt the key as an eth keystore")

    p = commands.add_parser(
        "deploy", help="deploy the contracts to chain.rpc_url and write chain.deployment_file"
    )
    _config_arg(p)
    p.add_argument(
        "--guardian",
        help="security council address that may cancel queued proposals (default: none)",
    )
    p.add_argument("--force", action="store_true", help="deploy again even if the file is live")

    p = commands.add_parser("models", help="prepare, identify, publish and fetch models")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    m = models.add_parser("prepare", help=f"build a model folder ({', '.join(PREPARABLE)})")
    m.add_argument("name", choices=PREPARABLE)
    m.add_argument("--out", type=Path, help="target folder (default: models/NAME)")
    m.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    m = models.add_parser("id", help="print a model folder's CID (its id), without a node")
    m.add_argument("path", type=Path)
    m = models.add_parser(
        "publish", help="add a model folder to the running node's store; print its CID"
    )
    _config_arg(m)
    m.add_argument("path", type=Path)
    m = models.add_parser(
        "fetch", help="fetch a model by CID from peers into the running node's model cache"
    )
    _config_arg(m)
    m.add_argument("cid")

    p = commands.add_parser("verify", help="tune prefill verification for a model")
    verify = p.add_subparsers(dest="verify_command", required=True, metavar="ACTION")
    v = verify.add_parser(
        "calibrate",
        help="measure how far honest members in two dtypes disagree on a model; "
        "print the prefill policy for its [[inference.models]] entry",
    )
    v.add_argument("path", type=Path, help="a prepared model folder")
    v.add_argument("--executor-dtype", default="float32", choices=DTYPES)
    v.add_argument("--verifier-dtype", default="bfloat16", choices=DTYPES)
    v.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (1-512)")
    p = commands.add_parser(
        "gov", help="the JoyNet DAO from this node's account: delegate, propose, vote, execute"
    )
    gov = p.add_subparsers(dest="gov_command", required=True, metavar="ACTION")
    g = gov.add_parser("status", help="the governor, timelock, settings and this node's votes")
    _control_call_args(g)
    g = gov.add_parser("delegate", help="delegate this node's JOY and stJOY votes")
    _control_call_args(g)
    g.add_argument("to", nargs="?", help="the delegatee's address (default: this node)")
    g = gov.add_parser("propose", help="propose the actions of a TOML file (docs/operator.md)")
    _control_call_args(g)
    g.add_argument("file", type=Path, help="the proposal: description and [[actions]]")
    g = gov.add_parser("list", help="the newest proposals, with state and votes")
    _control_call_args(g)
    g.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    for action, text in (
        ("show", "one proposal: state, votes, quorum, times, actions in words, voters"),
        ("queue", "queue a passed proposal in the timelock"),
        ("execute", "execute a queued proposal once the timelock delay has passed"),
        ("cancel", "cancel a proposal (its proposer while Pending)"),
    ):
        g = gov.add_parser(action, help=text)
        _control_call_args(g)
        g.add_argument("proposal", help="its id, or the first digits of one")
    g = gov.add_parser("vote", help="vote on a proposal")
    _control_call_args(g)
    g.add_argument("proposal", help="its id, or the first digits of one")
    g.add_argument("support", choices=["for", "against", "abstain"])
    g.add_argument("--reason", default="", help="why, recorded on-chain with the vote")
    g = gov.add_parser("dispute", help="dispute a request's certificate, for the DAO to resolve")
    _control_call_args(g)
    g.add_argument("request_id", help="the paid request (0x and 64 hex digits)")
    g.add_argument("--reason", required=True, help="why the certificate is wrong, for voters")

    p = commands.add_parser("apikeys", help="the HTTP gateway's API keys: create, list, revoke")
    keys_actions = p.add_subparsers(dest="apikeys_command", required=True, metavar="ACTION")
    a = keys_actions.add_parser("create", help="a new key, printed once (stored hashed)")
    _control_call_args(a)
    a.add_argument("name", help="who or what it is for (1-64 characters)")
    a.add_argument("--rate-per-minute", type=int, default=60, help="requests a minute (60)")
    a.add_argument("--quota-tokens", type=int, help="tokens in all (default: no quota)")
    a = keys_actions.add_parser("list", help="the keys, their limits and use (never a secret)")
    _control_call_args(a)
    a.add_argument("--revoked", action="store_true", help="revoked keys too")
    a = keys_actions.add_parser("revoke", help="revoke a key by its id")
    _control_call_args(a)
    a.add_argument("id", help="the key's id (the 12 hex digits after jn-)")

    p = commands.add_parser("circuits", help="build the ZoKrates circuits (keys, verifiers)")
    circuits_actions = p.add_subparsers(dest="circuits_command", required=True, metavar="ACTION")
    circuits_actions.add_parser(
        "build", help="compile, set up and export every circuit that changed (idempotent)"
    )

    p = commands.add_parser("zk", help="zk-friendly models")
    zk_actions = p.add_subparsers(dest="zk_command", required=True, metavar="ACTION")
    z = zk_actions.add_parser(
        "quantize",
        help="float weights of a 16-16-4 MLP (JSON: w1, b1, w2, b2) to the circuit's int8 "
        "weights file, with its weights commitment",
    )
    z.add_argument("floats", type=Path, help="JSON: w1 [16][16], b1 [16], w2 [4][16], b2 [4]")
    z.add_argument("--out", "-o", type=Path, required=True, help="weights file to write")

    p = commands.add_parser(
        "devnet",
        help="a whole JoyNet here: anvil, contracts, N staked nodes serving a model; "
        "a node that dies is restarted; Ctrl-C stops it, running it again reuses it",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["status"],
        help="status: the state of the devnet running in --dir (nodes up, down, restarts)",
    )
    p.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    p.add_argument("--dir", type=Path, default=Path(".joynode/devnet"), help="devnet home")
    p.add_argument("--model", choices=PREPARABLE, default="smollm2", help="the demo model")
    p.add_argument(
        "--models-dir", type=Path, default=Path(".joynode/models"), help="prepared models"
    )
    p.add_argument(
        "--demo", action="store_true", help="once up, run one paid verified inference and show it"
    )
    p.add_argument(
        "--netns",
        action="store_true",
        help="each node in its own network namespace on a private bridge (root), "
        "so partitions can be made with `ip`",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config key for every node, e.g. --set consensus.commit_timeout_s=20 (repeatable)",
    )

    commands.add_parser("version", help="print the joynode version")
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=Path(CONFIG_NAME),
        help=f"config file (default: ./{CONFIG_NAME})",
    )


def _control_call_args(parser: argparse.ArgumentParser) -> None:
    _config_arg(parser)
    parser.add_argument("--json", action="store_true", help="print the JSON result instead")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = _COMMANDS[args.command]
        return handler(args)
    except (ConfigError, SecretFileError, UsageError) as exc:
        print(f"joynode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Output piped into e.g. `head`, which exited: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def cmd_deploy(args: argparse.Namespace) -> int:
    from web3 import Web3

    from joynode.chain.artifacts import load_artifacts
    from joynode.chain.deploy import Deployment, DeployParams, deploy_all
    from joynode.chain.sender import RevertDecoder, TransactionFailed, TransactionSender
    from joynode.keys import NodeKey

    if args.guardian and not Web3.is_address(args.guardian):
        print(f"joynode: --guardian: not an address: {args.guardian}", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args.config)
    key = NodeKey.load(config.node.key_file, password_file=config.node.key_password_file)
    path = config.chain.deployment_file
    w3 = Web3(Web3.HTTPProvider(config.chain.rpc_url))
    try:
        if path.is_file() and not args.force and Deployment.read(path).is_live_on(w3):
            print(f"{path}: already deployed on chain {w3.eth.chain_id}; --force redeploys")
            return EXIT_OK
        from eth_account import Account

        sender = TransactionSender(
            w3, Account.from_key(key.secret), RevertDecoder(load_artifacts().contracts.values())
        )
        params = DeployParams.for_chain(int(w3.eth.chain_id))
        if args.guardian:
            guardian = Web3.to_checksum_address(args.guardian)
            params = replace(params, governance=replace(params.governance, guardian=guardian))
        deployment = deploy_all(sender, params)
    except (OSError, TransactionFailed, ValueError) as exc:
        print(f"joynode: deploy to {config.chain.rpc_url} failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    deployment.write(path)
    print(json.dumps({"deployment_file": str(path), **vars(deployment)}, indent=2))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    if args.models_command == "publish":
        return _control_call(args.config, "models.publish", {"path": str(args.path.resolve())})
    if args.models_command == "fetch":
        return _control_call(args.config, "models.fetch", {"cid": args.cid})
    try:
        if args.models_command == "id":
            print(model_id(args.path))
            return EXIT_OK
        out: Path = args.out or Path("models") / args.name
        if (out / "config.json").is_file() and not args.force:
            print(f"{args.name}: {out} exists ({model_id(out)}); --force rebuilds it")
            return EXIT_OK
        from joynode.console import step
        from joynode.inference.models import prepare

        with step(f"preparing model {args.name} in {out}") as shown:
            cid = prepare(args.name, out, shown.note)
        print(f"{args.name}: {out} ({cid})")
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from joynode.consensus.calibration import calibrate
    from joynode.console import step
    from joynode.inference.engine import EngineError

    if not 1 <= args.max_tokens <= 512:
        raise UsageError("--max-tokens must be between 1 and 512")
    try:
        model_id(args.path)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    with step(
        f"calibrating {args.path.name}: {args.executor_dtype} executor, "
        f"{args.verifier_dtype} verifier"
    ) as shown:
        try:
            result = trio.run(
                calibrate,
                args.path,
                args.executor_dtype,
                args.verifier_dtype,
                args.max_tokens,
                shown.note,
            )
        except EngineError as exc:
            raise UsageError(str(exc)) from None
    print(json.dumps(result.to_json(), indent=2))
    print("\n# for the model's [[inference.models]] entry (and its registration):")
    print(result.toml(), end="")
    return EXIT_OK


def cmd_gov(args: argparse.Namespace) -> int:
    """``joynode gov ACTION``: a ``gov.*`` control call, shown for people (or ``--json``)."""
    from joynode.governance import display
    from joynode.governance.actions import ProposalError, read_proposal_file

    action = args.gov_command
    method = f"gov.{action}"
    params: dict[str, Any] = {}
    if action == "delegate" and args.to:
        params["to"] = args.to
    elif action == "propose":
        try:  # read here: the file is the operator's, on this machine
            params = read_proposal_file(args.file).model_dump(exclude_none=True)
        except ProposalError as exc:
            raise UsageError(str(exc)) from None
    elif action == "list":
        params["limit"] = args.limit
    elif action in ("show", "vote", "queue", "execute", "cancel"):
        params["proposal"] = args.proposal
        if action == "vote":
            params.update(support=args.support, reason=args.reason)
    elif action == "dispute":
        params.update(request_id=args.request_id, reason=args.reason)

    def show(result: Any) -> None:
        if args.json:
            lines = [json.dumps(result, indent=2)]
        elif action == "status":
            lines = display.status_lines(result)
        elif action == "list":
            lines = display.list_lines(result)
        elif action == "show":
            lines = display.show_lines(result)
        else:
            lines = [display.outcome_line(method, result)]
        print("\n".join(lines))

    return _control_call(args.config, method, params, show)


def cmd_apikeys(args: argparse.Namespace) -> int:
    """``joynode apikeys ACTION``: an ``apikeys.*`` control call, shown for people."""
    action = args.apikeys_command
    params: dict[str, Any] = {}
    if action == "create":
        params = {"name": args.name, "rate_per_minute": args.rate_per_minute}
        if args.quota_tokens is not None:
            params["quota_tokens"] = args.quota_tokens
    elif action == "list":
        params = {"revoked": args.revoked}
    else:
        params = {"id": args.id}

    def line(key: dict[str, Any]) -> str:
        quota = key["quota_tokens"]
        used = f"{key['used_tokens']}/{quota}" if quota is not None else f"{key['used_tokens']}/-"
        revoked = " revoked" if key["revoked_at"] is not None else ""
        return (
            f"{key['id']}  {key['name']}  {key['rate_per_minute']}/min  "
            f"tokens {used}  requests {key['used_requests']}{revoked}"
        )

    def show(result: Any) -> None:
        if args.json:
            print(json.dumps(result, indent=2))
        elif action == "create":
            print(result["key"])
            print(
                f"API key {result['id']} ({result['name']}): shown this once, keep it secret",
                file=sys.stderr,
            )
        elif action == "list":
            print("\n".join(line(k) for k in result["keys"]) or "no API keys")
        else:
            print(line(result))

    return _control_call(args.config, f"apikeys.{action}", params, show)


def cmd_circuits(_: argparse.Namespace) -> int:
    from joynode.console import step
    from joynode.zk import circuits
    from joynode.zk.zokrates import ZokratesError, ZokratesWorker

    async def build_all() -> None:
        async with ZokratesWorker() as worker:
            for circuit in circuits.ALL:
                if circuit.built():
                    print(f"{circuit.name}: up to date ({circuit.build_dir})")
                    continue
                with step(f"{circuit.name}: compile, Groth16 setup (proving keys), verifier"):
                    await circuits.build(circuit, worker)

    try:
        trio.run(build_all)
    except (ZokratesError, OSError) as exc:
        raise UsageError(f"circuit build failed: {exc}") from None
    return EXIT_OK


def cmd_zk(args: argparse.Namespace) -> int:
    import numpy as np

    from joynode.zk.mlp import HIDDEN, IN, OUT, QuantizedMlp, commitments, save_weights
    from joynode.zk.zokrates import ZokratesError, ZokratesWorker

    shapes = {"w1": (HIDDEN, IN), "b1": (HIDDEN,), "w2": (OUT, HIDDEN), "b2": (OUT,)}
    try:
        document = json.loads(args.floats.read_text(encoding="utf-8"))
        layers = [np.asarray(document[name], dtype=np.float64) for name in shapes]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{args.floats}: not a float weights file ({exc})") from None
    for (name, shape), layer in zip(shapes.items(), layers, strict=True):
        if layer.shape != shape or not np.isfinite(layer).all():
            raise UsageError(f"{args.floats}: {name} must be finite numbers of shape {shape}")
    model, scale = QuantizedMlp.quantize(*layers)

    async def commitment() -> int:
        async with ZokratesWorker() as worker:
            return (await commitments(worker, model, [0] * IN))[0]

    try:
        weights_commitment = trio.run(commitment)
    except (ZokratesError, OSError) as exc:
        raise UsageError(f"ZoKrates: {exc} (run `joynode circuits build`?)") from None
    save_weights(args.out, model, scale, weights_commitment)
    print(
        json.dumps(
            {
                "weights_file": str(args.out),
                "weights_commitment": f"0x{weights_commitment:064x}",
                "scale": scale,
            },
            indent=2,
        )
    )
    return EXIT_OK


def cmd_devnet(args: argparse.Namespace) -> int:
    from joynode.devnet import (
        DevnetOptions,
        check_overrides,
        devnet_status,
        parse_override,
        run_until_signal,
    )

    if args.action == "status":
        running, lines = devnet_status(args.dir.resolve())
        print("\n".join(lines))
        return EXIT_OK if running else EXIT_FAILURE
    if not 1 <= args.nodes <= 16:
        raise UsageError("--nodes must be 1 to 16")
    if args.netns and os.geteuid() != 0:
        raise UsageError("--netns needs root (it makes network namespaces and a bridge)")
    try:
        overrides = tuple(parse_override(text) for text in args.set)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    options = DevnetOptions(
        args.dir.resolve(),
        args.nodes,
        args.model,
        args.models_dir.resolve(),
        args.demo,
        args.netns,
        overrides,
    )
    check_overrides(options)
    return run_until_signal(options)


def cmd_version(_: argparse.Namespace) -> int:
    print(f"joynode {__version__}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    home: Path = args.dir
    config_path = home / CONFIG_NAME
    if config_path.exists() and not args.force:
        raise UsageError(f"{config_path} already exists (use --force to overwrite)")
    home.mkdir(parents=True, exist_ok=True)
    config_path.write_text(render_default_config(), encoding="utf-8")
    config = load_config(config_path)
    _generate_secrets(config, force=args.force, password_file=args.password_file)
    print(f"created node home {home}")
    print(f"run it with: joynode run --config {config_path}")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from joynode.keys import NodeKey

    config = load_config(args.config)
    if args.keys_command == "generate":
        _generate_secrets(config, force=args.force, password_file=args.password_file)
        return EXIT_OK
    key = NodeKey.load(config.node.key_file, password_file=config.node.key_password_file)
    print(json.dumps({"address": key.address, "peer_id": key.peer_id}, indent=2))
    return EXIT_OK


def _generate_secrets(config: Config, *, force: bool, password_file: Path | None) -> None:
    from joynode.keys import NodeKey

    key_file, token_file = config.node.key_file, config.control.token_file
    if force or not key_file.exists():
        password = read_secret_file(password_file, "password file") if password_file else None
        key = NodeKey.generate()
        key.save(key_file, password=password, force=force)
        print(f"node key: {key_file} (address {key.address}, peer id {key.peer_id})")
    else:
        print(f"node key: {key_file} exists, kept")
    if force or not token_file.exists():
        ControlToken.generate().save(token_file, force=force)
        print(f"control token: {token_file}")
    else:
        print(f"control token: {token_file} exists, kept")


def cmd_run(args: argparse.Namespace) -> int:
    from joynode.keys import NodeKey
    from joynode.logs import SecretRedactor, configure_logging
    from joynode.node import Node
    from joynode.supervisor import ActorFailed

    config = load_config(args.config)
    redactor = SecretRedactor()
    configure_logging(
        args.log_level or config.log.level, args.log_format or config.log.format, redactor
    )
    key = NodeKey.load(config.node.key_file, password_file=config.node.key_password_file)
    token = ControlToken.load(config.control.token_file)
    redactor.add(key.secret.hex())
    redactor.add(token.value)
    try:
        trio.run(_serve_until_signal, Node(config, key, token))
    except BaseExceptionGroup as group:
        settings = [e for e in leaves(group) if isinstance(e, ConfigError)]
        if settings:
            # One line and exit 2, as a config file that does not load. What other actors
            # raised while the node stopped for it was logged by the supervisor.
            raise settings[0] from None
        failures, rest = group.split(ActorFailed)
        if failures is None or rest is not None:
            raise
        failed = [e for e in leaves(failures) if isinstance(e, ActorFailed)]
        names = sorted({e.actor for e in failed})
        log.error("node stopped because actor %s failed", ", ".join(names))
        return EXIT_FAILURE
    log.info("node stopped")
    # What is left is torn down by the exit; a final garbage collection of
    # vLLM's and torch's objects would only add seconds to it.
    gc.freeze()
    return EXIT_OK


async def _serve_until_signal(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def forward_signals() -> None:
                async for signum in signals:
                    await node.request_shutdown(f"received {signal.Signals(signum).name}")

            nursery.start_soon(forward_signals)
            await node.run()
            nursery.cancel_scope.cancel()


def cmd_ctl(args: argparse.Namespace) -> int:
    if args.method == "infer":
        if not args.params:
            raise UsageError('ctl infer needs a prompt: joynode ctl infer "PROMPT"')
        payment: Payment = "prepaid" if args.prepaid else "unpaid" if args.unpaid else "paid"
        return _infer(args.config, args.params, args.model, args.max_tokens, payment)
    params: dict[str, Any] | None = None
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as exc:
            raise UsageError(f"params are not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise UsageError("params must be a JSON object of named params")
    return _control_call(args.config, args.method, params)


def _print_json(result: Any) -> None:
    print(json.dumps(result, indent=2))


def _control_call(
    config_path: Path,
    method: str,
    params: dict[str, Any] | None,
    show: Callable[[Any], None] = _print_json,
) -> int:
    """Call one control method on the running node; show the result (exit 0) or the error."""
    config = load_config(config_path)
    token = ControlToken.load(config.control.token_file)
    url = _control_url(config)
    try:
        result = trio.run(_call, url, token.value, method, params)
    except RpcError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        print(f"joynode: cannot reach the node's control socket at {url}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    show(result)
    return EXIT_OK


def _infer(
    config_path: Path, prompt: str, model: str | None, max_tokens: int, payment: Payment
) -> int:
    """``infer.submit`` + ``job.wait`` with progress; the output, certificate and settlement."""
    from joynode.console import print_job, verified_inference

    config = load_config(config_path)
    token = ControlToken.load(config.control.token_file).value
    url = _control_url(config)

    try:
        job = trio.run(verified_inference, url, token, prompt, model, max_tokens, payment)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except RpcError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        print(f"joynode: cannot reach the node's control socket at {url}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print_job(job)
    return EXIT_OK if job.get("status") == "certified" else EXIT_FAILURE


def _control_url(config: Config) -> str:
    if config.control.listen.endswith(":0"):
        endpoints = Endpoints.read(config.node.data_dir)
        if endpoints is None:
            raise UsageError(
                "control.listen uses port 0 and the node has not published its endpoints "
                f"({config.node.data_dir}/endpoints.json): is it running?"
            )
        return endpoints.control_url
    return url("ws", *split_host_port(config.control.listen))


async def _call(url: str, token: str, method: str, params: dict[str, Any] | None) -> Any:
    streamed = False

    def show(notification: dict[str, Any]) -> None:
        # Streamed text (infer.delta) is shown as it arrives; other notifications as JSON.
        nonlocal streamed
        params = notification.get("params")
        if isinstance(params, dict) and isinstance(params.get("text"), str):
            sys.stderr.write(params["text"])
            streamed = True
        elif notification.get("method") == "job.progress" and isinstance(params, dict):
            from joynode.console import describe_job

            job = str(params.get("request_id", ""))[:14]
            sys.stderr.write(f"\rjob {job}: {describe_job(params)}   ")
            streamed = True
        elif notification.get("method") == "storage.progress" and isinstance(params, dict):
            sys.stderr.write("\r" + _describe_progress(params))
            streamed = True
        else:
            sys.stderr.write(json.dumps(notification) + "\n")
        sys.stderr.flush()

    async with ControlClient.connect(url, token, on_notification=show) as client:
        result = await client.call(method, params)
    if streamed:
        sys.stderr.write("\n")
    return result


def _describe_progress(progress: dict[str, Any]) -> str:
    """One status line for add/fetch progress, rewritten in place."""
    done = progress.get("bytes", 0) / 1e6
    total = progress.get("total_bytes")
    of_total = f" of {total / 1e6:.1f}" if isinstance(total, int) else ""
    peers = progress.get("peers")
    from_peers = f" from {peers} peer{'s' * (peers != 1)}" if isinstance(peers, int) else ""
    blocks = f", {progress['blocks']} blocks" if "blocks" in progress else ""
    return f"{progress.get('op', 'storage')}: {done:.1f}{of_total} MB{blocks}{from_peers}   "


_COMMANDS = {
    "init": cmd_init,
    "run": cmd_run,
    "ctl": cmd_ctl,
    "keys": cmd_keys,
    "deploy": cmd_deploy,
    "models": cmd_models,
    "gov": cmd_gov,
    "apikeys": cmd_apikeys,
    "verify": cmd_verify,
    "circuits": cmd_circuits,
    "zk": cmd_zk,
    "devnet": cmd_devnet,
    "version": cmd_version,
}
