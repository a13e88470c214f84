"""End to end: images in (vision: checked, fetched, uploaded, attached) and out (Markdown in chat, and
/v1/images/generations), through the real bridge and the LM Arena emulator."""
import base64
import json
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest
from fake_arena import make_png
from harness import BridgeProcess, free_port, validate

import bridge

VISION = "gemini-3-pro"                 # text model with image input
TEXT_ONLY = "grok-4.1-thinking"         # text model without image input
IMAGE_MODEL = "flux-2-flex"             # image output, image input
ONE_IMAGE_MODEL = "flux-1-kontext-pro"  # image input with multipleImages: false
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 32 + b"\xff\xd9"
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
WEBP_BODY = b"WEBPVP8L" + struct.pack("<I", 5) + b"\x2f\x00\x00\x00\x00" + b"\x00"
WEBP = b"RIFF" + struct.pack("<I", len(WEBP_BODY)) + WEBP_BODY


@pytest.fixture(scope="module")
def bridge_proc(arena, tmp_path_factory):
    """This module's bridge may fetch image URLs from the local test server."""
    proc = BridgeProcess(arena.url, str(tmp_path_factory.mktemp("bridge")), args=("--ping-interval", "0.5"),
                         env={"BRIDGE_ALLOW_PRIVATE_URLS": "1"}).start()
    proc.wait_for_models()
    yield proc
    proc.stop()


class _Files(BaseHTTPRequestHandler):
    files: ClassVar[dict] = {}

    def do_GET(self):
        found = self.files.get(self.path)
        if found is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        content_type, body = found
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    """A tiny local web server: put (content type, bytes) into `web.files[path]`, fetch `web.url + path`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Files", (_Files,), {"files": {}}))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.files = server.RequestHandlerClass.files
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


# --- helpers ---------------------------------------------------------------------------------------------

def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def vision_body(*urls: str, model: str = VISION, text: str = "what is this?") -> dict:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": model, "messages": [{"role": "user", "content": parts}]}


def post(fresh, key, body, path="/v1/chat/completions"):
    return httpx.post(fresh.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def generate(fresh, key, prefix="/v1", **body):
    return post(fresh, key, {"model": IMAGE_MODEL, "prompt": "a red fox", **body}, prefix + "/images/generations")


def assert_error(response, status, *fragments):
    assert response.status_code == status, response.text
    body = response.json()
    validate("ErrorResponse", body)
    for fragment in fragments:
        assert fragment in body["error"]["message"], body["error"]["message"]
    return body["error"]


def upstream_requests(arena):
    """Everything that would reach LM Arena for a chat turn: chat endpoints, server actions, storage."""
    return [r for r in arena.requests if r["path"].startswith(("/nextjs-api/stream/", "/r2/"))
            or "next-action" in r["headers"]]


def action_requests(arena):
    return [r for r in arena.requests if "next-action" in r["headers"]]


def uploads(arena):
    return [r for r in arena.requests if r["method"] == "PUT" and r["path"].startswith("/r2/")]


def attachments_sent(arena):
    return [r["json"]["userMessage"]["experimental_attachments"] for r in arena.chat_requests()]


def content_of(response):
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def markdown_images(content):
    return [part.split(")", 1)[0] for part in content.split("![image](")[1:]]


def decode_data_url(url):
    header, _, payload = url.partition(",")
    assert header == "data:image/png;base64"
    return base64.b64decode(payload)


def assert_png(data, width=8, height=8):
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (width, height)


# --- vision input ----------------------------------------------------------------------------------------

def test_png_data_uri_reaches_storage_byte_for_byte_and_is_attached(fresh, api_key, arena):
    png = make_png(5, 3, (1, 2, 3))
    assert content_of(post(fresh, api_key, vision_body(data_uri(png)))) == "turn 1: what is this?"
    [[attachment]] = attachments_sent(arena)
    assert attachment["contentType"] == "image/png" and "x-id=GetObject" in attachment["url"]
    assert arena.r2[attachment["name"]]["bytes"] == png
    assert httpx.get(attachment["url"]).content == png


def test_http_image_url_is_fetched_and_uploaded_the_same_way(fresh, api_key, arena, web):
    web.files["/photo"] = ("application/octet-stream", JPEG)   # the bytes decide the type, not the header
    assert content_of(post(fresh, api_key, vision_body(web.url + "/photo"))) == "turn 1: what is this?"
    [[attachment]] = attachments_sent(arena)
    assert attachment["contentType"] == "image/jpeg" and attachment["name"].endswith(".jpg")
    assert arena.r2[attachment["name"]]["bytes"] == JPEG


def test_a_streamed_request_carries_its_image_too(client, arena):
    png = make_png(7, 1, (5, 5, 5))
    parts = [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": data_uri(png)}}]
    chunks = client.chat.completions.create(model=VISION, stream=True, messages=[{"role": "user", "content": parts}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "turn 1: describe"
    [[attachment]] = attachments_sent(arena)
    assert arena.r2[attachment["name"]]["bytes"] == png


def test_several_images_are_attached_in_order(fresh, api_key, arena):
    images = [make_png(2, 2, (9, 9, 9)), GIF]
    assert content_of(post(fresh, api_key, vision_body(*map(data_uri, images)))).startswith("turn 1:")
    [sent] = attachments_sent(arena)
    assert [arena.r2[a["name"]]["bytes"] for a in sent] == images
    assert [a["contentType"] for a in sent] == ["image/png", "image/gif"]


def test_a_repeated_image_is_uploaded_once(fresh, api_key, arena):
    body = vision_body(data_uri(make_png(6, 6, (40, 50, 60))))
    assert content_of(post(fresh, api_key, body)) == content_of(post(fresh, api_key, body))
    first, second = attachments_sent(arena)
    assert first == second and len(uploads(arena)) == 1
    assert len(action_requests(arena)) == 2          # one generateUploadUrl and one getSignedUrl, once


def test_a_stale_server_action_id_heals_by_rediscovery(fresh, api_key, arena):
    arena.redeploy()
    png = make_png(3, 3, (7, 8, 9))
    assert content_of(post(fresh, api_key, vision_body(data_uri(png)))).startswith("turn 1:")
    assert [r["status"] for r in action_requests(arena)][:2] == [404, 200]
    [[attachment]] = attachments_sent(arena)
    assert arena.r2[attachment["name"]]["bytes"] == png


@pytest.mark.parametrize("path", ["action", "r2"])
def test_a_failed_upload_step_is_retried_once(fresh, api_key, arena, path):
    arena.fault(times=1, status=500, path=path)
    png = make_png(4, 2, (11, 22, 33))
    assert content_of(post(fresh, api_key, vision_body(data_uri(png)))).startswith("turn 1:")
    [[attachment]] = attachments_sent(arena)
    assert arena.r2[attachment["name"]]["bytes"] == png


def test_an_upload_step_failing_twice_is_a_502_and_no_chat_is_sent(fresh, api_key, arena):
    arena.fault(times=2, status=500, path="action")
    error = assert_error(post(fresh, api_key, vision_body(data_uri(make_png()))), 502, "generateUploadUrl")
    assert error["code"] == "upload_failed" and arena.chat_requests() == []


# --- refusals: a 400 that says which part and why, and nothing sent upstream -------------------------------

BIG_PNG = make_png() + b"\x00" * (10 * 1024 * 1024)


@pytest.mark.parametrize("body,status,fragments", [
    (vision_body(data_uri(make_png()), model=TEXT_ONLY), 400, ["`grok-4.1-thinking` does not accept image input"]),
    (vision_body(data_uri(b"just some text, not an image")), 400, ["messages[0] image 1", "not a PNG, JPEG"]),
    (vision_body(data_uri(make_png()), data_uri(make_png()[:40])), 400, ["messages[0] image 2", "corrupt"]),
    (vision_body(data_uri(JPEG[:-2], "image/jpeg")), 400, ["messages[0] image 1", "JPEG image is corrupt"]),
    (vision_body("data:image/png;base64,%%%not-base64%%%"), 400, ["messages[0] image 1", "not valid base64"]),
    (vision_body("data:image/png," + "x" * 10), 400, ["must be base64 encoded"]),
    (vision_body(data_uri(BIG_PNG)), 400, ["messages[0] image 1", "larger than 10 MiB"]),
    (vision_body("ftp://example.org/cat.png"), 400, ["image URLs must be data:, http: or https:"]),
    (vision_body(data_uri(make_png()), data_uri(make_png()), model=ONE_IMAGE_MODEL), 400,
     ["takes one image per message"]),
], ids=["model-without-vision", "not-an-image", "truncated-png", "jpeg-without-end", "bad-base64", "not-base64",
        "too-large", "ftp-url", "two-images-for-one-image-model"])
def test_refused_image_input_is_a_precise_400_and_nothing_goes_upstream(fresh, api_key, arena, body, status,
                                                                       fragments):
    assert_error(post(fresh, api_key, body), status, *fragments)
    assert upstream_requests(arena) == []


@pytest.mark.parametrize("path,fragments", [
    ("/missing.png", ["messages[0] image 1", "answered HTTP 404"]),
    ("/huge.png", ["messages[0] image 1", "larger than 10 MiB"]),
    ("/page.html", ["messages[0] image 1", "not a PNG, JPEG, WebP or GIF"]),
])
def test_a_bad_image_url_is_a_precise_400_and_nothing_goes_upstream(fresh, api_key, arena, web, path, fragments):
    web.files["/huge.png"] = ("image/png", BIG_PNG)
    web.files["/page.html"] = ("text/html", b"<html>not an image</html>")
    assert_error(post(fresh, api_key, vision_body(web.url + path)), 400, *fragments)
    assert upstream_requests(arena) == []


def test_an_unreachable_image_host_is_a_400(fresh, api_key, arena):
    url = f"http://127.0.0.1:{free_port()}/cat.png"     # nothing listens there
    assert_error(post(fresh, api_key, vision_body(url)), 400, "messages[0] image 1", "could not be fetched")
    assert upstream_requests(arena) == []


def test_a_private_url_is_refused_unless_allowed(arena, web, tmp_path):
    web.files["/ok.png"] = ("image/png", make_png())
    proc = BridgeProcess(arena.url, str(tmp_path), env={"BRIDGE_ALLOW_PRIVATE_URLS": ""}).start()
    try:
        proc.wait_for_models()
        proc.set_accounts(arena.new_session())
        arena.reset()
        arena.configure(recaptcha="off")
        error = assert_error(post(proc, proc.create_key(), vision_body(web.url + "/ok.png")), 400,
                             "messages[0] image 1", "private or loopback", "BRIDGE_ALLOW_PRIVATE_URLS")
        assert error["code"] == "invalid_image_url" and upstream_requests(arena) == []
    finally:
        proc.stop()


def test_an_image_url_is_fetched_from_the_address_that_was_checked(web):
    """The host name below resolves nowhere: only the pin to the checked address can reach the server, so
    a name that answers differently on a second lookup cannot redirect the fetch."""
    import asyncio
    web.files["/pinned.png"] = ("image/png", make_png())
    url = web.url.replace("127.0.0.1", "images.invalid") + "/pinned.png"

    async def fetch():
        async with bridge.pinned_session(url, "127.0.0.1", "chrome") as session:
            return await bridge.fetch_bytes(session, url, timeout=5)

    assert asyncio.run(fetch()) == make_png()


def test_private_and_unresolvable_hosts_are_named_in_the_refusal():
    with pytest.raises(ValueError, match="private or loopback"):
        bridge.public_address("127.0.0.1")
    with pytest.raises(ValueError, match="could not be resolved"):
        bridge.public_address("images.invalid")


@pytest.mark.parametrize("data,mime", [(make_png(), "image/png"), (JPEG, "image/jpeg"), (GIF, "image/gif"),
                                       (WEBP, "image/webp")])
def test_every_accepted_type_is_recognised_by_its_bytes(data, mime):
    assert bridge.check_image(data, "x").mime == mime


# --- image output in chat --------------------------------------------------------------------------------

def test_image_model_answers_chat_with_a_markdown_url_image(client, arena):
    content = client.chat.completions.create(model=IMAGE_MODEL, messages=[{"role": "user", "content": "fox"}]) \
        .choices[0].message.content
    [url] = markdown_images(content)
    assert content == f"![image]({url})" and url.startswith(arena.url + "/r2/")
    assert_png(httpx.get(url).content)


@pytest.mark.parametrize("variant", ["data", "file"])
def test_image_model_answers_chat_with_a_markdown_data_image(client, arena, variant):
    arena.configure(image_output=variant)
    content = client.chat.completions.create(model=IMAGE_MODEL, messages=[{"role": "user", "content": "fox"}]) \
        .choices[0].message.content
    [url] = markdown_images(content)
    assert content == f"![image]({url})"
    assert_png(decode_data_url(url))


def several_images_script(arena):
    """Text, then images of all three kinds, more text, and two images in one part."""
    urls = []
    for n in (1, 2):
        key = f"script/{time.time_ns()}-{n}.png"
        arena.r2[key] = {"bytes": make_png(n, n), "content_type": "image/png", "expires": arena.now() + 3600}
        urls.append(arena.presign(key))
    inline = [base64.b64encode(make_png(3, 3)).decode(), base64.b64encode(make_png(4, 4)).decode()]
    lines = ['a0:"Here are four."',
             "a2:" + json.dumps([{"type": "image", "image": urls[0], "mimeType": "image/png"}]),
             "ak:" + json.dumps({"mimeType": "image/png", "data": inline[0]}),
             'a0:" Enjoy."',
             "a2:" + json.dumps([{"type": "image", "data": inline[1], "mimeType": "image/png"},
                                 {"type": "image", "image": urls[1], "mimeType": "image/png"}]),
             'ad:{"finishReason":"stop"}']
    expected = "Here are four. Enjoy." + "".join(f"\n\n![image]({u})" for u in [
        urls[0], "data:image/png;base64," + inline[0], "data:image/png;base64," + inline[1], urls[1]])
    return lines, expected


def test_several_images_follow_the_text_in_order(client, arena):
    lines, expected = several_images_script(arena)
    arena.configure(script=[lines, lines])
    reply = client.chat.completions.create(model=IMAGE_MODEL, messages=[{"role": "user", "content": "four"}])
    assert reply.choices[0].message.content == expected
    validate("CreateChatCompletionResponse", reply.model_dump(exclude_unset=True))
    chunks = client.chat.completions.create(model=IMAGE_MODEL, stream=True,
                                            messages=[{"role": "user", "content": "four again"}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


# --- /v1/images/generations ------------------------------------------------------------------------------

def test_images_generations_returns_a_url(client, arena):
    result = client.images.generate(model=IMAGE_MODEL, prompt="a red fox", response_format="url")
    validate("ImagesResponse", result.model_dump(exclude_unset=True))
    [image] = result.data
    assert image.url.startswith(arena.url + "/r2/") and abs(result.created - time.time()) < 60
    assert_png(httpx.get(image.url).content)
    [sent] = arena.chat_requests()
    assert sent["json"]["modality"] == "image" and sent["json"]["userMessage"]["content"] == "a red fox"


@pytest.mark.parametrize("variant", ["url", "data", "file"])
def test_images_generations_returns_b64_json_png_bytes(fresh, api_key, arena, variant):
    arena.configure(image_output=variant)
    response = generate(fresh, api_key, response_format="b64_json")
    assert response.status_code == 200, response.text
    body = response.json()
    validate("ImagesResponse", body)
    [image] = body["data"]
    assert set(image) == {"b64_json"}
    assert_png(base64.b64decode(image["b64_json"]))


def test_images_generations_is_served_under_api_v1_too(fresh, api_key):
    response = generate(fresh, api_key, prefix="/api/v1")
    assert response.status_code == 200 and response.json()["data"][0]["url"]


def test_images_generations_maps_size_to_the_nearest_listed_aspect_ratio(fresh, api_key, arena):
    assert generate(fresh, api_key, size="1024x1792").status_code == 200
    [sent] = arena.chat_requests()
    assert sent["json"]["userMessage"]["content"] == "a red fox\n\nAspect ratio: 1:1"   # flux lists only 1:1


@pytest.mark.parametrize("size,ratio", [((1024, 1792), "9:16"), ((1792, 1024), "16:9"), ((1024, 1024), "1:1"),
                                        ((1536, 1024), "4:3"), ((100, 1000), "9:16")])
def test_closest_aspect_ratio_compares_shapes(size, ratio):
    assert bridge.closest_aspect_ratio(size, ["1:1", "4:3", "3:4", "16:9", "9:16", "bogus"]) == ratio


@pytest.mark.parametrize("body,fragments,param", [
    ({"n": 2}, ["`n` must be 1", "one image per request"], "n"),
    ({"model": VISION}, [f"`{VISION}` does not generate images"], "model"),
    ({"response_format": "png"}, ["`response_format` must be `url` or `b64_json`"], "response_format"),
    ({"size": "big"}, ["`size` must be `auto` or WIDTHxHEIGHT"], "size"),
    ({"prompt": ""}, ["`prompt` is required"], "prompt"),
], ids=["n-2", "text-model", "bad-format", "bad-size", "no-prompt"])
def test_images_generations_refuses_bad_requests_with_a_400(fresh, api_key, arena, body, fragments, param):
    assert assert_error(generate(fresh, api_key, **body), 400, *fragments)["param"] == param
    assert arena.chat_requests() == []


def test_images_generations_needs_a_key(fresh):
    assert_error(httpx.post(fresh.url + "/v1/images/generations", json={"model": IMAGE_MODEL, "prompt": "x"}), 401)


def test_images_generations_counts_against_the_rpm_limit(fresh):
    key = fresh.create_key(rpm=1)
    assert generate(fresh, key).status_code == 200
    response = generate(fresh, key)
    assert_error(response, 429) and int(response.headers["retry-after"]) >= 1


def test_images_generations_upstream_refusal_keeps_the_chat_error_shape(fresh, api_key, arena):
    arena.fault(times=1, status=422, body={"error": "flagged"})
    assert assert_error(generate(fresh, api_key), 422, "flagged")["code"] == "content_filter"


def test_images_generations_reply_without_an_image_is_a_502(fresh, api_key, arena):
    arena.configure(script=[['a0:"I cannot draw that."', 'ad:{"finishReason":"stop"}']])
    assert assert_error(generate(fresh, api_key), 502, "without an image", "I cannot draw that.")["code"] == "no_image"


def test_images_generations_usage_is_recorded(fresh, api_key):
    key = fresh.store.key_by_secret(api_key)
    assert generate(fresh, api_key).status_code == 200
    deadline = time.time() + 5
    rows = []
    while time.time() < deadline and not rows:
        rows = fresh.store.rows("SELECT * FROM usage WHERE key_id = ? AND model = ?", [key["id"], IMAGE_MODEL])
        time.sleep(0.1)
    assert [(r["status"], r["error"]) for r in rows] == [(200, None)]


def test_images_generations_b64_json_never_downloads_from_outside_lm_arenas_storage(fresh, api_key, arena, web):
    web.files["/secret.png"] = ("image/png", make_png())
    arena.configure(script=[["a2:" + json.dumps([{"type": "image", "image": web.url + "/secret.png",
                                                   "mimeType": "image/png"}]), 'ad:{"finishReason":"stop"}']])
    error = assert_error(generate(fresh, api_key, response_format="b64_json"), 502, "outside its storage")
    assert error["code"] == "image_download_failed"


def test_a_malformed_image_url_is_a_400(fresh, api_key):
    error = assert_error(post(fresh, api_key, vision_body("http://[::1/x.png")), 400, "and well-formed")
    assert error["code"] == "invalid_image_url"
