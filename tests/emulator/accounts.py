"""Accounts and sessions (protocol §4): JWTs, the ``arena-auth-prod-v1`` cookie in its forms, Supabase refresh
tokens with rotation, and the Supabase refresh grant (E10)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
import uuid
from typing import Any
from urllib.parse import unquote

from .common import AUTH_COOKIE, CHUNK_COOKIE_RE, b64_any_decode, b64url, compact, iso_time
from .core import Core
from .http import Handler, Request, send


def encode_session(session: dict, alphabet: str = "url", padding: bool = False) -> str:
    raw = compact(session).encode("utf-8")
    enc = base64.b64encode(raw).decode() if alphabet == "std" else base64.urlsafe_b64encode(raw).decode()
    return "base64-" + (enc if padding else enc.rstrip("="))


def decode_session(value: object) -> dict | None:
    """Cookie value -> session dict, or None.  Accepts quotes, %-encoding, both alphabets, raw JSON."""
    if not isinstance(value, str):
        return None
    v = value.strip().strip('"')
    if "%" in v:
        v = unquote(v)
    try:
        if v.startswith("base64-"):
            obj = json.loads(b64_any_decode(v[len("base64-"):]).decode("utf-8"))
        elif v.startswith("{"):
            obj = json.loads(v)
        else:
            return None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def split_session(value: str, chunk_size: int = 3180) -> list[str]:
    """Chunk values for ``arena-auth-prod-v1.0``, ``.1``, … (plain slices; ``base64-`` stays in chunk 0)."""
    return [value[i:i + chunk_size] for i in range(0, len(value), chunk_size)] or [""]


def auth_cookie_names(cookies: dict) -> list[str]:
    return [n for n in cookies if n == AUTH_COOKIE or n.startswith(AUTH_COOKIE + ".")]


def _identities(acct: dict, email: str, iso: str, rng_uuid: Any) -> list[dict]:
    """Logged-in users carry a large identity list: the usual reason for cookie chunking."""
    out = []
    for n in range(3):
        out.append({"identity_id": rng_uuid(), "id": str(10 ** 20 + n), "user_id": acct["supabase_id"],
                    "identity_data": {"avatar_url": "https://lh3.googleusercontent.com/a/" + "B" * 400,
                                      "email": email, "email_verified": True,
                                      "full_name": "Fake Arena User", "iss": "https://accounts.google.com",
                                      "name": "Fake Arena User", "sub": str(10 ** 20 + n)},
                    "provider": "google", "last_sign_in_at": iso, "created_at": iso,
                    "updated_at": iso, "email": email})
    return out


class Accounts:
    """Account records, the sessions issued for them and their refresh tokens."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.accounts: dict[str, dict] = {}
        self._refresh: dict[str, dict] = {}
        self._forced_expired: set[str] = set()
        self.anon_key = self.jwt({"iss": "supabase", "ref": "fakearena", "role": "anon",
                                  "iat": 1700000000, "exp": 2000000000}, alg="HS256")

    # --- JWTs ---------------------------------------------------------------------------------------------------

    def jwt(self, claims: dict, alg: str = "ES256") -> str:
        secret = self.core.secret
        header = {"alg": alg, "typ": "JWT"} if alg != "ES256" else {"alg": "ES256", "kid": str(uuid.UUID(
            int=int.from_bytes(secret[:16], "big"), version=4)), "typ": "JWT"}
        signing = b64url(compact(header).encode()) + "." + b64url(compact(claims).encode())
        mac = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
        return signing + "." + b64url(mac + hashlib.sha256(mac).digest())  # 64 bytes, like an ES256 signature

    def jwt_claims(self, token: str) -> dict | None:
        """Claims of a JWT this emulator signed, else None (signature is checked, expiry is not)."""
        try:
            head, payload, sig = token.split(".")
            mac = hmac.new(self.core.secret, f"{head}.{payload}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(b64_any_decode(sig), mac + hashlib.sha256(mac).digest()):
                return None
            claims = json.loads(b64_any_decode(payload))
        except ValueError:
            return None
        return claims if isinstance(claims, dict) else None

    # --- accounts and sessions ------------------------------------------------------------------------------------

    def new_account(self, uid: str | None = None, anonymous: bool = True, big: bool = False) -> dict:
        core = self.core
        uid = uid or core.uuid4()
        acct = {"id": uid, "supabase_id": core.uuid4(), "anonymous": anonymous, "big": big,
                "created_at": iso_time(core.now())}
        with core.lock:
            self.accounts[uid] = acct
        return acct

    def make_session(self, acct: dict, lifetime: int) -> dict:
        """Session JSON with the keys and key order of §4.1 and an access token per §4.2."""
        core = self.core
        now = int(core.now())
        iso = iso_time(now)
        anonymous, big = acct["anonymous"], acct["big"]
        email = "" if anonymous else f"user-{acct['id'][:8]}@example.org"
        provider = "google" if big else "email"
        app_meta = {} if anonymous else {"provider": provider, "providers": [provider]}
        user_meta: dict[str, Any] = {"id": acct["id"]}
        identities = []
        if big:
            user_meta.update({"avatar_url": "https://lh3.googleusercontent.com/a/" + "A" * 300,
                              "full_name": "Fake Arena User", "email_verified": True})
            identities = _identities(acct, email, iso, core.uuid4)
        claims = {"iss": core.url + "/auth/v1", "sub": acct["supabase_id"], "aud": "authenticated",
                  "exp": now + int(lifetime), "iat": now, "email": email, "phone": "", "app_metadata": app_meta,
                  "user_metadata": user_meta, "role": "authenticated", "aal": "aal1",
                  "amr": [{"method": "anonymous" if anonymous else "password", "timestamp": now}],
                  "session_id": core.uuid4(), "is_anonymous": anonymous}
        refresh_token = core.token_chars(12, string.ascii_lowercase + string.digits)
        session = {"access_token": self.jwt(claims), "token_type": "bearer", "expires_in": int(lifetime),
                   "expires_at": now + int(lifetime), "refresh_token": refresh_token,
                   "user": {"id": acct["supabase_id"], "aud": "authenticated", "role": "authenticated",
                            "email": email, "phone": "", "last_sign_in_at": iso, "app_metadata": app_meta,
                            "user_metadata": user_meta, "identities": identities, "created_at": acct["created_at"],
                            "updated_at": iso, "is_anonymous": anonymous}}
        with core.lock:
            self._refresh[refresh_token] = {"uid": acct["id"], "lifetime": int(lifetime), "used_at": None,
                                            "successor": None}
        return session

    def new_session(self, lifetime: int = 3600, anonymous: bool = True, alphabet: str = "url",
                    padding: bool = False, big: bool = False) -> str:
        """Create an account and return its cookie value ``base64-…``."""
        acct = self.new_account(anonymous=anonymous, big=big)
        return encode_session(self.make_session(acct, lifetime), alphabet, padding)

    def session_info(self, value: str) -> tuple[str, bool, dict] | None:
        """(uid, expired, session) for a cookie value signed by us, else None."""
        session = decode_session(value)
        if not session or not isinstance(session.get("access_token"), str):
            return None
        claims = self.jwt_claims(session["access_token"])
        if not claims or claims.get("iss") != self.core.url + "/auth/v1":
            return None
        uid = (claims.get("user_metadata") or {}).get("id")
        if uid not in self.accounts:
            return None
        expired = self.core.now() >= float(claims.get("exp", 0)) or session["access_token"] in self._forced_expired
        return uid, expired, session

    def session_user(self, value: str) -> str | None:
        """Arena user id of a cookie value (signature checked, expiry ignored); None if not one of ours."""
        info = self.session_info(value)
        return info[0] if info else None

    def expire_session(self, value: str) -> None:
        """Make this session count as expired from now on (a refresh is then needed)."""
        session = decode_session(value)
        if session and session.get("access_token"):
            with self.core.lock:
                self._forced_expired.add(session["access_token"])

    def from_cookies(self, cookies: dict) -> tuple[str | None, str, dict | None]:
        """Best session in the request: whole cookie and/or chunks, preferring a valid, later-expiring one.

        Returns (uid or None, state, session or None) with state "ok" | "expired" | "invalid" | "missing"."""
        candidates = [cookies[AUTH_COOKIE]] if cookies.get(AUTH_COOKIE) else []
        chunks = {int(m.group(1)): v for name, v in cookies.items() if (m := CHUNK_COOKIE_RE.fullmatch(name))}
        if chunks:
            candidates.append("".join(chunks[i] for i in sorted(chunks)))
        if not candidates:
            return None, "missing", None
        infos = [info for c in candidates if (info := self.session_info(c)) is not None]
        if not infos:
            return None, "invalid", None
        uid, expired, session = max(infos, key=lambda i: (not i[1], i[2].get("expires_at") or 0))
        return uid, ("expired" if expired else "ok"), session

    def kill(self, uid: str) -> None:
        """U9: the account is gone server-side; its still well-signed session gets ``a3:"User not found"``
        and can no longer be refreshed."""
        if uid not in self.accounts:
            raise ValueError(f"unknown account {uid!r}")
        with self.core.lock:
            self.accounts[uid]["dead"] = True

    def use_refresh_token(self, rt: object) -> dict | None:
        """Supabase rotation: first use issues a successor; reuse within the grace returns it; later → None."""
        with self.core.lock:
            rec = self._refresh.get(rt) if isinstance(rt, str) else None
            if rec is None or self.accounts[rec["uid"]].get("dead"):
                return None
            now = self.core.now()
            if rec["used_at"] is not None:
                if now - rec["used_at"] <= float(self.core.knobs["refresh_grace"]):
                    return rec["successor"]
                return None
            # A session made already expired (a test's negative lifetime) refreshes to a normal one.
            lifetime = rec["lifetime"] if rec["lifetime"] > 0 else int(self.core.knobs["session_lifetime"])
            new = self.make_session(self.accounts[rec["uid"]], lifetime)
            rec["used_at"], rec["successor"] = now, new
            return new

    def session_cookies(self, value: str, form: str, had_names: list[str] | tuple = ()) -> list[str]:
        """Set-Cookie values for a session in "whole" or "chunks" form, deleting the other form."""
        attrs = "Path=/; Max-Age=34560000; SameSite=Lax"
        if form != "chunks":
            return [f"{AUTH_COOKIE}={value}; {attrs}"] + [
                f"{n}=; Path=/; Max-Age=0" for n in had_names if n.startswith(AUTH_COOKIE + ".")]
        size = int(self.core.knobs["chunk_size"])
        if len(value) <= size:
            size = max(1, (len(value) + 1) // 2)
        parts = split_session(value, size)
        out = [f"{AUTH_COOKIE}.{i}={p}; {attrs}" for i, p in enumerate(parts)]
        out.append(f"{AUTH_COOKIE}=; Path=/; Max-Age=0")
        out += [f"{name}=; Path=/; Max-Age=0" for name in had_names
                if (m := CHUNK_COOKIE_RE.fullmatch(name)) and int(m.group(1)) >= len(parts)]
        return out

    def rotated_cookies(self, cookies: dict, form: str) -> list[str]:
        """Set-Cookie for a fresh session replacing the request's one (its refresh token used), or []."""
        _, _, session = self.from_cookies(cookies)
        new = self.use_refresh_token((session or {}).get("refresh_token"))
        return self.session_cookies(encode_session(new), form, auth_cookie_names(cookies)) if new else []

    # --- the Supabase refresh grant (E10) ---------------------------------------------------------------------------

    def refresh_grant(self, h: Handler, req: Request) -> None:
        if req.method != "POST":
            return send(h, 405, {"message": "Method not allowed"})
        if req.headers.get("apikey") != self.anon_key:
            return send(h, 401, {"message": "Invalid API key",
                                 "hint": "Double check your Supabase `anon` or `service_role` API key."})
        if req.query.get("grant_type") != "refresh_token":
            return send(h, 400, {"code": 400, "error_code": "validation_failed", "msg": "Unsupported grant type"})
        new = self.use_refresh_token(req.obj.get("refresh_token"))
        if new is None:
            return send(h, 400, {"code": 400, "error_code": "refresh_token_not_found",
                                 "msg": "Invalid Refresh Token: Refresh Token Not Found"})
        return send(h, 200, new)
