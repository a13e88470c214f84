"""Reply building (§7, §13.8): the deterministic reply of a turn as stream lines (text, reasoning, citations,
images, noise codes, finish, a second lane), or the next scripted reply."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field

from .common import UNICODE_EXTRA, compact, js_string, make_png, word_parts
from .core import Core
from .uploads import R2

CITATION_SOURCES = (("1", "https://example.org/a", "Example A"), ("2", "https://example.com/b", "Example B"))
# The marker parts of a search reply: markers split across deltas, as the site does.
CITED_TAIL = ("<!--cita", "tion:1--> see also", " source two<!--citation:", "2-->.")
NOISE_HEAD = ('a8:[{"type":"annotation","value":"noise"}]',)
NOISE_TAIL = ('a9:{"toolCallId":"noise-1","toolName":"noop","args":{}}',
              'ah:{"sourceType":"url","id":"noise-src","url":"https://example.org/noise","title":"Noise"}')


@dataclass
class Reply:
    """What a reply streams and what the evaluation's history keeps of it."""
    lines: list[str] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""


@dataclass
class Turn:
    """The facts a reply is built from."""
    number: int
    content: str
    modality: str
    model: dict
    message_id: str | None
    user: str
    two_lanes: bool
    prompt_words: int
    b_message_id: str | None = None     # a battle turn's lane B id, announced in a ``bf`` line when we made it
    announce_b: bool = False
    routed_to: dict | None = None       # the model the "max" router chose (U9)


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units: the web client's string offsets (charLocation) count those."""
    return len(text.encode("utf-16-le")) // 2


def source_part(source: object) -> str:
    return "ac:" + compact({"toolCallId": "citation-source", "argsTextDelta": compact({"source": source})})


def citation_lines() -> list[str]:
    out = []
    for sid, url, title in CITATION_SOURCES:
        src = {"source": {"id": sid, "url": url, "title": title, "favicon": url.rsplit("/", 1)[0] + "/favicon.ico"}}
        out.append("ac:" + compact({"toolCallId": "citation-source", "argsTextDelta": compact(src)}))
    return out


def raw_lines(script: list) -> Reply:
    """A scripted reply of raw lines as given; the history keeps their joined ``a0`` text."""
    lines = [str(x) for x in script]
    text = ""
    for ln in lines:
        if ln.startswith("a0:"):
            try:
                text += json.loads(ln[3:])
            except ValueError:
                pass
    return Reply(lines, text)


class ReplyBuilder:
    def __init__(self, core: Core, r2: R2) -> None:
        self.core, self.r2 = core, r2

    def _parts(self, code: str, text: str) -> list[str]:
        knobs = self.core.knobs
        return [code + js_string(p, bool(knobs["unicode"])) for p in word_parts(text, int(knobs["words_per_part"]))]

    def _image(self, turn: Turn) -> Reply:
        png = make_png(8, 8, hashlib.sha256(str(turn.content).encode()).digest()[:3])
        data = base64.b64encode(png).decode()
        mode = self.core.knobs["image_output"]
        if mode == "data":
            line = "a2:" + compact([{"type": "image", "data": data, "mimeType": "image/png"}])
        elif mode == "file":
            line = "ak:" + compact({"mimeType": "image/png", "data": data})
        else:
            key = f"{turn.user}/{int(self.core.now() * 1000)}-{turn.message_id}.png"
            self.r2.objects[key] = {"bytes": png, "content_type": "image/png", "expires": self.core.now() + 3600}
            line = "a2:" + compact([{"type": "image", "image": self.r2.presign(key, "GET"), "mimeType": "image/png"}])
        return Reply(['a2:[{"type":"heartbeat"}]', line])

    def _numbered(self, count: int) -> Reply:
        texts = [f"line {i}\n" for i in range(1, count + 1)]
        return Reply(["a0:" + js_string(t, bool(self.core.knobs["unicode"])) for t in texts], "".join(texts))

    def _offset_citations(self, text: str) -> Reply:
        """U6, as the real 2025-12 search stream: no markers in the text; each source's ``charLocation`` grows
        as it is cited again (end offsets of the cited sentences), titles arrive only in a later repeat, and
        the last part carries every source as an array."""
        sentences = [text + ".", " The first source says so.", " The second source agrees.", " Both say it again."]
        cites = ({"1"}, {"1"}, {"2"}, {"1", "2"})
        full: dict[str, dict] = {sid: {"url": url, "id": sid, "charLocation": [], "title": title,
                      "favicon": url.rsplit("/", 1)[0] + "/favicon.ico", "thumbnail": url + "/thumb.png"}
                for sid, url, title in CITATION_SOURCES}
        lines: list[str] = []
        done = ""
        for sentence, cited in zip(sentences, cites, strict=True):
            parts = self._parts("a0:", sentence)
            end = utf16_len(done + sentence)
            for sid in sorted(cited):
                src = full[sid]
                first = not src["charLocation"]
                src["charLocation"].append(end)
                short = {"url": src["url"], "id": sid, "charLocation": list(src["charLocation"])}
                parts.insert(len(parts) - 1, source_part(short if first else dict(src)))
            lines += parts
            done += sentence
        lines.append(source_part([full[sid] for sid in sorted(full)]))
        return Reply(lines, done)

    def _answer(self, turn: Turn) -> Reply:
        text = f"turn {turn.number}: {turn.content}" + (UNICODE_EXTRA if self.core.knobs["unicode"] else "")
        if turn.modality == "search" and self.core.knobs["citation_format"] == "offsets":
            return self._offset_citations(text)
        reply = Reply(text=text)
        if "thinking" in turn.model.get("publicName", ""):
            reply.reasoning = f"thinking about: {turn.content}"
            reply.lines += self._parts("ag:", reply.reasoning)
        if turn.modality == "search":
            reply.lines += citation_lines()
        reply.lines += self._parts("a0:", text)
        if turn.modality == "search":
            reply.lines += ["a0:" + js_string(p, bool(self.core.knobs["unicode"])) for p in CITED_TAIL]
            reply.text = text + "".join(CITED_TAIL)
        return reply

    def _content(self, turn: Turn) -> Reply:
        if turn.modality == "image":
            return self._image(turn)
        if self.core.knobs["lines"]:
            return self._numbered(int(self.core.knobs["lines"]))
        return self._answer(turn)

    def _second_lane(self, lines: list[str], turn: Turn) -> list[str]:
        """B lines interleaved at seeded random positions, ``bd`` before the final ``ad``."""
        b_lines = self._parts("b0:", f"model b turn {turn.number}: {turn.content}")
        if turn.announce_b:
            b_lines.insert(0, "bf:" + compact({"messageId": turn.b_message_id}))
        merged = []
        for ln in lines:
            while b_lines and self.core.rng.random() < 0.5:
                merged.append(b_lines.pop(0))
            merged.append(ln)
        return merged + b_lines + ['bd:{"finishReason":"stop"}']

    def scripted(self, spec: dict) -> Reply:
        """A scripted reply from a spec: ``text``, optional ``reasoning``, ``finish`` (default stop) and
        ``usage``; or ``lines``, raw lines as given."""
        if "lines" in spec:
            return raw_lines(list(spec["lines"]))
        text, reasoning = str(spec.get("text") or ""), str(spec.get("reasoning") or "")
        lines = (self._parts("ag:", reasoning) if reasoning else []) + (self._parts("a0:", text) if text else [])
        finish: dict = {"finishReason": spec.get("finish") or "stop"}
        if spec.get("usage"):
            finish["usage"] = spec["usage"]
        return Reply([*lines, "ad:" + compact(finish)], text, reasoning)

    def build(self, turn: Turn) -> Reply:
        knobs = self.core.knobs
        reply = self._content(turn)
        noise = bool(knobs["noise_codes"])
        head = ["af:" + compact({"messageId": turn.message_id}), *NOISE_HEAD] if noise else []
        if turn.routed_to is not None:
            head.insert(0, "a2:" + compact([{"type": "routed_model", "modelId": turn.routed_to["id"],
                                             "publicName": turn.routed_to.get("publicName")}]))
        lines = head + reply.lines + (list(NOISE_TAIL) if noise else [])
        offsets = turn.modality == "search" and knobs["citation_format"] == "offsets"
        finish = knobs["finish_reason"] or ("unknown" if offsets else "stop")
        if finish == "error":
            lines.append('a3:"An error occurred while generating the response"')
        usage = {"promptTokens": max(1, turn.prompt_words), "completionTokens": max(1, len(reply.text.split()))}
        if noise:
            lines.append("ae:" + compact({"finishReason": finish, "usage": usage, "isContinued": False}))
        two = turn.two_lanes or bool(knobs["b_lines"])
        if two:
            lines = self._second_lane(lines, turn)
        a_finish = "unknown" if knobs["b_lines"] == "unknown" else finish
        reply.lines = [*lines, "ad:" + compact({"finishReason": a_finish, "usage": usage})]
        return reply
