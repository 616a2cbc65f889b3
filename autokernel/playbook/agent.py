"""``ak-tune --strategy agent``: an LLM writes kernels, the tuner checks and times them.

The agent talks to the Anthropic Messages API with tool use and has exactly three tools: read the
task (reference semantics, the kernel contract, the built-in kernel's source, the playbook's rules for
the pattern with its floor formula and parameter space, and the notes of earlier runs on this GPU:
winners of the nearest shapes, candidates that failed on this one and why), read the best kernel so far
with its times, and submit a kernel (complete Triton source and/or a launch configuration).
A submission goes through the same child process and the same five correctness checks as every
search candidate before it is timed; the agent gets the verdict back (a submission that the notes say
failed on this shape before is not run again: the verdict is ``skipped``, with the old reason). It has
no shell and no file system; its source runs only in the tuner's child process.

The tuner knows nothing of the pattern: the problem object supplies the brief, and ``evaluate``
runs a candidate. API errors are retried with backoff by the SDK; if the API stays down, the
agent phase ends with :class:`AgentUnavailable` and the search's results stand.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("autokernel")

DEFAULT_MODEL = "claude-sonnet-4-5"

# USD per million (input, output) tokens: Anthropic's list prices when this table was written (late 2025).
# A model id matches its longest prefix here (``claude-sonnet-4-5-20250929`` is ``claude-sonnet-4-5``); an
# unknown model, or prices that changed, take ``ak-tune --agent-price IN,OUT``.
PRICES_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
}


def price_for(model: str, override: tuple[float, float] | None = None) -> tuple[float, float] | None:
    """USD per million (input, output) tokens of ``model``: ``override`` when given, else the table's entry
    for the longest prefix of the model id, else None (unknown)."""
    if override is not None:
        return override
    known = [name for name in PRICES_USD_PER_MTOK if model.startswith(name)]
    return PRICES_USD_PER_MTOK[max(known, key=len)] if known else None

TOOLS = [
    {"name": "read_task", "description": "The pattern's reference semantics, the kernel contract your source "
     "must satisfy, the built-in kernels' source to start from, the playbook (rules for fast memory-bound "
     "kernels, this pattern's DRAM floor formula and parameter space, what was measured on which GPU) and "
     "the notes of earlier tuning runs on this GPU (nearest shapes' winners, candidates that failed here).",
     "input_schema": {"type": "object", "properties": {}}},
    {"name": "read_best", "description": "The best kernel so far (config, and source if it is one), its times, "
     "Inductor's times and the DRAM floor on this shape.",
     "input_schema": {"type": "object", "properties": {}}},
    {"name": "submit_kernel", "description": "Check and time a candidate: complete Triton source defining the "
     "contract's kernels, and/or a launch config. Returns the check verdict or the times.",
     "input_schema": {"type": "object", "properties": {
         "source": {"type": "string", "description": "complete Python module with the @triton.jit kernels"},
         "config": {"type": "object", "description": "launch parameters (num_warps, rows per program, ...)"}}}},
]


class AgentUnavailable(Exception):
    """No API key, no SDK, or the API failed after retries."""


@dataclass
class AgentRun:
    turns: int = 0
    submissions: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    stop: str = ""

    def usage(self, model: str, price: tuple[float, float] | None = None) -> str:
        """Tokens and their cost in words, e.g. ``1200 input / 300 output tokens, $0.0081 (claude-sonnet-4-5 at
        $3/$15 per million)``; ``price`` overrides the table (:func:`price_for`)."""
        tokens = f"{self.input_tokens} input / {self.output_tokens} output tokens"
        rates = price_for(model, price)
        if rates is None:
            return f"{tokens}, cost unknown for {model} (give ak-tune --agent-price IN,OUT, USD per million tokens)"
        usd = (self.input_tokens * rates[0] + self.output_tokens * rates[1]) / 1e6
        return f"{tokens}, ${usd:.4f} ({model} at ${rates[0]:g}/${rates[1]:g} per million)"


def _client() -> Any:
    if not os.environ.get("ANTHROPIC_API_KEY"):
        raise AgentUnavailable("ANTHROPIC_API_KEY is not set")
    try:
        import anthropic
    except ImportError:
        raise AgentUnavailable("the agent needs the anthropic SDK: pip install 'autokernel[agent]'") from None
    # base_url comes from ANTHROPIC_BASE_URL when set (the tests point it at a local server).
    return anthropic.Anthropic(max_retries=4)


def run_agent(brief: dict[str, Any], best: Callable[[], dict[str, Any]],
              evaluate: Callable[[dict[str, Any]], dict[str, Any]], *, model: str = DEFAULT_MODEL,
              max_turns: int = 20, deadline: float | None = None,
              say: Callable[[str], None] = lambda _m: None, price: tuple[float, float] | None = None) -> AgentRun:
    """Run the loop until the model stops calling tools, ``max_turns`` replies have come back, or the
    ``deadline`` (a ``time.time()`` value) has passed. ``price``: USD per million (input, output) tokens, for
    the log (else the table's, :func:`price_for`)."""
    client = _client()
    import anthropic

    run = AgentRun()
    system = ("You optimize one Triton kernel pair for a GPU. Read the task, then submit kernels; each "
              "submission is checked against a float64 reference (forward and backward) and timed. Beat the "
              "best time; stop when you cannot improve further.")
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"Task: {brief['title']}. Start with read_task."}]
    while run.turns < max_turns:
        if deadline is not None and time.time() > deadline:
            run.stop = "budget"
            break
        try:
            reply = client.messages.create(model=model, max_tokens=8192, system=system, tools=TOOLS,
                                           messages=messages)
        except anthropic.APIError as exc:
            raise AgentUnavailable(f"{type(exc).__name__}: {exc}") from exc
        run.turns += 1
        run.input_tokens += reply.usage.input_tokens
        run.output_tokens += reply.usage.output_tokens
        run.stop = reply.stop_reason or ""
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
        calls = [b for b in reply.content if b.type == "tool_use"]
        if reply.stop_reason != "tool_use" or not calls:
            break
        results = []
        for call in calls:
            if call.name == "read_task":
                text = json.dumps(brief)
            elif call.name == "read_best":
                text = json.dumps(best())
            elif call.name == "submit_kernel":
                run.submissions += 1
                candidate = dict(call.input or {})
                say(f"agent submission {run.submissions}")
                text = json.dumps(evaluate(candidate))
            else:
                text = json.dumps({"error": f"unknown tool {call.name!r}"})
            results.append({"type": "tool_result", "tool_use_id": call.id, "content": text})
        messages.append({"role": "user", "content": results})
    logger.info("ak-tune agent: %d turns, %d submissions, %s, stop %s", run.turns, run.submissions,
                run.usage(model, price), run.stop)
    return run
