"""Claude Code and Codex CLI, for real (issue 18): each CLI, installed from npm (tests/agents/package.json, which
.ci/run installs), runs against the bridge and the emulator, scripted so that the model asks for one shell
command that writes a file and then answers. Skipped when node or the packages are missing."""
import json
import os
import shutil
import subprocess

import pytest
from harness import ROOT

BIN = os.path.join(ROOT, "tests", "agents", "node_modules", ".bin")
MODEL = "gemini-3-pro"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not all(os.path.exists(os.path.join(BIN, c)) for c in ("claude", "codex")),
    reason="needs node and `npm install --prefix tests/agents`")


def reply(text: str) -> list[str]:
    return ["a0:" + json.dumps(text), 'ad:{"finishReason":"stop"}']


def call(name: str, arguments: dict) -> list[str]:
    return reply("<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>")


def run(command: list[str], cwd, env: dict) -> subprocess.CompletedProcess:
    home = os.path.join(cwd, "home")
    os.makedirs(home, exist_ok=True)
    return subprocess.run(command, check=False, cwd=cwd, env={"PATH": os.environ["PATH"], "HOME": home, **env},
                          text=True, capture_output=True, timeout=240, stdin=subprocess.DEVNULL)


def test_claude_code_runs_a_shell_command_and_reports_success(fresh, api_key, arena, tmp_path):
    target = tmp_path / "done.txt"
    arena.configure(script=[call("Bash", {"command": f"echo done > {target}", "description": "Write the file"}),
                            reply("I wrote done into the file.")])
    result = run([os.path.join(BIN, "claude"), "-p", f"Write the word done into {target}", "--output-format", "json",
                  "--allowedTools", "Bash"], tmp_path, {
        "ANTHROPIC_BASE_URL": fresh.url, "ANTHROPIC_API_KEY": api_key, "ANTHROPIC_MODEL": MODEL,
        "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
        # No session-title request: the scripted replies then meet the turns in order.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
    assert result.returncode == 0, result.stderr + result.stdout
    outcome = json.loads(result.stdout)
    assert outcome["subtype"] == "success" and not outcome["is_error"] and outcome["num_turns"] == 2
    assert outcome["result"] == "I wrote done into the file."
    assert target.read_text() == "done\n"
    _, second = arena.chat_requests()     # an agent turn with one command: two LM Arena requests
    assert "post-to-evaluation" in second["path"]


def test_codex_runs_a_shell_command_and_reports_success(fresh, api_key, arena, tmp_path):
    target = tmp_path / "done.txt"
    arena.configure(script=[call("exec_command", {"cmd": f"echo done > {target}"}),
                            reply("I wrote done into the file.")])
    codex_home = tmp_path / "codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(f"""model = "{MODEL}"
model_provider = "bridge"

[model_providers.bridge]
name = "LM Arena Bridge"
base_url = "{fresh.base_url}"
env_key = "BRIDGE_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
""")
    result = run([os.path.join(BIN, "codex"), "exec", "--skip-git-repo-check",
                  "--dangerously-bypass-approvals-and-sandbox", "--color", "never",
                  f"Write the word done into {target}"], tmp_path,
                 {"CODEX_HOME": str(codex_home), "BRIDGE_API_KEY": api_key})
    assert result.returncode == 0, result.stderr + result.stdout
    assert target.read_text() == "done\n"
    assert result.stdout.strip().endswith("I wrote done into the file.")
    _, second = arena.chat_requests()
    assert "post-to-evaluation" in second["path"]
