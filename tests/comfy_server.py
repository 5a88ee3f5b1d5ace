"""A real ComfyUI server for the end-to-end tests: started from a ComfyUI tree with this pack in custom_nodes,
driven over HTTP (POST /prompt, GET /history, /object_info) and its websocket (progress, executed, errors).

The tree is copied into a temporary folder (without its `extra_model_paths.yaml`, which would point the model folders
elsewhere) and run with `--cpu --base-directory <tmp>`, so models, outputs and the user database stay in the test's
folder. Nothing of ComfyUI is stored in this repository.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from comfy_env import PACK_NAME, ROOT, STUBS

START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, tree: Path, workdir: Path, python: str = sys.executable):
        self.tree, self.workdir, self.python = Path(tree), Path(workdir), python
        self.base = self.workdir / "base"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.log_path = self.workdir / "server.log"

    def models(self, folder: str) -> Path:
        path = self.base / "models" / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self) -> "ComfyServer":
        code = self.workdir / "comfyui"
        top = os.path.abspath(self.tree)

        def skip(directory, names):  # its own model/output folders and the yaml that redirects them
            if os.path.abspath(directory) != top:
                return {"__pycache__"} & set(names)
            return {"extra_model_paths.yaml", "__pycache__", "models", "output", "input", "user"} & set(names)
        shutil.copytree(self.tree, code, ignore=skip)
        (self.base / "custom_nodes").mkdir(parents=True)
        (self.base / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(self.stub_paths()), PYTHONWARNINGS="ignore")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [self.python, "main.py", "--cpu", "--base-directory", str(self.base), "--port", str(self.port),
             "--listen", "127.0.0.1", "--disable-auto-launch"], cwd=code, env=env, stdout=self.log,
            stderr=subprocess.STDOUT)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start in {START_TIMEOUT_S} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.process is not None:
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stub_paths(self) -> list[str]:
        probe = subprocess.run([self.python, "-c", "import torchvision, torchaudio"], capture_output=True)
        return [str(STUBS)] if probe.returncode else []

    # --- HTTP ------------------------------------------------------------------------------------------------------

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post_json(self, path: str, value) -> int:
        request = urllib.request.Request(self.url + path, data=json.dumps(value).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status

    def post_prompt(self, prompt: dict, client_id: str) -> tuple[int, dict]:
        body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, prompt: dict, timeout: float = 300) -> "Run":
        """POST the API prompt and follow the websocket until the prompt ends; every message is kept."""
        return asyncio.run(self._run(prompt, timeout))

    async def _run(self, prompt: dict, timeout: float) -> "Run":
        import aiohttp
        client_id = uuid.uuid4().hex
        run = Run()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                run.status, run.response = self.post_prompt(prompt, client_id)
                if run.status != 200:
                    return run
                prompt_id = run.response["prompt_id"]
                deadline = time.time() + timeout
                while time.time() < deadline:
                    message = await ws.receive(timeout=max(deadline - time.time(), 1))
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    event = json.loads(message.data)
                    run.messages.append(event)
                    data = event.get("data", {})
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                        run.end = event["type"]
                        break
                    if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id"):
                        run.end = run.end or "executing_done"
                        break
        run.history = await self._history(prompt_id)
        return run

    async def _history(self, prompt_id: str, timeout: float = 30) -> dict:
        """The /history entry; the server stores it just after the last websocket message, so wait for it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:
                return entry
            await asyncio.sleep(0.2)
        return {}


class Run:
    """What one API prompt did: HTTP answer, websocket messages, how it ended, its /history entry."""

    def __init__(self):
        self.status, self.response, self.messages, self.end, self.history = None, {}, [], None, {}

    def of(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m["type"] == kind]

    def transcript(self) -> str:
        lines = [f"POST /prompt -> {self.status} {json.dumps(self.response)[:300]}"]
        for m in self.messages:
            data = m.get("data", {})
            if m["type"] == "progress":
                lines.append(f"ws progress node={data.get('node')} {data.get('value')}/{data.get('max')}")
            elif m["type"] == "executed":
                out = data.get("output") or {}
                lines.append(f"ws executed node={data.get('node')} output keys={sorted(out)} "
                             f"text={(out.get('text') or [''])[0][:200]}")
            elif m["type"] in ("crystools.monitor", "progress_state"):
                continue
            else:
                lines.append(f"ws {m['type']} {json.dumps(data)[:300]}")
        return "\n".join(lines)
