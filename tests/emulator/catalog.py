"""The model list as served (§9, U9): the fixture list, plus the 2026 fields (``displayName``,
``userSelectable``) and the "max" router model when their knobs are on."""

from __future__ import annotations

from .core import Core

ROUTER_MODEL_ID = "019b3f00-0000-7000-8000-00000000a001"
ROUTER_PUBLIC_NAME = "max"


def display_name(public_name: str) -> str:
    return " ".join(w.capitalize() for w in public_name.replace("-", " ").split())


class Catalog:
    def __init__(self, core: Core, models: list[dict]) -> None:
        self.core = core
        self.models = models
        self.base_by_id = {m["id"]: m for m in models}

    def router_target(self) -> dict | None:
        """The model the router says it chose (``router_model`` knob: its publicName or id)."""
        name = self.core.knobs["router_model"]
        if not name:
            return None
        return next((m for m in self.models if name in (m["id"], m.get("publicName")) and m.get("organization")),
                    None)

    def router_entry(self) -> dict:
        return {"id": ROUTER_MODEL_ID, "organization": "lmarena", "provider": "router",
                "publicName": ROUTER_PUBLIC_NAME, "name": "max-router",
                "capabilities": {"inputCapabilities": {"text": True}, "outputCapabilities": {"text": True}},
                "rankByModality": {"chat": 9007199254740991}}

    def selectable(self, model: dict) -> bool:
        listed = self.core.knobs["unselectable_models"] or []
        return model["id"] not in listed and model.get("publicName") not in listed

    def _decorate(self, model: dict) -> dict:
        fields = bool(self.core.knobs["model_fields_2026"])
        if self.selectable(model) and not fields:
            return model
        out = dict(model)
        if fields:
            out["displayName"] = display_name(model.get("publicName", ""))
        out["userSelectable"] = self.selectable(model)
        return out

    def served(self) -> list[dict]:
        """The list the page embeds."""
        models = self.models + ([self.router_entry()] if self.router_target() else [])
        listed = self.core.knobs["unselectable_models"] or self.core.knobs["model_fields_2026"]
        return [self._decorate(m) for m in models] if listed else models

    def get(self, model_id: object) -> dict | None:
        if not isinstance(model_id, str):
            return None
        if model_id == ROUTER_MODEL_ID and self.router_target():
            return self.router_entry()
        return self.base_by_id.get(model_id)
