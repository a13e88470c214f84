"""Real agent frameworks run their tool loops through the bridge (emulator with scripted replies)."""
import json
import os
import shutil
import subprocess

import openai
import pytest

MODEL = "gemini-3-pro"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(arena, *replies):
    arena.configure(script=[[f"a0:{json.dumps(text)}", 'ad:{"finishReason":"stop"}'] for text in replies])


def call(name, **arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def kinds(arena):
    return ["follow-up" if "post-to-evaluation" in r["path"] else "new" for r in arena.chat_requests()]


def test_the_openai_agents_sdk_runs_a_function_tool_loop_to_its_answer(fresh, api_key, arena):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    asked = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return "sunny, 21 C"

    client = openai.AsyncOpenAI(base_url=fresh.base_url, api_key=api_key, max_retries=0)
    agent = agents.Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                         model=agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client))
    script(arena, call("get_weather", city="Paris"), "It is sunny in Paris, 21 C.")
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?")
    assert result.final_output == "It is sunny in Paris, 21 C." and asked == ["Paris"]
    assert kinds(arena) == ["new", "follow-up"]


def test_pydantic_ai_runs_a_tool_loop_to_its_answer(fresh, api_key, arena):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(openai_client=openai.AsyncOpenAI(base_url=fresh.base_url, api_key=api_key,
                                                                max_retries=0))
    agent = Agent(OpenAIChatModel(MODEL, provider=provider), instructions="Answer questions about time.")
    asked = []

    @agent.tool_plain
    def get_time(city: str) -> str:
        """The local time in a city."""
        asked.append(city)
        return "10:00"

    script(arena, call("get_time", city="Oslo"), "It is 10:00 in Oslo.")
    result = agent.run_sync("What time is it in Oslo?")
    assert result.output == "It is 10:00 in Oslo." and asked == ["Oslo"]
    assert kinds(arena) == ["new", "follow-up"]


OPENCODE = shutil.which("opencode") or os.path.join(ROOT, ".ci", "node", "node_modules", ".bin", "opencode")


@pytest.mark.skipif(not os.path.exists(OPENCODE), reason="opencode is not installed (npm install opencode-ai)")
def test_opencode_writes_a_file_with_its_tools(fresh, api_key, arena, tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    target = work / "hello.txt"
    models = {MODEL: {"name": MODEL}, "no-such-model": {"name": "no-such-model"}}
    (work / "opencode.json").write_text(json.dumps({
        "provider": {"bridge": {"npm": "@ai-sdk/openai-compatible", "name": "LM Arena Bridge", "models": models,
                                "options": {"baseURL": fresh.base_url, "apiKey": api_key}}},
        # Titles are asked of the small model: an unknown one fails at once, so every scripted reply goes to
        # the agent's own turns, whatever the order of opencode's requests.
        "model": f"bridge/{MODEL}", "small_model": "bridge/no-such-model", "autoupdate": False, "share": "disabled"}))
    script(arena, call("write", filePath=str(target), content="hi\n"), "Done: hello.txt written.")
    env = {**os.environ, "PWD": str(work), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CACHE_HOME": str(home / ".cache")}
    run = subprocess.run([OPENCODE, "run", "Create hello.txt containing hi"], cwd=work, env=env, timeout=180, check=False,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert target.read_text() == "hi\n" and "Done: hello.txt written." in run.stdout
    assert kinds(arena) == ["new", "follow-up"]
