r"""customer_service.py — a support bot over an updatable knowledge base in archival memory.

Shows the memory tiers working for an agent: the shop's policies are archival entries
with metadata (seeded on the first run, updated with ``--add TOPIC=TEXT``), each answer is
grounded in the entries ``mem.search`` retrieves for the question, and the customer's name
goes into a core memory block, which the kernel puts in every later prompt.

    llmos run examples/customer_service.py                        # the built-in questions
    llmos run examples/customer_service.py "Can I pay by card?"   # your own
    llmos run --namespace shop examples/customer_service.py \
        --kb shop --add "shipping=Free in 2 days."

The knowledge base lives in the program's namespace (``prog:N``); with ``--namespace NAME``
on ``llmos run`` and the same ``--kb NAME`` here it outlives the run.
"""

import argparse
import re
import sys

import llmos
from llmos.client import Memory

SEED = {
    "returns": "Items can be returned within 30 days of delivery for a full refund, if unworn.",
    "shipping": "Standard shipping takes 3 to 5 business days; express takes 1 day and costs $9.",
    "payment": "We accept credit cards and PayPal. We do not accept cash or cheques.",
    "warranty": "Electronics carry a 1-year warranty covering manufacturing defects.",
}
QUESTIONS = [
    "Hi, I'm Ada. Can I return a sweater I bought last week?",
    "How long does shipping take?",
    "Do you remember my name?",
]
NAME = re.compile(r"\b(?:I'm|I am|my name is)\s+([A-Z][a-z]+)")


def update_policy(kb: Memory, topic: str, text: str) -> int:
    """Replace the entries on ``topic`` with ``text``; returns the new entry's id."""
    old = [e.id for e in kb.search(topic, k=20, filter={"kind": "policy", "topic": topic})]
    if old:
        kb.delete(*old)
    return kb.put((text, {"kind": "policy", "topic": topic}))[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("questions", nargs="*", help="customer questions (default: a built-in list)")
    ap.add_argument("--kb", help="memory namespace of the knowledge base (default: the program's)")
    ap.add_argument(
        "--add", action="append", default=[], metavar="TOPIC=TEXT", help="add or replace a policy"
    )
    args = ap.parse_args()

    me = llmos.this_process()
    kb = me.memory_of(args.kb or f"prog:{me.client.ps(me.pid)[0].program}")
    if not kb.search("policy", k=1, filter={"kind": "policy"}):
        for topic, text in SEED.items():
            update_policy(kb, topic, text)
        print(f"[support] seeded {len(SEED)} policies into {kb.namespace}")
    for item in args.add:
        topic, _, text = item.partition("=")
        print(
            f"[support] policy {topic!r} is now entry "
            f"{update_policy(kb, topic.strip(), text.strip())}"
        )

    for question in args.questions or QUESTIONS:
        me.clear()  # each question starts afresh: only the core memory block carries the name over
        if match := NAME.search(question):
            kb.set_block("customer", f"The customer's name is {match.group(1)}.")
            print(f"[support] remembered the customer's name in core memory: {match.group(1)}")
        hits = kb.search(question, k=2, filter={"kind": "policy"})
        print(f"[support] customer: {question}")
        print(
            "[support] retrieved:",
            ", ".join(f"{h.metadata['topic']} ({h.score:.2f})" for h in hits),
        )
        policies = "\n".join(f"- {h.text}" for h in hits)
        answer = me.chat(
            f"Shop policies:\n{policies}\n\nCustomer: {question}\nAnswer briefly and politely.",
            max_tokens=48,
            temperature=0.0,
        )
        print(f"[support] bot: {answer.strip()}")

    print(f"[support] core memory: {kb.blocks()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
