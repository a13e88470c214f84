"""Conversations: the whole history a client resends is honoured, follow-ups reuse the held evaluation,
and context survives a restart (issue: context is never lost silently)."""
import httpx

MODEL = "gemini-3-pro"


def send(proc, key, messages, model=MODEL):
    response = httpx.post(proc.url + "/v1/chat/completions", json={"model": model, "messages": messages},
                          headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def converse(proc, key, turns, history=None):
    """Send each user turn with the full history so far, as stateless clients do."""
    history = list(history or [])
    for text in turns:
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": send(proc, key, history)})
    return history


def kinds(arena):
    return [("follow-up" if "post-to-evaluation" in r["path"] else "new", r["json"]["userMessage"]["content"])
            for r in arena.chat_requests()]


def test_three_turns_send_only_the_new_message_as_follow_ups(fresh, api_key, arena):
    history = converse(fresh, api_key, ["one", "two", "three"])
    assert [m["content"] for m in history if m["role"] == "assistant"] == ["turn 1: one", "turn 2: two", "turn 3: three"]
    assert kinds(arena) == [("new", "one"), ("follow-up", "two"), ("follow-up", "three")]
    ids = {r["json"]["id"] for r in arena.chat_requests()}
    assert len(ids) == 1


def test_history_the_bridge_never_saw_reaches_the_arena_as_a_transcript(fresh, api_key, arena):
    reply = send(fresh, api_key, [{"role": "system", "content": "Be terse."},
                                  {"role": "user", "content": "my name is Ada"},
                                  {"role": "assistant", "content": "Hello Ada"},
                                  {"role": "user", "content": "what is my name?"}])
    [request] = arena.chat_requests()
    sent = request["json"]["userMessage"]["content"]
    assert "create-evaluation" in request["path"]
    assert sent == "[System]\nBe terse.\n\n[User]\nmy name is Ada\n\n[Assistant]\nHello Ada\n\n[User]\nwhat is my name?"
    assert reply.startswith("turn 1: [System]")


def test_context_survives_a_bridge_restart(fresh, api_key, arena):
    history = converse(fresh, api_key, ["one", "two"])
    fresh.restart()
    fresh.wait_for_models()
    converse(fresh, api_key, ["three"], history)
    assert kinds(arena)[-1] == ("follow-up", "three")
    assert arena.evaluations[arena.chat_requests()[-1]["json"]["id"]]["messages"][-1]["content"] == "turn 3: three"


def test_an_edited_earlier_turn_opens_a_new_evaluation_with_the_edited_history(fresh, api_key, arena):
    history = converse(fresh, api_key, ["one", "two"])
    history[0]["content"] = "uno"
    history.append({"role": "user", "content": "three"})
    send(fresh, api_key, history)
    last = arena.chat_requests()[-1]
    assert "create-evaluation" in last["path"] and "[User]\nuno" in last["json"]["userMessage"]["content"]


def test_regenerate_does_not_append_a_duplicate_turn(fresh, api_key, arena):
    history = converse(fresh, api_key, ["one", "two"])
    first_evaluation = arena.chat_requests()[0]["json"]["id"]
    send(fresh, api_key, history[:-1])          # the same history without the last reply: "regenerate"
    held = arena.evaluations[first_evaluation]["messages"]
    assert [m["content"] for m in held if m["role"] == "user"] == ["one", "two"]
    last = arena.chat_requests()[-1]
    assert "create-evaluation" in last["path"] and last["json"]["id"] != first_evaluation


def test_whitespace_and_the_sources_footer_do_not_break_a_follow_up(fresh, api_key, arena):
    history = [{"role": "user", "content": "where"}]
    reply = send(fresh, api_key, history, model="gemini-3-pro-grounding")
    assert "\n\nSources:\n" in reply
    trimmed = reply.split("\n\nSources:")[0] + "  "
    send(fresh, api_key, [{"role": "user", "content": " where "}, {"role": "assistant", "content": trimmed},
                          {"role": "user", "content": "and then?"}], model="gemini-3-pro-grounding")
    assert kinds(arena)[-1] == ("follow-up", "and then?")


def test_two_chats_with_the_same_opening_line_get_two_evaluations(fresh, api_key, arena):
    send(fresh, api_key, [{"role": "user", "content": "hello"}])
    send(fresh, api_key, [{"role": "user", "content": "hello"}])
    assert len({r["json"]["id"] for r in arena.chat_requests()}) == 2


def test_another_api_key_never_reuses_an_evaluation(fresh, api_key, arena):
    history = converse(fresh, api_key, ["one"])
    other = fresh.create_key(name="other")
    send(fresh, other, history + [{"role": "user", "content": "two"}])
    first, second = arena.chat_requests()
    assert "create-evaluation" in second["path"] and second["json"]["id"] != first["json"]["id"]


def test_a_different_model_opens_a_new_evaluation(fresh, api_key, arena):
    history = converse(fresh, api_key, ["one"])
    send(fresh, api_key, history + [{"role": "user", "content": "two"}], model="grok-4.1-thinking")
    assert kinds(arena)[-1][0] == "new"


def test_follow_up_stays_on_the_account_that_opened_the_conversation(fresh, api_key, arena):
    first, second = arena.new_session(), arena.new_session()
    fresh.set_accounts(first, second)
    converse(fresh, api_key, ["one", "two", "three"])
    users = {arena.session_user(r["cookies"]["arena-auth-prod-v1"]) for r in arena.chat_requests()}
    assert len(users) == 1


def test_when_the_owning_account_cannot_serve_the_history_moves_to_another(fresh, api_key, arena):
    owner, spare = arena.new_session(), arena.new_session()
    fresh.set_accounts(owner, spare)
    history = converse(fresh, api_key, ["one"])
    arena.fault(times=5, status=429, headers={"retry-after": "60"}, user=arena.session_user(owner))
    converse(fresh, api_key, ["two"], history)
    last = arena.chat_requests()[-1]
    assert "create-evaluation" in last["path"] and last["cookies"]["arena-auth-prod-v1"] == spare
    assert "[User]\none\n\n[Assistant]\nturn 1: one\n\n[User]\ntwo" == last["json"]["userMessage"]["content"]


PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
HISTORY_WITH_IMAGE = [{"role": "user", "content": [{"type": "text", "text": "see"},
                                                   {"type": "image_url", "image_url": {"url": PIXEL}}]},
                      {"role": "assistant", "content": "a dot"}, {"role": "user", "content": "and?"}]


def test_earlier_images_are_attached_for_a_vision_model_opening_a_new_evaluation(fresh, api_key, arena):
    send(fresh, api_key, HISTORY_WITH_IMAGE)
    message = arena.chat_requests()[-1]["json"]["userMessage"]
    assert "[User]\nsee\n[image]" in message["content"]
    [attachment] = message["experimental_attachments"]
    assert attachment["contentType"] == "image/png"


def test_earlier_images_are_only_described_for_a_model_without_vision(fresh, api_key, arena):
    send(fresh, api_key, HISTORY_WITH_IMAGE, model="grok-4.1")
    message = arena.chat_requests()[-1]["json"]["userMessage"]
    assert "[User]\nsee\n[image]" in message["content"] and message["experimental_attachments"] == []
