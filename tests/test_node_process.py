"""Real ``joynode`` processes in temp dirs, driven as an operator would."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection

from joynode import __version__
from joynode.control.client import ControlClient, open_control_websocket
from tests.factories import (
    NodeHome,
    NodeProcess,
    descendants,
    make_home,
    node_process,
    run_cli,
)
from tests.inference_fixtures import small_engine, tiny_model
from tests.test_zk_market import quantized_weights

__all__ = ["tiny_model"]  # a fixture used by name below

pytestmark = pytest.mark.slow


def test_version() -> None:
    result = run_cli("version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"joynode {__version__}"


def test_init_creates_a_private_home_and_refuses_to_overwrite(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli("init", str(home))
    assert result.returncode == 0, result.stderr
    for secret in ("node.key", "control.token"):
        assert stat.S_IMODE((home / secret).stat().st_mode) == 0o600
    key_before = (home / "node.key").read_text()

    again = run_cli("init", str(home))
    assert again.returncode == 2
    assert "already exists (use --force to overwrite)" in again.stderr
    assert (home / "node.key").read_text() == key_before

    forced = run_cli("init", str(home), "--force")
    assert forced.returncode == 0
    assert (home / "node.key").read_text() != key_before


def test_keys_show_prints_identity_never_the_secret(home: NodeHome) -> None:
    result = run_cli("keys", "show", "--config", str(home.config_path))
    assert result.returncode == 0
    shown = json.loads(result.stdout)
    assert shown == {"address": home.key.address, "peer_id": home.key.peer_id}
    assert home.key.secret.hex() not in result.stdout + result.stderr


def test_keys_generate_fills_in_only_what_is_missing(home: NodeHome) -> None:
    key_before = home.config.node.key_file.read_text()
    home.config.control.token_file.unlink()
    result = run_cli("keys", "generate", "--config", str(home.config_path))
    assert result.returncode == 0
    assert "exists, kept" in result.stdout
    assert home.config.node.key_file.read_text() == key_before
    assert home.config.control.token_file.exists()


def test_encrypted_keystore_home(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("s3cret-pass")
    password_file.chmod(0o600)
    result = run_cli("init", str(tmp_path / "home"), "--password-file", str(password_file))
    assert result.returncode == 0, result.stderr
    keystore = json.loads((tmp_path / "home" / "node.key").read_text())
    assert "crypto" in keystore
    config = tmp_path / "home" / "joynode.toml"
    denied = run_cli("keys", "show", "--config", str(config))
    assert denied.returncode == 2
    assert "encrypted keystore" in denied.stderr
    text = config.read_text().replace(
        '# key_password_file = ""', f'key_password_file = "{password_file}"'
    )
    config.write_text(text)
    shown = run_cli("keys", "show", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["address"].startswith("0x")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("control", "listen", '"not-an-address"'), "control.listen: not host:port"),
        (("http", "max_connections", "0"), "http.max_connections: Input should be greater"),
        (("log", "format", '"xml"'), "log.format: Input should be 'text' or 'json'"),
    ],
)
@pytest.mark.parametrize("command", [["run"], ["ctl", "node.status"], ["keys", "show"]])
def test_bad_config_exits_2_with_one_clear_message(
    home: NodeHome, edit: tuple[str, str, str], message: str, command: list[str]
) -> None:
    home.set(*edit)
    result = run_cli(*command, "--config", str(home.config_path))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"joynode: invalid config {home.config_path}:")


def test_missing_key_exits_2(home: NodeHome) -> None:
    home.config.node.key_file.unlink()
    result = run_cli("run", "--config", str(home.config_path))
    assert result.returncode == 2
    assert "node key file" in result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctl_status_and_errors_against_a_running_node(home: NodeHome) -> None:
    with node_process(home):
        result = run_cli("ctl", "--config", str(home.config_path), "node.status")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["address"] == home.key.address
        assert all(a["state"] == "ready" for a in status["actors"].values())

        missing = run_cli("ctl", "--config", str(home.config_path), "node.nope")
        assert missing.returncode == 1
        assert missing.stderr.startswith("error -32601: method not found: node.nope")

        bad_params = run_cli("ctl", "--config", str(home.config_path), "node.status", "[1]")
        assert bad_params.returncode == 2
        assert "params must be a JSON object" in bad_params.stderr


def test_ctl_without_a_running_node(home: NodeHome) -> None:
    result = run_cli("ctl", "--config", str(home.config_path), "node.status")
    assert result.returncode == 2
    assert "is it running?" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_node_cleanly_within_5_s(home: NodeHome, sig: int) -> None:
    process = NodeProcess(home)
    try:
        process.wait_ready()
        began = time.monotonic()
        code = process.stop(sig)
        elapsed = time.monotonic() - began
    finally:
        process.kill()
    assert code == 0, process.log()
    assert elapsed < 5.0
    assert "node stopped" in process.log()
    assert home.endpoints() is None


def test_ctl_shutdown_stops_the_process(home: NodeHome) -> None:
    process = NodeProcess(home)
    try:
        process.wait_ready()
        result = run_cli("ctl", "--config", str(home.config_path), "node.shutdown")
        assert json.loads(result.stdout) == {"stopping": True}
        assert process.proc.wait(5) == 0
    finally:
        process.kill()


@contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def listen_on_busy_port(section: str, home: NodeHome, port: int, _: Path) -> str:
    home.set(section, "listen", f'"127.0.0.1:{port}"')
    return f"{section}.listen: cannot listen on 127.0.0.1:{port}: Address already in use"


def p2p_on_busy_port(home: NodeHome, port: int, _: Path) -> str:
    home.set("p2p", "listen", f'["/ip4/127.0.0.1/tcp/{port}"]')
    return f"p2p.listen: cannot listen on /ip4/127.0.0.1/tcp/{port}: Address already in use"


def p2p_on_an_address_not_here(home: NodeHome, _: int, __: Path) -> str:
    home.set("p2p", "listen", '["/ip4/192.0.2.1/tcp/0"]')  # TEST-NET-1: never local
    return "p2p.listen: cannot listen on /ip4/192.0.2.1/tcp/0: Cannot assign requested address"


def http_on_an_address_not_here(home: NodeHome, _: int, __: Path) -> str:
    home.set("http", "listen", '"192.0.2.1:0"')
    return "http.listen: cannot listen on 192.0.2.1:0: Cannot assign requested address"


def data_dir_inside_a_file(home: NodeHome, _: int, tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    home.set("node", "data_dir", f'"{tmp_path}/a-file/data"')
    return f"node.data_dir: cannot create {tmp_path}/a-file/data: Not a directory"


def model_path_not_a_model(home: NodeHome, _: int, tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    home.set("inference", "models", f'[{{name = "m", path = "{tmp_path}/empty"}}]')
    return f"inference.models[0].path: {tmp_path}/empty is not a model folder (no config.json)"


def zk_weights_missing(home: NodeHome, _: int, tmp_path: Path) -> str:
    home.set("zk", "models", f'[{{name = "m", weights = "{tmp_path}/none.json"}}]')
    return (
        f"zk.models[0].weights: zk model m: {tmp_path}/none.json: [Errno 2] "
        f"No such file or directory: '{tmp_path}/none.json'"
    )


@pytest.mark.parametrize(
    "mistake",
    [
        partial(listen_on_busy_port, "http"),
        partial(listen_on_busy_port, "control"),
        p2p_on_busy_port,
        p2p_on_an_address_not_here,
        http_on_an_address_not_here,
        data_dir_inside_a_file,
        model_path_not_a_model,
        zk_weights_missing,
    ],
    ids=lambda mistake: getattr(mistake, "__name__", None) or mistake.args[0] + "_busy_port",
)
def test_a_setting_this_machine_cannot_honour_ends_in_one_line_and_exit_2(
    home: NodeHome, tmp_path: Path, mistake: Callable[[NodeHome, int, Path], str]
) -> None:
    with busy_port() as port:
        message = mistake(home, port, tmp_path)
        result = run_cli("run", "--config", str(home.config_path), "--log-level", "warning")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"joynode: {message}"]


def test_a_busy_port_at_the_default_log_level_still_ends_in_one_clear_line(
    home: NodeHome, tmp_path: Path
) -> None:
    with busy_port() as port:
        message = listen_on_busy_port("http", home, port, tmp_path)
        result = run_cli("run", "--config", str(home.config_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert " ERROR " not in result.stderr  # said once, by the command line
    assert result.stderr.splitlines()[-1] == f"joynode: {message}"
    assert "actor p2p ready" in result.stderr  # it got that far, and stopped what it started


def test_batch_invariance_on_a_cpu_build_ends_in_one_line_and_exit_2(
    home: NodeHome, tiny_model: Path
) -> None:
    small_engine(home).set("inference", "models", f'[{{name = "tiny", path = "{tiny_model}"}}]')
    home.set("inference", "batch_invariant", "true")
    result = run_cli("run", "--config", str(home.config_path), "--log-level", "warning")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "joynode: inference.models[0]: inference.batch_invariant needs vLLM's CUDA build "
        "(its batch-invariant kernels run on GPUs); the installed vLLM runs on 'cpu'"
    ]


INJECTED_FAILURE = """
import sys
from joynode.http import HttpServer

async def broken(self, *, task_status):
    task_status.started()
    raise RuntimeError("a bug in the http actor")

HttpServer.run = broken
from joynode.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_actor_failing_while_running_stops_the_node_with_exit_1(home: NodeHome) -> None:
    result = subprocess.run(
        [sys.executable, "-c", INJECTED_FAILURE, "run", "--config", str(home.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "actor http failed" in result.stderr
    assert "RuntimeError: a bug in the http actor" in result.stderr  # a bug keeps its traceback
    assert result.stderr.splitlines()[-1].endswith("node stopped because actor http failed")


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_node_killed_with_sigkill_leaves_no_process_behind(
    home: NodeHome,
    tmp_path: Path,
    tiny_model: Path,
    start_method: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # vLLM forks its engine core on CPU and spawns it once CUDA is up (GPUs): both are tied.
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", start_method)
    small_engine(home).set("inference", "models", f'[{{name = "tiny", path = "{tiny_model}"}}]')
    expected = ["VLLM::EngineCore"]
    if start_method == "fork":  # and the programs the node runs: anvil, the ZoKrates worker
        weights, _ = trio.run(quantized_weights, tmp_path)
        home.set("zk", "models", f'[{{name = "mlp", weights = "{weights}"}}]')
        home.set("chain", "mode", '"local"')
        expected += ["anvil", "zokrates.mjs worker"]
    process = NodeProcess(home)
    try:
        process.wait_ready(within_s=240)
        tree = descendants(process.proc.pid)
        commands = "\n".join(p.command for p in tree)
        for name in expected:
            assert name in commands
        os.kill(process.proc.pid, signal.SIGKILL)  # the node alone, not its process group
        process.proc.wait()
        deadline = time.monotonic() + 30
        while (left := [p for p in tree if p.alive()]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [], f"outlived the node: {left}"
    finally:
        process.kill()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_never_contain_the_key_or_token(home: NodeHome, log_format: str) -> None:
    secrets = (home.key.secret.hex(), home.token.value)
    with node_process(home, "--log-format", log_format, "--log-level", "debug") as process:

        async def poke() -> None:
            endpoints = home.endpoints()
            assert endpoints is not None
            async with ControlClient.connect(endpoints.control_url, home.token.value) as client:
                await client.call("node.status")
            async with open_control_websocket(endpoints.control_url) as ws:
                for token in (home.token.value, "wrong" + home.token.value):
                    await ws.send_message(
                        json.dumps(
                            {
                                "jsonrpc": "2.0",
                                "id": 1,
                                "method": "auth",
                                "params": {"token": token},
                            }
                        )
                    )
                    await ws.get_message()

        trio.run(poke)
        assert process.stop() == 0
        log = process.log()
    assert "node ready" in log
    for secret in secrets:
        assert secret not in log
    if log_format == "json":
        entries = [json.loads(line) for line in log.splitlines() if line.strip()]
        assert {"ts", "level", "logger", "msg"} <= set(entries[0])


# Fuzzing the control socket of one long-running process.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
methods = st.sampled_from(["node.status", "auth", "", "node", "rpc.discover"]) | st.text(
    max_size=20
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]) | json_values,
        "id": st.integers() | st.text(max_size=8) | json_values,
        "method": methods.filter(lambda m: m != "node.shutdown") | json_values,
        "params": json_values,
    },
)
frames = st.one_of(
    requests.map(json.dumps),
    st.lists(requests, max_size=4).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
)


@pytest.fixture(scope="module")
def fuzzed_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHome]:
    home = make_home(tmp_path_factory.mktemp("fuzz") / "node")
    home.set("control", "max_frame_bytes", "1024")
    with node_process(home) as process:
        yield home
        assert process.proc.poll() is None, process.log()


async def sentinel_round(ws: WebSocketConnection, request_id: str) -> list[Any]:
    """Send a known request after the fuzz frame; return every message up to its reply."""
    await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "node.status"}))
    seen = []
    while True:
        message = json.loads(await ws.get_message())
        seen.append(message)
        if isinstance(message, dict) and message.get("id") == request_id:
            return seen


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fuzz=st.lists(frames, min_size=1, max_size=5), authenticated=st.booleans())
async def test_fuzzed_frames_never_hurt_the_node(
    fuzzed_node: NodeHome, fuzz: list[str | bytes], authenticated: bool
) -> None:
    endpoints = fuzzed_node.endpoints()
    assert endpoints is not None
    token = fuzzed_node.token.value
    async with ControlClient.connect(endpoints.control_url, token) as bystander:
        try:
            async with open_control_websocket(
                endpoints.control_url, token if authenticated else None
            ) as ws:
                for index, frame in enumerate(fuzz):
                    await ws.send_message(frame)
                    for message in await sentinel_round(ws, f"sentinel-{index}"):
                        # Everything that comes back is a well-formed JSON-RPC response.
                        for item in message if isinstance(message, list) else [message]:
                            assert item["jsonrpc"] == "2.0"
                            assert ("result" in item) != ("error" in item)
                    status = await bystander.call("node.status")
                    assert status["actors"]["control"]["state"] == "ready"
        except ConnectionClosed as closed:
            close_code = closed.reason.code if closed.reason else None
        else:
            close_code = None
        # The only reason to hang up on a client is repeated failed auth.
        assert close_code in (None, 1008)
        assert (await bystander.call("node.status"))["address"] == fuzzed_node.key.address


def test_fuzzed_node_still_serves_ctl(fuzzed_node: NodeHome) -> None:
    result = run_cli("ctl", "--config", str(fuzzed_node.config_path), "node.status")
    assert result.returncode == 0, result.stderr
