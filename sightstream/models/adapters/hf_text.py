"""Text generation from transformers (`task = "generate"`): a causal language model
(`AutoModelForCausalLM`) that writes text from text. It serves job summaries (the per-frame
captions in, a summary out) and `/predict` with a text body; it never sees a frame.

Each input is one user message. The pipeline's (or the call's) prompt, when set, is the
instruction put before it. The message goes through the tokenizer's chat template when it has
one (instruct models), else it is the plain text. Batches are padded on the left and generated
greedily by default; only the new tokens are decoded. Result: `{"text": "..."}`.

Options: `max_new_tokens` (256), `do_sample` (false), `temperature` (used only with
do_sample), `context_tokens` (the model's context length; read from its config by default),
`window_tokens` (4096: the most a summary puts in one call, answer included; a call over a
model's whole 32k context takes many minutes on a CPU), `dtype`, and `timeout_s` (one call's
limit; by default the larger of 600 s and the daemon's `inference_timeout_s`, as the model
manager gives every text model).

`budget(instruction)` tells a caller (the summariser) how much text fits in one call without
loading the model: the context length, the tokens left for the answer, and a token counter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sightstream.errors import ModelError
from sightstream.frames import Prediction
from sightstream.models.adapter import Prompt
from sightstream.models.adapters import hf_common

DEFAULT_CONTEXT = 2048  # when neither the config nor the tokenizer says
# transformers' placeholder for "no limit" in tokenizer_config.json (int(1e30))
NO_LIMIT = 10**9
WINDOW_TOKENS = 4096


@dataclass(frozen=True)
class TextBudget:
    """How much fits in one call: `context_tokens` in all (the model's context, or less: the
    `window_tokens` option), `max_new_tokens` of them kept for the answer, `overhead` taken by
    the template and the instruction; `count` counts a text's tokens as the model will see them."""

    context_tokens: int
    max_new_tokens: int
    overhead: int
    count: Callable[[str], int]

    @property
    def room(self) -> int:
        """Tokens of input text that fit in one call."""
        return self.context_tokens - self.max_new_tokens - self.overhead


class HfTextGenerator(hf_common.HfAdapter):
    task = "generate"
    takes_prompt = True

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, options)
        self.max_new_tokens = int(options.get("max_new_tokens", 256))
        self.do_sample = bool(options.get("do_sample", False))
        self.temperature = float(options.get("temperature", 1.0))
        self._context = int(options["context_tokens"]) if "context_tokens" in options else None
        self.window_tokens = int(options.get("window_tokens", WINDOW_TOKENS))
        self._tokenizer: Any = None

    @staticmethod
    def check_prompt(text: str, task: str) -> None:
        """Any instruction will do, an empty one too."""

    def load(self, device: str) -> None:
        source = self.source()
        import transformers

        try:
            config = _causal_config(source)
            self._tokenizer = _tokenizer(source)
            model = transformers.AutoModelForCausalLM.from_pretrained(source, config=config)
        except (ValueError, KeyError, OSError) as e:
            # transformers' message lists every supported config class: the first line says it
            raise ModelError(f"{source} cannot be loaded as a causal language model: "
                             f"{str(e).splitlines()[0][:300]}") from None
        self.placed(model, device)
        if self._context is None:
            self._context = _context_length(model.config, self._tokenizer)

    def budget(self, instruction: str = "") -> TextBudget:
        """The token budget of one call with this instruction, from the tokenizer and config
        alone (no weights loaded): the host can plan its inputs before the model is on a device."""
        source = self.source()
        config = _causal_config(source)  # a job asking for a summary is refused now, not at its end
        tokenizer = self._tokenizer or _tokenizer(source)
        context = self._context or _context_length(config, tokenizer)

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        # +2: the blank line between the instruction and the text, and a merge at the seam
        overhead = len(_encode(tokenizer, _render(tokenizer, instruction, ""))) + 2
        return TextBudget(min(context, self.window_tokens), self.max_new_tokens, overhead, count)

    def prepare(self, texts: list[Any], prompt: Prompt | None = None,
                contexts: Any = None) -> hf_common.Inputs:
        if not all(isinstance(t, str) for t in texts):
            raise ModelError("a text generation model takes text, not images")
        instruction = prompt.text.strip() if prompt else ""
        rendered = [_render(self._tokenizer, instruction, t) for t in texts]
        # a chat template writes its own special tokens; plain text gets the model's (BOS)
        tokens = self._tokenizer(rendered, return_tensors="pt", padding=True,
                                 add_special_tokens=not _has_template(self._tokenizer))
        length = int(tokens["input_ids"].shape[1])
        context = self._context or DEFAULT_CONTEXT
        if length + self.max_new_tokens > context:
            raise ModelError(
                f"the input is {length} tokens; with max_new_tokens {self.max_new_tokens} it does not fit "
                f"the model's context of {context} tokens")
        return self.host_inputs(tokens, [])

    def infer(self, inputs: hf_common.Inputs) -> Any:
        options: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                   "pad_token_id": self._tokenizer.pad_token_id}
        if self.do_sample:
            options["temperature"] = self.temperature
        return self.on_device(inputs, lambda tensors: self._model.generate(**tensors, **options))

    def finish(self, inputs: hf_common.Inputs, ids: Any) -> list[Prediction]:
        return [Prediction({"text": t}) for t in hf_common.new_text(self._tokenizer, inputs, ids)]

    def unload(self) -> None:
        super().unload()
        self._tokenizer = None


def _causal_config(source: str) -> Any:
    """The model's config, if it is a causal language model; else ModelError (a captioner, or
    an encoder such as BERT whose checkpoint has no language-model head: AutoModelForCausalLM
    would load it with a random one). Its kind must be one AutoModelForCausalLM serves and, when
    the checkpoint names its architectures, one of them a causal LM class."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(source)
    kind = getattr(config, "model_type", "")
    named = list(getattr(config, "architectures", None) or [])
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (named and not causal.intersection(named)):
        what = f"{kind} ({', '.join(named)})" if named else kind or "model of unknown type"
        raise ModelError(f"{source} is a {what} checkpoint, not a causal language model: a text "
                         "model is one such as Qwen2.5, SmolLM2, Llama, Phi or Gemma")
    return config


def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"  # batched generation continues every row at its end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ModelError(f"the tokenizer of {source} has neither a pad nor an end-of-sequence token")
    return tokenizer


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer: Any, text: str) -> list[int]:
    """A rendered message's tokens as `prepare` makes them."""
    return list(tokenizer(text, add_special_tokens=not _has_template(tokenizer))["input_ids"])


def _render(tokenizer: Any, instruction: str, text: str) -> str:
    """One user message: the instruction, a blank line, the text; through the chat template
    when the tokenizer has one (the assistant's turn opened), else as is."""
    content = f"{instruction}\n\n{text}" if instruction and text else instruction or text
    if _has_template(tokenizer):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True))
    return content


def _context_length(config: Any, tokenizer: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < NO_LIMIT:
        return limit
    return DEFAULT_CONTEXT
