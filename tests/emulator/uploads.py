"""Uploads: the Next.js server actions (E5, E7, §11) and the R2 stand-in with presigned URLs (E6, E8, §12)."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote, unquote, urlencode, urlsplit

from .accounts import Accounts
from .common import R2_MAX_BYTES, compact
from .core import Core
from .http import Handler, Request, send
from .site import Site

CORS = [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", "GET, PUT"),
        ("Access-Control-Allow-Headers", "*"), ("Access-Control-Max-Age", "3600")]
R2_METHODS = {"GET": "GET", "HEAD": "GET", "PUT": "PUT"}


def r2_error(h: Handler, status: int, code: str, message: str) -> None:
    xml = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    send(h, status, xml, "application/xml", headers=[("Access-Control-Allow-Origin", "*")])


class R2:
    """Objects by key, reached only through URLs this emulator signed."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.objects: dict[str, dict] = {}

    def _sign(self, method: str, key: str, date: str, expires: int) -> str:
        return hmac.new(self.core.secret, f"r2|{method}|{key}|{date}|{expires}".encode(), hashlib.sha256).hexdigest()

    def presign(self, key: str, method: str = "GET", expires: int = 3600) -> str:
        """Presigned R2-style URL on this origin (``x-id=GetObject`` or ``PutObject``)."""
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.core.now()))
        q = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Content-Sha256": "UNSIGNED-PAYLOAD",
             "X-Amz-Credential": f"fakeaccesskey/{date[:8]}/auto/s3/aws4_request", "X-Amz-Date": date,
             "X-Amz-Expires": str(expires), "X-Amz-Signature": self._sign(method, key, date, expires),
             "X-Amz-SignedHeaders": "host"}
        if method == "PUT":
            q.update({"x-amz-checksum-crc32": "AAAAAA==", "x-amz-sdk-checksum-algorithm": "CRC32",
                      "x-id": "PutObject"})
        else:
            q.update({"x-amz-checksum-mode": "ENABLED", "x-id": "GetObject"})
        return f"{self.core.url}/r2/{quote(key)}?{urlencode(q)}"

    def _signature_failure(self, method: str, key: str, q: dict) -> tuple[int, str, str] | float:
        """The issue time of a valid signature, else the R2 error to answer."""
        try:
            date, expires = q["X-Amz-Date"], int(q["X-Amz-Expires"])
            ok = hmac.compare_digest(q["X-Amz-Signature"], self._sign(method, key, date, expires))
            issued = time.mktime(time.strptime(date, "%Y%m%dT%H%M%SZ")) - time.timezone
        except (KeyError, ValueError):
            return 403, "AccessDenied", "Missing or malformed signature"
        if not ok or q.get("x-id") != ("PutObject" if method == "PUT" else "GetObject"):
            return (403, "SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided.")
        if self.core.now() > issued + expires:
            return 403, "AccessDenied", "Request has expired"
        return issued + expires

    def serve(self, h: Handler, req: Request) -> None:
        if req.method == "OPTIONS":
            return send(h, 204, b"", None, headers=CORS)
        key = unquote(req.path[len("/r2/"):])
        method = R2_METHODS.get(req.method)
        if method is None:
            return r2_error(h, 405, "MethodNotAllowed", "The specified method is not allowed")
        checked = self._signature_failure(method, key, req.query)
        if isinstance(checked, tuple):
            return r2_error(h, *checked)
        return self._put(h, req, key, checked) if method == "PUT" else self._get(h, key)

    def _put(self, h: Handler, req: Request, key: str, expires: float) -> None:
        if len(req.body) > R2_MAX_BYTES:
            return r2_error(h, 413, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
        with self.core.lock:
            self.objects[key] = {"bytes": req.body,
                                 "content_type": req.headers.get("content-type", "application/octet-stream"),
                                 "expires": expires}
        return send(h, 200, b"", None, headers=[*CORS, ("ETag", '"' + hashlib.md5(req.body).hexdigest() + '"')])

    def _get(self, h: Handler, key: str) -> None:
        obj = self.objects.get(key)
        if obj is None:
            return r2_error(h, 404, "NoSuchKey", "The specified key does not exist.")
        return send(h, 200, obj["bytes"], obj["content_type"],
                    headers=[*CORS, ("ETag", '"' + hashlib.md5(obj["bytes"]).hexdigest() + '"')])


class ServerActions:
    """``POST <page>`` with ``Next-Action``: generateUploadUrl and getSignedUrl, by the current action ids."""

    def __init__(self, core: Core, site: Site, accounts: Accounts, r2: R2) -> None:
        self.core, self.site, self.accounts, self.r2 = core, site, accounts, r2

    def _result(self, name: str, args: list | None, req: Request) -> dict:
        uid, state, _ = self.accounts.from_cookies(req.cookies)
        if args is None:
            return {"success": False, "error": "Invalid arguments"}
        if state != "ok":
            return {"success": False, "error": "Unauthorized"}
        if name == "generateUploadUrl":
            key = f"{uid}/{int(self.core.now() * 1000)}-{str(args[0]) if args else 'upload.png'}"
            return {"success": True, "data": {"uploadUrl": self.r2.presign(key, "PUT"), "key": key}}
        return {"success": True, "data": {"url": self.r2.presign(str(args[0]) if args else "", "GET")}}

    def serve(self, h: Handler, req: Request) -> None:
        origin = req.headers.get("origin", "")
        if not origin or urlsplit(origin).netloc != req.headers.get("host", ""):
            return send(h, 403, "Forbidden: invalid Server Actions request.", "text/plain")
        name = {v: k for k, v in self.site.action_ids.items()}.get(req.headers.get("next-action", ""))
        if name is None:
            return send(h, 404, "Server action not found.", "text/plain", headers=[("x-nextjs-action-not-found", "1")])
        result = self._result(name, req.json if isinstance(req.json, list) else None, req)
        flight = self.core.knobs["action_answer"] == "flight"
        body = self._flight_answer(result) if flight else \
            f'0:{{"a":"$@1","f":"","b":"{self.site.build_id}"}}\n1:{compact(result)}\n'
        return send(h, 200, body, "text/x-component",
                    headers=[("x-action-revalidated", "[[],0,1]" if flight else "[[],0,0]"),
                             ("x-powered-by", "Next.js"), ("Vary", "RSC, Next-Router-State-Tree, Next-Router-Prefetch")])

    def _flight_answer(self, result: dict) -> str:
        """U9, as the real 2025-12 answers: the page's flight rows, the tree on line ``0:``, the result on line
        ``1:`` in the middle, more rows after it."""
        chunks = ",".join(f'"{1000 + i}","static/chunks/{n}.js?dpl={self.site.deployment_id}"'
                          for i, n in enumerate(self.site.chunk_names().values()))
        tree = ('[[["",{"children":["__PAGE__?{\\"mode\\":\\"direct\\"}",{}]},"$undefined","$undefined",true],'
                '["",{"children":[["$","$L3",null,{"children":"$L4"}]]}],false]]')
        rows = ['2:"$Sreact.fragment"', '3:I[64624,[],""]', f'4:I[29989,[{chunks}],"default"]',
                f'0:{{"a":"$@1","f":{tree},"b":"{self.site.build_id}"}}', "1:" + compact(result),
                '5:["$","$L4",null,{"data-sentry-element":"Evaluation","children":"$L6"}]', "6:null"]
        return "\n".join(rows) + "\n"
