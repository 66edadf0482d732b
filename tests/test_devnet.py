"""``joynode devnet`` as an operator runs it: a real process tree (anvil, nodes), a real browser.

The first test starts a 2-node devnet on the tiny model, sends a paid
verified inference with ``joynode ctl infer``, opens node 0's dashboard in
headless Chromium (Debian's, driven by Playwright) until it shows the peer and
the certified job, and stops the devnet with SIGINT. The second starts the
same devnet again and checks that it reused everything.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from web3 import Web3

from joynode.chain.deploy import JOY, Deployment
from joynode.devnet import STAKE_JOY
from joynode.endpoints import Endpoints
from joynode.keys import ControlToken, NodeKey

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

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
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
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    running = Devnet(process, output, devnet_dir)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


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

    infer = subprocess.run(
        [sys.executable, "-m", "joynode", "ctl", "--config", str(config), "infer", "Hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert infer.returncode == 0, infer.stderr
    assert re.search(r"certificate\s+2 of 2 signed", infer.stdout), infer.stdout
    assert re.search(r"settlement\s+settled, tx\s+0x[0-9a-f]{64}", infer.stdout), infer.stdout

    token = ControlToken.load(devnet.dir / "node0" / "control.token").value
    assert node0.http_url is not None
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
