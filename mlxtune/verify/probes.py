"""The prompts every hop is checked on: a sample of the run's held-out data plus fixed probes that exercise the
template (a system prompt, a multi-turn chat, an empty user message, non-ASCII text), and feature probes where the
template has the feature: a tool call (a template that reads `tools`) and both settings of a thinking switch (a
template that reads `enable_thinking`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxtune.data.dataset import scored_split
from mlxtune.data.formats import Record

FIXED_PROBES = {
    "system prompt": [{"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
                      {"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [{"role": "user", "content": "Hi! Can you help me?"},
                   {"role": "assistant", "content": "Of course. What do you need?"},
                   {"role": "user", "content": "Tell me a short story about a cat."}],
    "empty user message": [{"role": "user", "content": ""}],
    "non-ASCII": [{"role": "user",
                   "content": "Ünïcödé: café, naïve, 中文, 日本語, emoji 😀 — “quotes”?"}],
}


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                   "required": ["city"]}}}]
TOOL_CALL = [{"role": "user", "content": "What is the weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "18 °C, sunny"}]
THINKING_QUESTION = [{"role": "user", "content": "What is 17 + 25?"}]


@dataclass
class Probe:
    name: str
    messages: list[dict] | None  # the conversation up to the reply (None: a plain-text run)
    text: str | None  # a plain-text run's prompt
    answer: str | None  # the data's reference reply; None: the reference model's own greedy reply is used
    tools: list[dict] | None = None  # a feature probe: the tools offered
    switches: dict = field(default_factory=dict)  # a feature probe: template variables, e.g. enable_thinking

    @property
    def feature(self) -> str | None:
        """"tools" or a switch's name: a probe checked for rendering only (its reply is not compared)."""
        return "tools" if self.tools else next(iter(self.switches), None)

    def record(self, answer: str) -> Record:
        """The probe completed by `answer`, as a training record (rendered and masked exactly as training does)."""
        if self.messages is None:
            return Record("text", self.name, text=self.text + answer)
        return Record("chat", self.name, messages=[*self.messages, {"role": "assistant", "content": answer}])


def _from_record(record: Record) -> Probe | None:
    if record.kind == "text":
        text = record.text or ""
        cut = text.rfind("\n") + 1 if "\n" in text.rstrip("\n") else len(text) // 2
        return Probe(record.source, None, text[:cut], text[cut:]) if text[cut:] else None
    messages = record.chat_messages()
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not messages[last].get("content") or messages[last].get("tool_calls"):
        return None
    prompt = [{k: m[k] for k in ("role", "content")} for m in messages[:last]]
    if any(not isinstance(m["content"], str) for m in prompt):
        return None
    return Probe(record.source, prompt, None, messages[last]["content"])


def _from_pair(pair) -> Probe | None:
    """A preference pair's prompt, with its chosen answer as the reference."""
    if len(pair.chosen) != 1 or not isinstance(pair.chosen[0].get("content"), str) or not pair.chosen[0]["content"]:
        return None
    prompt = [{"role": m["role"], "content": m["content"]} for m in pair.prompt]
    if any(not isinstance(m["content"], str) for m in prompt):
        return None
    return Probe(pair.source, prompt, None, pair.chosen[0]["content"])


def _held_out(run) -> list[Probe | None]:
    s = run.settings
    if run.info.get("objective") in ("dpo", "orpo"):  # a preference run: its held-out pairs' chosen answers
        from mlxtune.data.preference import read_preference_splits

        splits = read_preference_splits(s.data, s.seed, skip_invalid=True).records
        return [_from_pair(pair) for pair in splits.get("test") or splits.get("valid") or splits["train"]]
    held_out = scored_split(None, s.data, s.seed, s.dataset_options().get("keys"))
    return [_from_record(record) for record in held_out.records]


def build_probes(run, samples: int, chat: bool) -> list[Probe]:
    """Up to `samples` held-out records of the run (split as training split them) and, for a run with a chat
    template, the fixed probes."""
    probes = []
    for probe in _held_out(run):
        if len(probes) == samples:
            break
        if probe is not None:
            probes.append(probe)
    if chat:
        probes += [Probe(name, messages, None, None) for name, messages in FIXED_PROBES.items()]
    return probes


def feature_probes(template: str | None) -> list[Probe]:
    """A tool call where the template reads `tools`; the thinking switch on and off where it reads
    `enable_thinking` (Qwen3's and similar templates)."""
    if template is None:
        return []
    probes = []
    if "tools" in template:
        probes.append(Probe("tool call", TOOL_CALL, None, None, tools=TOOLS))
    if "enable_thinking" in template:
        probes += [Probe(f"thinking {'on' if on else 'off'}", THINKING_QUESTION, None, None,
                         switches={"enable_thinking": on}) for on in (True, False)]
    return probes
