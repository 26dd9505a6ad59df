"""A STUB of OpenAI's moderation endpoint: its response shape only, never its judgement.

``ModerationStub`` serves ``POST /v1/moderations`` on 127.0.0.1 with the body OpenAI returns for
omni-moderation-latest (``id``, ``model``, ``results[0]`` with ``flagged``, the 13 ``categories``, their
``category_scores`` and ``category_applied_input_types``), so that the cluster profile's moderation path
(``safety.profile_filter`` -> the official client -> ``safety.moderate``) runs end to end without an API key.
It is not a moderation model: it flags a text when it contains one of a few words (``STUB_WORDS``), under
"violence". Its answers say so: the model name is ``STUB_MODEL``, so every verdict it gives is labelled
``openai:stub-...`` wherever the chapters print who answered.
"""

from __future__ import annotations

import re
from typing import Any

from json_stub import JsonStub

# OpenAI's 13 moderation categories (omni-moderation-latest), in the order its API reference lists them.
OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
                     "violence/graphic")
STUB_MODEL = "stub-not-openai-omni-moderation-shape-only"
STUB_WORDS = ("attack", "bomb", "poison", "weapon")


class ModerationStub:
    """Serve a stub of OpenAI's ``POST /v1/moderations`` (response shape only; flags ``STUB_WORDS``) until
    ``close()``; ``base_url`` ends in /v1, ``requests`` holds (path, body) of every call."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._pattern = re.compile(r"\b(" + "|".join(STUB_WORDS) + r")", re.IGNORECASE)
        self._server = JsonStub(self._respond)
        self.base_url = self._server.base_url

    def _respond(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((path, body))
        if path != "/v1/moderations":
            return {"error": {"message": f"the moderation stub serves POST /v1/moderations only, not {path}",
                              "type": "invalid_request_error"}}
        hit = bool(self._pattern.search(str(body.get("input", ""))))
        result = {"flagged": hit,
                  "categories": {name: hit and name == "violence" for name in OPENAI_CATEGORIES},
                  "category_scores": {name: 0.9 if hit and name == "violence" else 0.001 for name in OPENAI_CATEGORIES},
                  "category_applied_input_types": {name: ["text"] for name in OPENAI_CATEGORIES}}
        return {"id": "modr-stub", "model": STUB_MODEL, "results": [result]}

    def close(self) -> None:
        self._server.close()
