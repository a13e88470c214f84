"""The page and discovery (E1, E11, §9, §11): build and action ids, the sitekey, JS chunks, the Next.js page with
its flight data, and the cookies and session refresh a page GET performs."""

from __future__ import annotations

import base64
import hashlib
import os

from .accounts import Accounts, auth_cookie_names, encode_session
from .catalog import Catalog
from .common import V2_SITEKEY, b64url, compact, js_string
from .core import Core
from .http import Handler, Request, send

JS_TYPE = "application/javascript; charset=utf-8"


V2_CONTAINER = '<div id="recaptcha-v2-container"></div>'


def auto_signup_script(turnstile_sitekey: str | None, sitekey: str) -> str:
    """The page signs up by itself when it has no auth cookie (the ``page_auto_signup`` knob): with a Turnstile
    token first, or with the 2026 body alone when the page has no Turnstile (U5)."""
    widget = "true" if turnstile_sitekey else "false"
    return ("<script>(function(){if(/(^|; )arena-auth-prod-v1(\\.0)?=/.test(document.cookie))return;"
            "function pid(){var m=document.cookie.match(/(?:^|; )provisional_user_id=([^;]+)/);if(m)return m[1];"
            "try{return localStorage.getItem('provisional_user_id')||''}catch(e){return ''}}"
            "function send(b){grecaptcha.enterprise.ready(function(){grecaptcha.enterprise.execute('" + sitekey
            + "',{action:'sign_up'}).then(function(r){b.recaptchaToken=r;b.provisionalUserId=pid();"
            "return fetch('/nextjs-api/sign-up',{method:'POST',headers:{'Content-Type':'application/json'},"
            "body:JSON.stringify(b)})}).then(function(res){window.__arenaSignUp=res.status})})}"
            "function go(){if(" + widget + "&&!window.turnstile||!window.grecaptcha||!grecaptcha.enterprise)"
            "return setTimeout(go,50);if(!" + widget + ")return send({});"
            "turnstile.render('#signup-turnstile',{sitekey:'" + (turnstile_sitekey or "") + "',"
            "callback:function(t){send({turnstileToken:t})}})}go()})()</script>")


# U5: the 2026 page keeps the provisional id in localStorage when there is no cookie.
PROVISIONAL_ID_SCRIPT = ("<script>(function(){try{if(!localStorage.getItem('provisional_user_id'))"
                         "localStorage.setItem('provisional_user_id',crypto.randomUUID())}catch(e){}})()</script>")


def flight_push(text: str) -> str:
    return "<script>self.__next_f.push([1," + js_string(text).replace("<", "\\u003c") + "])</script>"


class Site:
    """Deployment parameters (build id, action ids, sitekey) and everything served from them."""

    def __init__(self, core: Core, catalog: Catalog, turnstile_sitekey: str, sitekey: str) -> None:
        self.core = core
        self.catalog = catalog
        self.sitekey = sitekey
        self.v2_sitekey = V2_SITEKEY
        self.turnstile_sitekey = turnstile_sitekey
        self.anon_key = ""
        self.redeploy()

    def redeploy(self) -> None:
        """New build id, deployment id, chunk names and action ids; the old ones answer 404."""
        core = self.core
        with core.lock:
            self.build_id = core.token_chars(21)
            self.deployment_id = "dpl_" + core.token_chars(28, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                               "0123456789")
            self.action_ids = {"generateUploadUrl": "70" + core.hex(40), "getSignedUrl": "60" + core.hex(40)}
            self.decoy_action_id = "40" + core.hex(40)

    def rotate_sitekey(self, new: str | None = None) -> None:
        self.sitekey = new or ("6L" + self.core.token_chars(38))

    # --- JS chunks (E11) ----------------------------------------------------------------------------------------------

    def chunk_names(self) -> dict[str, str]:
        """Chunk file names derive from build id and sitekey, so a redeploy or rotation renames them."""
        def h(tag: str) -> str:
            return hashlib.sha1(f"{self.build_id}/{self.sitekey}/{tag}".encode()).hexdigest()[:16]
        return {"webpack": f"webpack-{h('w')}", "actions": h("a"), "auth": h("s")}

    def _webpack_js(self) -> str:
        return ('(()=>{"use strict";var e={},t={};function r(o){var n=t[o];if(void 0!==n)return n.exports;'
                'var a=t[o]={exports:{}};return e[o](a,a.exports,r),a.exports}r.m=e;self.__webpack_require__=r})();')

    def _mint_js(self) -> str:
        """The reCAPTCHA call site (U8): with the action as a literal for chat_submit, or only as a variable,
        as in the real 2025-11 chunk."""
        variable = 'grecaptcha.enterprise.execute("' + self.sitekey + '",{action:e})'
        if self.core.knobs["sitekey_call_site"] == "variable":
            return "return " + variable + "}"
        if self.core.knobs["sitekey_call_site"] == "hidden":   # built at run time: no text search finds it
            return "return grecaptcha.enterprise.execute(" + self.hidden_sitekey() + ",{action:e})}"
        return ('return e===r.submit?grecaptcha.enterprise.execute("' + self.sitekey + '",{action:"chat_submit"}):'
                + variable + "}")

    def _actions_js(self) -> str:
        ids = self.action_ids
        return (
            '"use strict";(self.webpackChunk_N_E=self.webpackChunk_N_E||[]).push([[4321],{71234:(e,t,n)=>{'
            'n.d(t,{generateUploadUrl:()=>o,getSignedUrl:()=>i,deleteEvaluationSession:()=>d});var s=n(35001);'
            f'let o=(0,s.createServerReference)("{ids["generateUploadUrl"]}",s.callServer,void 0,'
            's.findSourceMapURL,"generateUploadUrl"),'
            f'i=(0,s.createServerReference)("{ids["getSignedUrl"]}",s.callServer,void 0,'
            's.findSourceMapURL,"getSignedUrl"),'
            f'd=(0,s.createServerReference)("{self.decoy_action_id}",s.callServer,void 0,'
            's.findSourceMapURL,"deleteEvaluationSession")},'
            + self._mint_module() + '}]);')

    def _mint_module(self) -> str:
        """The token minting module; a deployment without reCAPTCHA mints nothing."""
        if self.core.knobs["recaptcha"] == "absent":
            return '81234:(e,t,n)=>{n.d(t,{mint:()=>a});async function a(e){return null}}'
        return ('81234:(e,t,n)=>{n.d(t,{mint:()=>a});let r={submit:"chat_submit",retry:"chat_retry",signUp:"sign_up"};'
                'async function a(e){await new Promise(t=>window.grecaptcha.enterprise.ready(t));'
                + self._mint_js() +
                f'let v2key="{self.v2_sitekey}",c="recaptcha-v2-container"}}')

    def _auth_js(self) -> str:
        return ('"use strict";(self.webpackChunk_N_E=self.webpackChunk_N_E||[]).push([[8765],{35999:(e,t,n)=>{'
                f'let r="{self.core.url}",o={self._anon_key_literal()};'
                't.createClient=()=>(0,n(1).createBrowserClient)(r,o,{cookieOptions:{name:"arena-auth-prod-v1"}})}}]);')

    def _anon_key_literal(self) -> str:
        """U10: the real 2025-11 chunks carry no Supabase anon key."""
        return f'"{self.anon_key}"' if self.core.knobs["anon_key_in_chunks"] else "void 0"

    def chunk(self, h: Handler, req: Request) -> None:
        name = req.path[len("/_next/static/chunks/"):]
        builders = {"webpack": self._webpack_js, "actions": self._actions_js, "auth": self._auth_js}
        for which, n in self.chunk_names().items():
            if name == n + ".js":
                return send(h, 200, builders[which](), JS_TYPE,
                            headers=[("Cache-Control", "public, max-age=31536000, immutable")])
        return send(h, 404, "Not Found", "text/plain")

    # --- the page (E1) ------------------------------------------------------------------------------------------------

    def flight_text(self, with_models: bool = True) -> tuple[str, str]:
        names = self.chunk_names()
        chunk_refs = ",".join(f'"{1000 + i}","static/chunks/{n}.js?dpl={self.deployment_id}"'
                              for i, n in enumerate(names.values()))
        models = self.catalog.models
        first_chat = next((m["id"] for m in models if m.get("organization")
                           and (m.get("capabilities") or {}).get("outputCapabilities", {}).get("text")),
                          models[0]["id"])
        listing = f'"initialModels":{compact(self.catalog.served())},' if with_models else ""
        head = (f'0:{{"P":null,"b":"{self.build_id}","p":"","c":["",""],"i":false}}\n'
                f'2:I[71234,[{chunk_refs}],"default"]\n'
                f'3:I[81234,[{chunk_refs}],"ModelProvider"]\n')
        payload = (f'5:["$","$L3",null,{{{listing}"initialModelAId":"{first_chat}",'
                   f'"initialModelBId":null,"initialModality":"chat","children":["$","$L2",null,{{}}]}}]\n')
        text = head + payload
        if not self.core.knobs["flight_split"]:
            return text, ""
        cut = len(head) + len(payload) // 2
        return text[:cut], text[cut:]

    def recaptcha_tags(self) -> str:
        """How the page names its sitekey (U8): ``render=<key>``, ``k=<key>`` in an anchor URL, or nowhere."""
        if self.core.knobs["recaptcha"] == "absent":
            return ""
        host = self.core.knobs["recaptcha_script_host"] or ""
        where = self.core.knobs["sitekey_in_page"]
        render = self.sitekey if where == "render" else "explicit"
        return f'<script src="{host}/recaptcha/enterprise.js?render={render}" async=""></script>'

    def hidden_sitekey(self) -> str:
        """A JS expression giving the sitekey that holds neither the key nor ``render=``/``k=`` (U8)."""
        return "atob(" + js_string(base64.b64encode(self.sitekey[::-1].encode()).decode()) + ").split('').reverse().join('')"

    def live_bootstrap(self) -> str:
        """With ``sitekey_in_page: live`` the page's own code executes reCAPTCHA once loaded, so the key is in the
        live ``___grecaptcha_cfg`` only (U8)."""
        if self.core.knobs["sitekey_in_page"] != "live":
            return ""
        return ("<script>(function go(){var g=window.grecaptcha&&window.grecaptcha.enterprise;if(!g)return setTimeout(go,50);"
                "g.ready(function(){g.execute(" + self.hidden_sitekey() + ",{action:'homepage'})})})()</script>")

    def recaptcha_anchor(self) -> str:
        """With ``sitekey_in_page: k`` the key is in the invisible widget's anchor iframe, as grecaptcha renders it."""
        if self.core.knobs["sitekey_in_page"] != "k" or self.core.knobs["recaptcha"] == "absent":
            return ""
        host = self.core.knobs["recaptcha_script_host"] or ""
        return (f'<iframe title="reCAPTCHA" width="256" height="60" style="display:none" src="{host}/recaptcha/'
                f'enterprise/anchor?ar=1&amp;k={self.sitekey}&amp;hl=en&amp;size=invisible"></iframe>')

    def page_html(self, with_models: bool = True) -> str:
        knobs = self.core.knobs
        scripts = "".join(f'<script src="/_next/static/chunks/{n}.js?dpl={self.deployment_id}" async=""></script>'
                          for n in self.chunk_names().values())
        part1, part2 = self.flight_text(with_models)
        pushes = flight_push(part1) + (flight_push(part2) if part2 else "")
        with_turnstile = knobs["signup_turnstile"] != "none"
        signup = auto_signup_script(self.turnstile_sitekey if with_turnstile else None, self.sitekey) \
            if knobs["page_auto_signup"] else ""
        if knobs["provisional_id_store"] == "local_storage":
            signup = PROVISIONAL_ID_SCRIPT + signup
        turnstile = '<script src="/turnstile/v0/api.js?render=explicit" async=""></script>' if with_turnstile else ""
        widget = '<div id="signup-turnstile"></div>' if with_turnstile else ""
        return ("<!DOCTYPE html><html lang=\"en\"><head><meta charSet=\"utf-8\"/>"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
                f"<title>LMArena</title>{scripts}{self.recaptcha_tags()}{turnstile}"
                f"</head><body><main id=\"root\"><h1>LMArena</h1>{widget}"
                f"{'' if knobs['recaptcha'] == 'absent' else V2_CONTAINER}</main>{self.recaptcha_anchor()}"
                "<script>(self.__next_f=self.__next_f||[]).push([0])</script>"
                f"{pushes}{self.live_bootstrap()}{signup}</body></html>")


class Page:
    """``GET /`` and friends: the HTML, Cloudflare's and the visitor cookies, and the middleware refresh."""

    def __init__(self, core: Core, site: Site, accounts: Accounts) -> None:
        self.core, self.site, self.accounts = core, site, accounts

    def visitor_cookies(self, req: Request) -> list[str]:
        core = self.core
        cookies = []
        if "__cf_bm" not in req.cookies:
            cookies.append(f"__cf_bm={b64url(os.urandom(40))}-{int(core.now())}-1.0.1.1-x; Path=/; Max-Age=1800; "
                           "HttpOnly")
        if "_cfuvid" not in req.cookies:
            cookies.append(f"_cfuvid={core.hex(40)}-{int(core.now() * 1000)}-0.0.1.1-604800000; Path=/; HttpOnly")
        if "provisional_user_id" not in req.cookies and core.knobs["provisional_id_store"] == "cookie":
            cookies.append(f"provisional_user_id={core.uuid4()}; Path=/; Max-Age=31536000; SameSite=Lax")
        return cookies

    def refreshed_cookies(self, req: Request) -> list[str]:
        """Middleware refresh: an expired but well-formed session comes back fresh (§4.5 step 1)."""
        _, state, session = self.accounts.from_cookies(req.cookies)
        if state != "expired" or session is None:
            return []
        new = self.accounts.use_refresh_token(session.get("refresh_token"))
        if not new:
            return []
        req.log["note"] = "session refreshed"
        return self.accounts.session_cookies(encode_session(new), self.core.knobs["refresh_cookie_form"],
                                             auth_cookie_names(req.cookies))

    def lists_models(self, req: Request) -> bool:
        """U10: with ``models_at: direct_only`` the list is only at ``/?mode=direct`` (and ``/text/direct``)."""
        if self.core.knobs["models_at"] != "direct_only":
            return True
        return req.query.get("mode") == "direct" or req.path.startswith("/text/direct")

    def serve(self, h: Handler, req: Request) -> None:
        cookies = self.visitor_cookies(req) + self.refreshed_cookies(req)
        send(h, 200, self.site.page_html(self.lists_models(req)), "text/html; charset=utf-8", cookies=cookies,
             headers=[("x-powered-by", "Next.js"), ("Cache-Control", "private, no-cache, no-store")])
