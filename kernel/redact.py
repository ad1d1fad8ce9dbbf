"""PII redaction: what a redacting process's stores keep.

A process spawned with ``redact=[...]`` (inherited; a child may add kinds, never drop
one) has e-mail addresses, phone numbers, payment cards, IBANs and IP addresses masked
(``<EMAIL>``, ``<PHONE>``, ``<CARD>``, ``<IBAN>``, ``<IP>``) in everything the kernel
stores for it: every message entering its context (``ctx.append``, a chat turn's new
messages and the model's reply, its system prompt, the copy a fork starts with), so its
recall memory too (recall logs those very turns), the archival entries and core-memory
text it writes, and its audit rows (the target and the argument digest are computed
over masked arguments, so a digest cannot be brute-forced back to a phone number). With
``redact_model`` the masked text is also what the model is given; without it the model
sees the caller's words for the current call, and only the stored copy is masked.

Recognition uses Microsoft Presidio's pattern recognisers (``presidio-analyzer``)
without its NLP engine: regular expressions confirmed by validators (Luhn for cards,
the ISO 13616 checksum for IBANs, Google's ``phonenumbers`` for phones, ``ipaddress``
for IPv4/IPv6), all offline. The e-mail recogniser's domain check uses tldextract's
bundled public-suffix snapshot (Presidio's default would try to download the list).
Person names are not recognised: Presidio finds them with a spaCy NER model, and no
such model is packaged for an offline machine.

Masking runs on one worker thread of its own, never on the kernel's loop; the
recognisers are loaded there on first use (importing Presidio takes seconds), or at
start when a recovered process redacts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernel.process import Proc

#: The kinds a process may ask for: name -> (Presidio entity, mask).
KINDS: dict[str, tuple[str, str]] = {
    "email": ("EMAIL_ADDRESS", "<EMAIL>"),
    "phone": ("PHONE_NUMBER", "<PHONE>"),
    "card": ("CREDIT_CARD", "<CARD>"),
    "iban": ("IBAN_CODE", "<IBAN>"),
    "ip": ("IP_ADDRESS", "<IP>"),
}


def _recognizers() -> dict[str, Any]:
    """One Presidio pattern recogniser per kind (imports Presidio: seconds, once)."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's e-mail recogniser with the bundled public-suffix list (no fetch)."""

        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text).fqdn != ""

    return {
        "email": OfflineEmailRecognizer(),
        "phone": PhoneRecognizer(),
        "card": CreditCardRecognizer(),
        "iban": IbanRecognizer(),
        "ip": IpRecognizer(),
    }


def merge_spans(spans: Iterable[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Non-overlapping spans, left to right: of overlapping ones the longest wins."""
    out: list[tuple[int, int, str]] = []
    for start, end, mask in sorted(spans, key=lambda s: (s[0], -(s[1] - s[0]))):
        if out and start < out[-1][1]:
            if end - start > out[-1][1] - out[-1][0]:
                out[-1] = (out[-1][0], max(end, out[-1][1]), mask)
            elif end > out[-1][1]:
                out[-1] = (out[-1][0], end, out[-1][2])
            continue
        out.append((start, end, mask))
    return out


class Redactor:
    """Masks PII kinds in text, on a worker thread of its own."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="redact")
        self._lock = threading.Lock()
        self._found: dict[str, Any] | None = None
        self.masked = 0  # spans masked so far

    def _load(self) -> dict[str, Any]:
        with self._lock:
            if self._found is None:
                self._found = _recognizers()
            return self._found

    def preload(self) -> None:
        """Start loading the recognisers in the background (at start, for recovered
        processes that redact)."""
        self._pool.submit(self._load)

    def mask_text(self, text: str, kinds: Sequence[str]) -> str:
        """``text`` with every span of ``kinds`` masked (blocking: call off the loop)."""
        if not kinds or not text:
            return text
        found = self._load()
        spans = [
            (r.start, r.end, KINDS[kind][1])
            for kind in kinds
            for r in found[kind].analyze(text, [KINDS[kind][0]], None)
            if r.score > 0
        ]
        if not spans:
            return text
        parts, at = [], 0
        for start, end, mask in merge_spans(spans):
            parts += [text[at:start], mask]
            at = end
        self.masked += len(parts) // 2
        return "".join(parts) + text[at:]

    def mask_value(self, value: Any, kinds: Sequence[str]) -> Any:
        """Every string in a JSON-like value masked (blocking: call off the loop)."""
        if isinstance(value, str):
            return self.mask_text(value, kinds)
        if isinstance(value, list | tuple):
            return [self.mask_value(v, kinds) for v in value]
        if isinstance(value, dict):
            return {key: self.mask_value(v, kinds) for key, v in value.items()}
        return value

    async def mask(self, texts: list[str], kinds: Sequence[str]) -> list[str]:
        """``texts`` masked, on the redaction thread; unchanged (no hop) without kinds."""
        if not kinds or not texts:
            return texts
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, lambda: [self.mask_text(t, kinds) for t in texts]
        )

    async def mask_for(self, proc: Proc | None, texts: list[str]) -> list[str]:
        """``texts`` as ``proc`` may store them (the admin's, or a process's that does
        not redact, unchanged)."""
        return await self.mask(texts, proc.redact) if proc is not None else texts

    async def mask_messages(
        self, messages: list[dict[str, str]], kinds: Sequence[str]
    ) -> list[dict[str, str]]:
        """Chat messages with their contents masked (roles and other keys kept)."""
        if not kinds or not messages:
            return messages
        texts = await self.mask([msg["content"] for msg in messages], kinds)
        return [{**msg, "content": text} for msg, text in zip(messages, texts, strict=True)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
