"""The Flowise-style API through the official `flowise` SDK (and plain HTTP where the SDK has no
call) against the real app under uvicorn."""

from __future__ import annotations

import json
import uuid

import pytest
import requests
from flowise import Flowise, IMessage, PredictionData

from tests.conftest import API_KEY, OTHER_KEY

CHAT = "tiny-chat-flow"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}


def api(server, path: str) -> str:
    return f"{server.url}/api/v1{path}"


def predict(server, flow: str = CHAT, key: str = API_KEY, **fields) -> dict:
    client = Flowise(base_url=server.url, api_key=key)
    [answer] = list(client.create_prediction(PredictionData(chatflowId=flow, **fields)))
    return answer


def stream(server, flow: str = CHAT, **fields) -> list[dict]:
    client = Flowise(base_url=server.url, api_key=API_KEY)
    return [json.loads(chunk) for chunk in client.create_prediction(
        PredictionData(chatflowId=flow, streaming=True, **fields))]


def assert_flowise_error(response: requests.Response, status: int) -> dict:
    body = response.json()
    assert response.status_code == status
    assert body["statusCode"] == status and body["success"] is False and body["message"]
    assert "Traceback" not in json.dumps(body)
    return body


# ------------------------------------------------------------------ no model needed

def test_ping_answers_pong(live_server):
    response = requests.get(api(live_server, "/ping"))
    assert response.status_code == 200 and response.text == "pong"


def test_chatflows_list_and_get(live_server):
    assert_flowise_error(requests.get(api(live_server, "/chatflows")), 401)
    flows = {f["id"]: f for f in requests.get(api(live_server, "/chatflows"), headers=AUTH).json()}
    assert set(flows) >= {CHAT, "locked-flow", "tiny-video-flow"}
    assert flows[CHAT]["name"] == "Tiny chat" and flows[CHAT]["model"] == "ember/tiny-chat"
    assert flows["tiny-video-flow"]["kind"] == "image-to-video"
    assert "flow-secret" not in json.dumps(flows)
    one = requests.get(api(live_server, f"/chatflows/{CHAT}"), headers=AUTH).json()
    assert one == flows[CHAT]
    assert_flowise_error(requests.get(api(live_server, "/chatflows/nope"), headers=AUTH), 404)


def test_chatflows_streaming_needs_no_auth(live_server):
    def streaming(flow):
        return requests.get(api(live_server, f"/chatflows-streaming/{flow}")).json()["isStreaming"]

    assert streaming(CHAT) is True
    assert streaming("locked-flow") is False
    assert streaming("tiny-video-flow") is False
    unknown = requests.get(api(live_server, "/chatflows-streaming/nope"))
    assert unknown.status_code == 200 and unknown.json() == {"isStreaming": False}  # no existence oracle


def test_unknown_flow_is_404(live_server):
    with pytest.raises(requests.HTTPError) as caught:
        predict(live_server, flow="no-such-flow", question="hi")
    assert caught.value.response.status_code == 404
    response = requests.post(api(live_server, "/prediction/no-such-flow"), json={"question": "hi"}, headers=AUTH)
    assert_flowise_error(response, 404)


@pytest.mark.parametrize("history", [
    "not a list",
    [{"role": "robot", "content": "hi"}],
    [{"role": "userMessage"}],
    [{"type": "apiMessage", "message": 5}],
    ["just a string"],
])
def test_malformed_history_is_400(live_server, history):
    response = requests.post(api(live_server, f"/prediction/{CHAT}"), headers=AUTH,
                             json={"question": "hi", "history": history})
    assert "history" in assert_flowise_error(response, 400)["message"]


def test_bad_override_is_422_and_disallowed_ones_are_ignored(live_server):
    response = requests.post(api(live_server, f"/prediction/{CHAT}"), headers=AUTH,
                             json={"question": "hi", "overrideConfig": {"temperature": "hot"}})
    assert "temperature" in assert_flowise_error(response, 422)["message"]
    response = requests.post(api(live_server, f"/prediction/{CHAT}"), headers=AUTH,
                             json={"question": "", "overrideConfig": {"topK": "not allowed, so ignored"}})
    assert "question" in assert_flowise_error(response, 400)["message"]


def test_flow_api_key(live_server):
    url = api(live_server, "/prediction/locked-flow")
    malformed = {"question": "hi", "history": [{"role": "robot", "content": "x"}]}
    assert_flowise_error(requests.post(url, json=malformed), 401)
    assert_flowise_error(requests.post(url, json=malformed, headers={"Authorization": "Bearer wrong"}), 401)
    # Past auth, the malformed history is what fails: the flow's own key and the server's are accepted.
    assert_flowise_error(requests.post(url, json=malformed, headers={"Authorization": "Bearer flow-secret"}), 400)
    assert_flowise_error(requests.post(url, json=malformed, headers=AUTH), 400)
    other_flow = api(live_server, f"/prediction/{CHAT}")
    assert_flowise_error(requests.post(other_flow, json=malformed, headers={"Authorization": "Bearer flow-secret"}),
                         401)


# ------------------------------------------------------------------ predictions

def test_sdk_prediction_json(live_server):
    answer = predict(live_server, question="Hello there")
    assert answer["text"] and answer["question"] == "Hello there"
    assert answer["chatId"] and answer["chatMessageId"] and answer["sessionId"] == answer["chatId"]
    again = predict(live_server, question="Hello there")
    assert again["text"] == answer["text"]  # temperature 0 in the flow's settings
    assert again["chatId"] != answer["chatId"]


def test_sdk_streaming_wire_format(live_server):
    events = stream(live_server, question="Tell me a story")
    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-2:] == ["metadata", "end"]
    assert set(names[1:-2]) == {"token"}
    tokens = [e["data"] for e in events if e["event"] == "token"]
    assert events[0]["data"] == tokens[0]
    assert events[-1]["data"] == "[DONE]"
    metadata = events[-2]["data"]
    assert metadata["question"] == "Tell me a story" and metadata["chatMessageId"]
    assert metadata["sessionId"] == metadata["chatId"]
    assert "".join(tokens) == predict(live_server, question="Tell me a story")["text"]


def test_raw_stream_is_flowise_message_frames(live_server):
    with requests.post(api(live_server, f"/prediction/{CHAT}"), headers=AUTH, stream=True,
                       json={"question": "hi", "streaming": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.content.decode()
    frames = [f for f in raw.split("\n\n") if f.strip() and not f.startswith(":")]
    assert all(f.startswith("message:\ndata:{\"event\":") for f in frames)


def test_allowed_override_limits_tokens(live_server):
    events = stream(live_server, question="Count to ten", overrideConfig={"maxTokens": 2})
    assert 1 <= len([e for e in events if e["event"] == "token"]) <= 2


def test_history_and_session_continuation_build_the_same_prompt(live_server):
    session = f"s-{uuid.uuid4()}"
    first = predict(live_server, question="My name is Ada.", overrideConfig={"sessionId": session})
    assert first["sessionId"] == session
    continued = predict(live_server, question="What is my name?", overrideConfig={"sessionId": session})
    assert continued["sessionId"] == session
    with_history = predict(live_server, question="What is my name?", history=[
        IMessage(message="My name is Ada.", type="userMessage"),
        IMessage(message=first["text"], type="apiMessage")])
    assert with_history["text"] == continued["text"]
    without = predict(live_server, question="What is my name?")
    assert without["text"] != continued["text"]
    new_shape = requests.post(api(live_server, f"/prediction/{CHAT}"), headers=AUTH, json={
        "question": "What is my name?", "history": [{"role": "userMessage", "content": "My name is Ada."},
                                                    {"role": "apiMessage", "content": first["text"]}]}).json()
    assert new_shape["text"] == continued["text"]


def test_chat_messages_list_filter_and_delete(live_server):
    chat = f"c-{uuid.uuid4()}"
    first = predict(live_server, question="one", chatId=chat)
    predict(live_server, question="two", chatId=chat)
    url = api(live_server, f"/chatmessage/{CHAT}")
    messages = requests.get(url, params={"chatId": chat}, headers=AUTH).json()
    assert [m["role"] for m in messages] == ["userMessage", "apiMessage"] * 2
    assert [m["content"] for m in messages][::2] == ["one", "two"]
    assert messages[1]["id"] == first["chatMessageId"] and messages[1]["content"] == first["text"]
    assert all(m["chatflowid"] == CHAT and m["chatId"] == chat and m["sessionId"] == chat for m in messages)
    newest = requests.get(url, params={"chatId": chat, "order": "DESC"}, headers=AUTH).json()
    assert [m["id"] for m in newest] == [m["id"] for m in reversed(messages)]
    assert requests.get(url, params={"chatId": chat, "startDate": "2999-01-01"}, headers=AUTH).json() == []
    assert len(requests.get(url, params={"chatId": chat, "endDate": "2999-01-01"}, headers=AUTH).json()) == 4
    assert_flowise_error(requests.get(url, params={"startDate": "yesterday"}, headers=AUTH), 400)
    assert requests.get(url, params={"chatId": chat}, headers=OTHER).json() == []
    assert requests.delete(url, params={"chatId": chat}, headers=OTHER).json()["affected"] == 0
    assert requests.delete(url, params={"chatId": chat}, headers=AUTH).json()["affected"] == 4
    assert requests.get(url, params={"chatId": chat}, headers=AUTH).json() == []


def test_sessions_belong_to_their_caller(live_server):
    session = f"s-{uuid.uuid4()}"
    predict(live_server, question="secret", overrideConfig={"sessionId": session})
    response = requests.post(api(live_server, f"/prediction/{CHAT}"), headers=OTHER,
                             json={"question": "what was it?", "overrideConfig": {"sessionId": session}})
    assert_flowise_error(response, 403)


def test_feedback_on_an_answer(live_server):
    answer = predict(live_server, question="Rate me")
    body = {"chatflowid": CHAT, "chatId": answer["chatId"], "messageId": answer["chatMessageId"],
            "rating": "THUMBS_UP", "content": "nice"}
    created = requests.post(api(live_server, "/feedback"), json=body, headers=AUTH).json()
    assert created["id"] and created["rating"] == "THUMBS_UP" and created["content"] == "nice"
    assert created["messageId"] == answer["chatMessageId"] and created["chatflowid"] == CHAT
    listed = requests.get(api(live_server, f"/feedback/{CHAT}"), params={"chatId": answer["chatId"]},
                          headers=AUTH).json()
    assert [f["id"] for f in listed] == [created["id"]]
    messages = requests.get(api(live_server, f"/chatmessage/{CHAT}"), headers=AUTH,
                            params={"chatId": answer["chatId"], "feedback": "true"}).json()
    assert messages[1]["feedback"]["rating"] == "THUMBS_UP" and messages[0]["feedback"] is None
    assert_flowise_error(requests.post(api(live_server, "/feedback"), json={**body, "rating": "MEH"},
                                       headers=AUTH), 400)
    assert_flowise_error(requests.post(api(live_server, "/feedback"), json={**body, "messageId": "nope"},
                                       headers=AUTH), 404)
    assert_flowise_error(requests.post(api(live_server, "/feedback"), json=body, headers=OTHER), 403)
    assert requests.get(api(live_server, f"/feedback/{CHAT}"), params={"chatId": answer["chatId"]},
                        headers=OTHER).json() == []


def test_locked_flow_answers_with_its_key(live_server):
    answer = predict(live_server, flow="locked-flow", key="flow-secret", question="hi")
    assert answer["text"]
    with pytest.raises(requests.HTTPError) as caught:
        predict(live_server, flow="locked-flow", key="", question="hi")
    assert caught.value.response.status_code == 401


# ------------------------------------------------------------------ hang-ups cancel the job

class RecordingEngine:
    def __init__(self):
        self.canceled = []

    def cancel(self, job_id):
        self.canceled.append(job_id)

    def forget(self, job_id):
        pass


def hung_up_request(engine):
    from types import SimpleNamespace

    async def is_disconnected():
        return True

    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(engine=engine)),
                           is_disconnected=is_disconnected)


def running_job():
    from engine.jobs import Job

    job = Job(model="ember/tiny-chat", version="v", kind="text-generation", input={})
    job.start()
    job.emit("output", "Hel")
    return job


async def test_a_stream_closed_by_the_client_cancels_its_job():
    from server import flowise

    engine, job = RecordingEngine(), running_job()
    turn = flowise.Turn(flow=None, ask=None, job=job, conversation=None, chat_id="c")
    frames = flowise._stream(hung_up_request(engine), turn)
    assert b'"event":"start","data":"Hel"' in await frames.__anext__()
    assert b'"event":"token","data":"Hel"' in await frames.__anext__()
    await frames.aclose()
    assert engine.canceled == [job.id]


async def test_a_json_caller_hanging_up_cancels_its_job(monkeypatch):
    from server import flowise

    monkeypatch.setattr(flowise, "DISCONNECT_POLL_S", 0.01)
    engine, job = RecordingEngine(), running_job()
    engine.cancel = lambda job_id: (engine.canceled.append(job_id), job.finish("canceled"))
    await flowise._wait(hung_up_request(engine), job)
    assert engine.canceled == [job.id] and job.status == "canceled"


def test_a_refused_prediction_leaves_no_session_behind(client):
    chat_id = "refused-chat"
    response = client.post("/api/v1/prediction/tiny-chat-flow", json={"question": "word " * 600, "chatId": chat_id})
    assert response.status_code == 400 and response.json()["success"] is False
    assert client.get(f"/v1/sessions/{chat_id}").status_code == 404
