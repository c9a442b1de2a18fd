"""Text generation for causal LMs: the KServe / Triton *generate* extension's requests and runs.

A request is the extension's JSON object::

    {
        "text_input": "Once upon a time",
        "parameters": {
            "max_tokens": 32,
            "temperature": 0.8,
            "top_p": 0.95,
            "top_k": 50,
            "seed": 7,
            "stop": ["\\n\\n"],
        },
    }

or, for a chat model, the conversation instead of ``text_input``::

    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}

(exactly one of the two; roles ``system``, ``user``, ``assistant``; at most
:data:`MAX_MESSAGES` messages). The conversation is rendered by the sealed tokenizer's own chat
template (``apply_chat_template(..., add_generation_prompt=True)``: transformers' sandboxed
Jinja environment) and tokenized as transformers does it (no special tokens added: the template
writes them). No request field supplies or names a template; a model whose sealed tokenizer
has none refuses ``messages``.

A request is answered with ``{"model_name", "model_version", "text_output", "finish_reason"}``:
``text_output`` holds the generated text only (not the prompt), cut before the first stop
string; ``finish_reason`` is ``"stop"`` (end of sequence token or a stop string) or
``"length"`` (``max_tokens`` reached).

Generation is transformers' ``model.generate`` (KV cache, the sealed
``generation_config.json`` as defaults) on the prompt tokenized by the sealed tokenizer:
greedy unless ``temperature`` is above 0, then sampling with ``top_p`` / ``top_k``. Sampling
draws from PyTorch's global generator, so sampling requests run one at a time, each seeded
(``seed``, or a fresh random seed): the same seed gives the same text on the same machine.
Runs in the inference thread pool; a run stops early when its client goes away.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import torch

from sealtorch.serving.errors import RequestError, show
from sealtorch.serving.text import CAUSAL_LM

if TYPE_CHECKING:
    from sealtorch.serving.model import ServedModel

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_MESSAGES",
    "ROLES",
    "ChatMessage",
    "GenerateRequest",
    "GenerateResult",
    "StopFilter",
    "can_generate",
    "encode_prompt",
    "generate",
    "has_chat_template",
    "parse_generate_request",
    "render_chat",
]

#: ``max_tokens`` when a request gives none (the extension's common default).
DEFAULT_MAX_TOKENS: Final = 16
#: The most stop strings a request may give, and their longest length (characters).
MAX_STOP_STRINGS: Final = 16
MAX_STOP_LENGTH: Final = 256
#: The most messages a chat request may give.
MAX_MESSAGES: Final = 256
#: The roles a chat message may have (what every chat template knows).
ROLES: Final = ("system", "user", "assistant")
_MESSAGE_KEYS: Final = frozenset({"role", "content"})
_PARAMETERS: Final = frozenset(
    {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}
)
_FIELDS: Final = frozenset({"text_input", "messages", "parameters", "id"})
#: Sampling requests draw from PyTorch's global generator: one at a time, each seeded.
_SAMPLING: Final = threading.Lock()


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerateRequest:
    #: The raw prompt (``text_input``); None when the request gives :attr:`messages`.
    text: str | None
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: The conversation (``messages``), rendered by the sealed chat template; () for text.
    messages: tuple[ChatMessage, ...] = ()

    @property
    def sampling(self) -> bool:
        return self.temperature is not None and self.temperature > 0


@dataclass(frozen=True)
class GenerateResult:
    text: str
    finish_reason: str
    #: Tokens generated (before cutting at a stop string).
    tokens: int


def can_generate(model: ServedModel) -> bool:
    """Whether ``model`` is a causal LM with a sealed tokenizer."""
    text = model.text
    return text is not None and text.kind == CAUSAL_LM and text.tokenizer is not None


def has_chat_template(model: ServedModel) -> bool:
    """Whether ``model``'s sealed tokenizer carries a chat template (its own, or a named set
    with a ``default``: the one ``apply_chat_template`` uses without tools)."""
    tokenizer = model.text.tokenizer if model.text is not None else None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and bool(template)


def _string(value: object, name: str, *, empty: bool) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise RequestError(f"{name} must be a {'' if empty else 'non-empty '}string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON escape
        raise RequestError(f"{name} is not valid Unicode (a lone surrogate)") from exc
    return value


def _messages(value: object) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise RequestError('messages must be a non-empty list of {"role", "content"} objects')
    if len(value) > MAX_MESSAGES:
        raise RequestError(f"messages holds more than {MAX_MESSAGES} messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f'{where} must be a JSON object {{"role", "content"}}')
        unknown = sorted(set(message) - _MESSAGE_KEYS)
        if unknown:
            raise RequestError(
                f"{where} has an unknown key {show(unknown[0])}; a message has role and content"
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}")
        content = _string(message.get("content"), f"{where}.content", empty=True)
        messages.append(ChatMessage(role=role, content=content))
    return tuple(messages)


def _prompt(document: dict[str, Any]) -> tuple[str | None, tuple[ChatMessage, ...]]:
    """(``text_input``, ``messages``): exactly one of them."""
    if ("text_input" in document) == ("messages" in document):
        raise RequestError(
            "give exactly one of text_input (a prompt) and messages (a chat conversation)"
        )
    if "messages" in document:
        return None, _messages(document["messages"])
    return _string(document["text_input"], "text_input", empty=False), ()


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"parameters.{name} must be a finite number")
    return float(value)


def _integer(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"parameters.{name} must be an integer from {low} to {high}")
    return value


def _stop_strings(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise RequestError("parameters.stop must be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise RequestError(f"parameters.stop holds more than {MAX_STOP_STRINGS} strings")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in items):
        raise RequestError(
            f"parameters.stop strings must hold 1 to {MAX_STOP_LENGTH} characters each"
        )
    return tuple(dict.fromkeys(items))


def parse_generate_request(body: bytes | bytearray, *, max_tokens: int) -> GenerateRequest:
    """Check a generate request's JSON (400 with the reason otherwise). ``max_tokens``: the
    server's most tokens per request."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        raise RequestError(
            f"unknown field {show(unknown[0])}; a generate request has text_input or messages, "
            "and parameters"
        )
    text, messages = _prompt(document)
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise RequestError("parameters must be a JSON object")
    unknown = sorted(set(parameters) - _PARAMETERS)
    if unknown:
        raise RequestError(
            f"unknown parameter {show(unknown[0])}; known: {', '.join(sorted(_PARAMETERS))}"
        )
    if "stream" in parameters and not isinstance(parameters["stream"], bool):
        raise RequestError("parameters.stream must be true or false")
    limit = _integer(
        parameters.get("max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens)),
        "max_tokens",
        1,
        max_tokens,
    )
    temperature = None
    if parameters.get("temperature") is not None:
        temperature = _number(parameters["temperature"], "temperature")
        if not 0 <= temperature <= 100:
            raise RequestError("parameters.temperature must be from 0 (greedy) to 100")
    top_p = top_k = None
    if parameters.get("top_p") is not None:
        top_p = _number(parameters["top_p"], "top_p")
        if not 0 < top_p <= 1:
            raise RequestError("parameters.top_p must be above 0 and at most 1")
    if parameters.get("top_k") is not None:
        top_k = _integer(parameters["top_k"], "top_k", 1, 1 << 20)
    sampling = temperature is not None and temperature > 0
    if (top_p is not None or top_k is not None) and not sampling:
        raise RequestError(
            "parameters.top_p and top_k apply to sampling: give a temperature above 0"
        )
    seed = None
    if parameters.get("seed") is not None:
        seed = _integer(parameters["seed"], "seed", 0, (1 << 63) - 1)
        if not sampling:
            raise RequestError("parameters.seed applies to sampling: give a temperature above 0")
    stop = _stop_strings(parameters["stop"]) if parameters.get("stop") is not None else ()
    return GenerateRequest(
        text=text,
        max_tokens=limit,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        messages=messages,
    )


class StopFilter:
    """Streamed text up to the first stop string: holds back a tail that may start one."""

    def __init__(self, stop: Sequence[str], emit: Callable[[str], None]) -> None:
        self._stop = tuple(stop)
        self._emit = emit
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> None:
        if self.stopped or not text:
            return
        pending = self._pending + text
        found = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if found:
            self.stopped = True
            self._pending = ""
            if min(found):
                self._emit(pending[: min(found)])
            return
        keep = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(pending)), keep, -1):
                if stop.startswith(pending[-size:]):
                    keep = size
                    break
        ready, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if ready:
            self._emit(ready)

    def close(self) -> None:
        if not self.stopped and self._pending:
            self._emit(self._pending)
        self._pending = ""


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` before the first stop string, and whether one was found."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def _criteria(cancelled: threading.Event) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return torch.full(
                (input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([Cancelled()])


def _streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            del stream_end
            on_text(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generation_kwargs(model: ServedModel, request: GenerateRequest) -> dict[str, Any]:
    """The arguments given to ``model.generate`` besides the prompt's tensors (what a plain
    transformers caller passes for the same request)."""
    assert model.text is not None  # noqa: S101 - can_generate() was checked
    generation_config = model.text.model.generation_config
    pad = generation_config.pad_token_id
    if pad is None:
        eos = generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) and eos else eos
    kwargs: dict[str, Any] = {
        "max_new_tokens": request.max_tokens,
        "do_sample": request.sampling,
    }
    if pad is not None:
        kwargs["pad_token_id"] = pad
    if request.sampling:
        kwargs["temperature"] = request.temperature
        if request.top_p is not None:
            kwargs["top_p"] = request.top_p
        if request.top_k is not None:
            kwargs["top_k"] = request.top_k
    if request.stop:
        kwargs["stop_strings"] = list(request.stop)
        kwargs["tokenizer"] = model.text.tokenizer
    return kwargs


def render_chat(model: ServedModel, messages: Sequence[ChatMessage]) -> str:
    """The conversation as the sealed tokenizer's chat template writes it, ending with the
    assistant's turn (``add_generation_prompt=True``): 400 when the model has no template or
    its template refuses the conversation."""
    if not has_chat_template(model):
        raise RequestError(
            f"model {model.name!r} has no chat template in its sealed tokenizer: send the "
            "prompt as text_input, or seal the model with a tokenizer that has a chat_template"
        )
    tokenizer = model.text.tokenizer if model.text is not None else None
    assert tokenizer is not None  # noqa: S101 - has_chat_template checked it
    from jinja2 import TemplateError

    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        rendered = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as exc:
        # the template's own raise_exception("...") is a message for the user; other
        # template errors (syntax, sandbox) say nothing of the template
        reason = " ".join(str(exc).split()) if type(exc) is TemplateError else type(exc).__name__
        raise RequestError(
            f"the chat template of model {model.name!r} refuses these messages: {show(reason, 160)}"
        ) from exc
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise RequestError(
            f"the chat template of model {model.name!r} cannot render these messages "
            f"({type(exc).__name__})"
        ) from exc
    if not isinstance(rendered, str):  # pragma: no cover - tokenize=False gives text
        raise RequestError(f"the chat template of model {model.name!r} gave no text")
    return rendered


def encode_prompt(model: ServedModel, request: GenerateRequest) -> dict[str, torch.Tensor]:
    """The prompt's tensors, checked against the model's positions (400 otherwise): the
    ``text_input`` as ``tokenizer(text)`` gives it, or the rendered ``messages`` as
    ``apply_chat_template(..., tokenize=True)`` gives them (no special tokens added)."""
    text = model.text
    if text is None or text.kind != CAUSAL_LM or text.tokenizer is None:
        raise RequestError(f"model {model.name!r} does not generate text")
    if request.text is not None:
        prompt = text.tokenize_prompt(request.text)
    else:
        rendered = render_chat(model, request.messages)
        prompt = text.tokenize_prompt(rendered, special_tokens=False)
    length = prompt["input_ids"].shape[-1]
    positions = text.max_positions
    if positions is not None and length + request.max_tokens > positions:
        raise RequestError(
            f"the prompt's {length} tokens plus max_tokens {request.max_tokens} exceed the "
            f"{positions} positions of model {model.name!r}"
        )
    return prompt


def generate(
    model: ServedModel,
    request: GenerateRequest,
    *,
    prompt: dict[str, torch.Tensor] | None = None,
    on_text: Callable[[str], None] | None = None,
    cancelled: threading.Event | None = None,
) -> GenerateResult:
    """Run one generation (a worker thread). ``prompt``: :func:`encode_prompt`'s tensors
    (encoded here if None). ``on_text`` receives the text piece by piece (cut before the first
    stop string); the result holds all of it."""
    if prompt is None:
        prompt = encode_prompt(model, request)
    text = model.text
    assert text is not None  # noqa: S101 - encode_prompt checked it
    assert text.tokenizer is not None  # noqa: S101 - encode_prompt checked it
    length = prompt["input_ids"].shape[-1]
    on_device = {name: tensor.to(text.model.device) for name, tensor in prompt.items()}
    kwargs = generation_kwargs(model, request)
    kwargs["stopping_criteria"] = _criteria(cancelled or threading.Event())
    stop_filter = None
    if on_text is not None:
        stop_filter = StopFilter(request.stop, on_text)
        kwargs["streamer"] = _streamer(text.tokenizer, stop_filter.feed)
    try:
        with torch.inference_mode():
            if request.sampling:
                with _SAMPLING:
                    torch.manual_seed(
                        request.seed if request.seed is not None else secrets.randbits(63)
                    )
                    output = text.model.generate(**on_device, **kwargs)
            else:
                output = text.model.generate(**on_device, **kwargs)
    except (ValueError, TypeError, IndexError) as exc:
        raise RequestError(
            f"model {model.name!r} cannot generate for this request ({type(exc).__name__})"
        ) from exc
    if stop_filter is not None:
        stop_filter.close()
    new_tokens = output[0, length:].cpu()
    decoded = text.tokenizer.decode(new_tokens, skip_special_tokens=True)
    result, stopped = cut_at_stop(decoded, request.stop)
    eos = text.model.generation_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    ended = len(new_tokens) < request.max_tokens or (
        len(new_tokens) > 0 and int(new_tokens[-1]) in eos_ids
    )
    finish = "stop" if stopped or ended else "length"
    return GenerateResult(text=result, finish_reason=finish, tokens=len(new_tokens))
