"""``joynode devnet`` as an operator runs it: a real process tree (anvil, nodes), a real browser.

The first test starts a 2-node devnet on the tiny model, sends a paid
verified inference with ``joynode ctl infer``, opens node 0's dashboard in
headless Chromium (Debian's, driven by Playwright) until it shows the peer and
the certified job, and stops the devnet with SIGINT. The second starts the
same devnet again and checks that it reused everything. The third SIGKILLs a
node, then anvil, of the running devnet: each shows as down in one line, the
rest keeps running, each comes back, and the restarted node serves a paid job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from web3 import Web3

from joynode.chain.deploy import JOY, Deployment
from joynode.devnet import STAKE_JOY
from joynode.endpoints import Endpoints
from joynode.keys import NodeKey
from joynode.secret_files import ControlToken
from tests.factories import run_cli

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",  # root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",  # nothing may dial out
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
READY_S = 300


@dataclass
class Devnet:
    process: subprocess.Popen[bytes]
    output: Path
    dir: Path

    def wait_ready(self) -> str:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            text = self.output.read_text(errors="replace")
            if "devnet ready" in text:
                return text
            assert self.process.poll() is None, f"devnet exited:\n{text}"
            time.sleep(0.5)
        raise AssertionError(f"devnet not ready in {READY_S} s:\n{self.output.read_text()}")

    def endpoints(self, index: int) -> Endpoints:
        endpoints = Endpoints.read(self.dir / f"node{index}" / "data")
        assert endpoints is not None
        return endpoints

    def status(self) -> dict[str, Any]:
        """The devnet's own account of its processes (DIR/devnet.json)."""
        data: dict[str, Any] = json.loads((self.dir / "devnet.json").read_text())
        return data

    def wait_until(
        self, condition: Callable[[], bool], what: str, within_s: float = READY_S
    ) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if condition():
                return
            assert self.process.poll() is None, f"devnet exited:\n{self.output.read_text()}"
            time.sleep(0.2)
        raise AssertionError(f"not within {within_s} s: {what}\n{self.output.read_text()}")

    def stop(self) -> str:
        """Ctrl-C, as a terminal sends it: SIGINT to the devnet's whole process group."""
        os.killpg(self.process.pid, signal.SIGINT)
        assert self.process.wait(timeout=60) == 0, self.output.read_text()
        return self.output.read_text(errors="replace")


@pytest.fixture(scope="module")
def devnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devnet")


@pytest.fixture
def devnet(devnet_dir: Path) -> Iterator[Devnet]:
    output = devnet_dir / f"devnet-{time.monotonic_ns()}.out"
    command = [sys.executable, "-m", "joynode", "devnet", "--nodes", "2", "--model", "tiny"]
    command += ["--dir", str(devnet_dir), "--models-dir", str(devnet_dir / "models")]
    with output.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = Devnet(process, output, devnet_dir)
    try:
        yield running
    finally:
        if process.poll() is None:  # a failed test: stop it as Ctrl-C would, nodes first
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def joynet_of(answer: Any) -> Any:
    """The ``joynet`` extension field of an OpenAI client's answer or chunk."""
    extra = answer.model_extra
    assert extra is not None
    return extra["joynet"]


def ctl(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "joynode", "ctl", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def in_session(session: int) -> list[int]:
    """Live processes in ``session`` (what a node started, e.g. vLLM's engine core)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) == session:
                found.append(int(pid))
        except ProcessLookupError:
            continue
    return found


def joynode_processes(devnet_dir: Path) -> list[str]:
    """Command lines of live processes that belong to this devnet (nodes, anvil)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(devnet_dir) in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def test_devnet_serves_a_paid_inference_and_a_live_dashboard_then_stops_cleanly(
    devnet: Devnet,
) -> None:
    devnet.wait_ready()
    node0 = devnet.endpoints(0)
    config = devnet.dir / "node0" / "joynode.toml"

    infer = ctl(config, "infer", "Hello")
    assert infer.returncode == 0, infer.stderr
    # Every node is a SovereignRPC provider of both chains, with its deposit.
    for chain_id in (31337, 31338):
        listed = ctl(config, "rpc.providers", json.dumps({"chain_id": chain_id}))
        assert listed.returncode == 0, listed.stderr
        assert [p["active"] for p in json.loads(listed.stdout)] == [True] * 2, listed.stdout
    assert re.search(r"certificate\s+2 of 2 signed", infer.stdout), infer.stdout
    assert re.search(r"settlement\s+settled, tx\s+0x[0-9a-f]{64}", infer.stdout), infer.stdout

    # curl, through the OpenAI-compatible API with a key made by the CLI: certified answers,
    # whole and streamed (server-sent events ending in [DONE], the certificate just before).
    assert node0.http_url is not None
    made = run_cli("apikeys", "create", "curl", "--config", str(config))
    assert made.returncode == 0, made.stderr
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    for stream in (False, True):
        curl = subprocess.run(
            ["/usr/bin/curl", "-sS", "-N", "--fail-with-body", "--max-time", "120",
             f"{node0.http_url}/v1/chat/completions",
             "-H", f"authorization: Bearer {made.stdout.strip()}",
             "-H", "content-type: application/json",
             "-d", json.dumps({**chat, "stream": stream})],
            capture_output=True, text=True, timeout=150,
        )  # fmt: skip
        assert curl.returncode == 0, curl.stdout + curl.stderr
        if stream:
            events = [line[6:] for line in curl.stdout.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            answer = json.loads(events[-2])
        else:
            answer = json.loads(curl.stdout)
        certificate = answer["joynet"]["certificate"]
        assert len(certificate["signers"]) == 2, answer
        assert answer["joynet"]["verification"] == "committee"
    # The official client, text completions, whole and streamed.
    with openai.OpenAI(
        base_url=node0.http_url + "/v1", api_key=made.stdout.strip(), max_retries=0
    ) as client:
        whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0)
        assert len(joynet_of(whole)["certificate"]["signers"]) == 2
        chunks = list(
            client.completions.create(
                model="tiny", prompt="Hello", max_tokens=8, temperature=0, stream=True
            )
        )
        assert joynet_of(chunks[-1])["certificate"]["signers"]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text

    # Every node serves both devnet chains at /rpc/{chain_id}, with the same keys.
    node1 = devnet.endpoints(1)
    assert node1.http_url is not None
    made1 = run_cli(
        "apikeys", "create", "web3", "--config", str(devnet.dir / "node1" / "joynode.toml")
    )
    for endpoints, key in ((node0, made.stdout.strip()), (node1, made1.stdout.strip())):
        for chain_id in (31337, 31338):
            w3 = Web3(
                Web3.HTTPProvider(
                    f"{endpoints.http_url}/rpc/{chain_id}",
                    request_kwargs={"headers": {"authorization": f"Bearer {key}"}},
                )
            )
            assert w3.eth.chain_id == chain_id
            assert w3.eth.get_block("latest")["number"] >= 0

    token = ControlToken.load(devnet.dir / "node0" / "control.token").value
    screenshot = devnet.dir / "dashboard.png"
    with sync_playwright() as playwright:
        assert CHROMIUM.exists(), "Debian's chromium is missing: run `make browser`"
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{node0.http_url}/#token={token}")
            page.wait_for_selector("#conn:text-is('live')", timeout=30_000)
            page.wait_for_selector('#peer-list li.peer[data-state="up"]', timeout=30_000)
            page.wait_for_selector('#job-table tr.job[data-status="certified"]', timeout=30_000)
            assert token not in page.url  # the page keeps the token out of the address bar
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    with Image.open(screenshot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 16, "the screenshot is blank"

    pids = [devnet.endpoints(i).pid for i in range(2)]
    output = devnet.stop()
    assert "devnet stopped" in output
    assert "is down" not in output  # the Ctrl-C reached the devnet, not anvil or a node
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"node process {pid} outlived the devnet"
    assert joynode_processes(devnet.dir) == []
    assert Endpoints.read(devnet.dir / "node0" / "data") is None  # nodes stopped cleanly


def test_devnet_started_again_reuses_its_chain_homes_and_stake(devnet: Devnet) -> None:
    keys = {i: NodeKey.load(devnet.dir / f"node{i}" / "node.key").address for i in range(2)}
    deployment = Deployment.read(devnet.dir / "chain" / "deployment.json")
    devnet.wait_ready()
    assert Deployment.read(devnet.dir / "chain" / "deployment.json") == deployment  # not redeployed
    rpc = re.search(r"chain (http://127\.0\.0\.1:\d+)", devnet.output.read_text())
    assert rpc is not None
    w3 = Web3(Web3.HTTPProvider(rpc.group(1)))
    assert deployment.is_live_on(w3)  # anvil reloaded its state
    coordinator = deployment.contract(w3, "NodeCoordinator")
    for i, address in keys.items():
        assert NodeKey.load(devnet.dir / f"node{i}" / "node.key").address == address
        assert coordinator.functions.nodeInfo(address).call()[0] == STAKE_JOY * JOY  # not twice
    # The job certified in the first run is still in node 0's database.
    assert (devnet.dir / "node0" / "data" / "state.db").exists()
    devnet.stop()
    assert joynode_processes(devnet.dir) == []


def test_devnet_restarts_a_killed_node_and_anvil_while_the_rest_keeps_running(
    devnet: Devnet,
) -> None:
    devnet.wait_ready()
    before = devnet.status()
    node0_pid, victim = before["nodes"][0]["pid"], before["nodes"][1]["pid"]
    assert before["nodes"][1]["state"] == "up"
    assert in_session(victim)  # the node and its engine core

    os.kill(victim, signal.SIGKILL)
    devnet.wait_until(
        lambda: devnet.status()["nodes"][1]["state"] != "up", "the devnet sees node 1 down", 30
    )
    log = devnet.dir / "node1" / "node.log"
    down = [line for line in devnet.output.read_text().splitlines() if "node 1 is down" in line]
    assert len(down) == 1, down
    # (what it left running, e.g. vLLM's engine core, is killed and counted)
    left = r"(; \d+ process\(es\) it left running killed)?"
    assert re.fullmatch(
        rf"node 1 is down: killed by SIGKILL; log {re.escape(str(log))}{left}; restarting in 1 s",
        down[0],
    ), down[0]
    # Node 0 keeps running and answering while node 1 is away.
    node0 = devnet.dir / "node0" / "joynode.toml"
    answered = ctl(node0, "node.status")
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["address"] == before["nodes"][0]["address"]

    devnet.wait_until(
        lambda: devnet.status()["nodes"][1]["state"] == "up", "node 1 is up again", READY_S
    )
    after = devnet.status()
    restarted = after["nodes"][1]
    # (a second try, on new ports, if one of its ports was taken while it was down)
    assert restarted["restarts"] >= 1
    assert restarted["pid"] != victim
    assert restarted["exits"][0]["status"] == "killed by SIGKILL"
    assert restarted["exits"][0]["pid"] == victim
    assert in_session(victim) == []  # nothing of the dead node is left running
    assert after["nodes"][0]["pid"] == node0_pid
    assert after["nodes"][0]["restarts"] == 0
    status = subprocess.run(
        [sys.executable, "-m", "joynode", "devnet", "status", "--dir", str(devnet.dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert re.search(
        r"node 1 +up for \d+ s \(pid \d+\), \d restart\(s\), last exit: ",
        status.stdout,
    ), status.stdout
    assert "governance: JoyGovernor 0x" in status.stdout
    assert re.search(r"second chain \(id 31338\) http://\S+ up for", status.stdout), status.stdout

    # anvil dies too: restarted on the same address from its saved state.
    chain = after["chain"]
    os.kill(chain["pid"], signal.SIGKILL)
    devnet.wait_until(
        lambda: (
            devnet.status()["chain"]["restarts"] == 1 and devnet.status()["chain"]["state"] == "up"
        ),
        "anvil is up again",
        60,
    )
    assert devnet.status()["chain"]["url"] == chain["url"]
    assert "anvil is down: killed by SIGKILL" in devnet.output.read_text()

    # The restarted node serves a paid job with node 0, on the restarted chain.
    node1 = devnet.dir / "node1" / "joynode.toml"
    devnet.wait_until(
        lambda: all('"up"' in ctl(config, "peers.list").stdout for config in (node0, node1)),
        "nodes 0 and 1 see each other up",
        120,
    )
    infer = ctl(node1, "infer", "Hello again")
    assert infer.returncode == 0, infer.stderr
    assert re.search(r"certificate\s+2 of 2 signed", infer.stdout), infer.stdout
    assert re.search(r"settlement\s+settled, tx\s+0x[0-9a-f]{64}", infer.stdout), infer.stdout

    output = devnet.stop()
    assert "Traceback" not in output
    assert joynode_processes(devnet.dir) == []


def test_devnet_refuses_a_bad_setting_in_one_line_and_status_says_none_runs(
    tmp_path: Path,
) -> None:
    for setting, error in (
        ("consensus.nope=1", "consensus.nope: unknown key"),
        ("consensus.commit_timeout_s=-1", "consensus.commit_timeout_s: Input should be greater"),
        ("nodot", "--set 'nodot': expected SECTION.KEY=VALUE"),
    ):
        refused = run_cli("devnet", "--dir", str(tmp_path), "--set", setting)
        assert refused.returncode == 2, refused.stderr
        assert error in refused.stderr
        assert "Traceback" not in refused.stderr
    assert not (tmp_path / "node0").exists()  # nothing was started
    status = run_cli("devnet", "status", "--dir", str(tmp_path))
    assert status.returncode == 1
    assert status.stdout.strip() == f"no devnet has run in {tmp_path}"
