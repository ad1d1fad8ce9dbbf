"""summarize_search.py — summarise a folder of documents, then answer questions by retrieval.

Shows the file syscalls as an agent's library: documents are written into the program's
home (``/home/docs``) with ``fs.write``, which makes the kernel split and embed them; the
model summarises each one (summaries go to ``/home/summaries.md``); each question is
answered from the passages ``fs.search`` finds closest in meaning to it.

    llmos run examples/summarize_search.py                      # built-in sample documents
    llmos run examples/summarize_search.py notes/*.txt -q "What is due on Friday?"

Documents come from the files named on the command line, else from ``/mnt/docs`` when the
process was given that mount at spawn (``mounts=[{"name": "docs", "path": ...}]``), else
from what is already in ``/home/docs``, else from built-in samples.
"""

import argparse
import sys
from pathlib import Path

import llmos
from llmos.client import Files
from syscalls.errors import SyscallError

SAMPLES = {
    "solar.txt": "Solar panels convert sunlight into electricity. A typical home system of 6 kW "
    "produces about 8,000 kWh a year and pays for itself in 8 to 12 years.",
    "bees.txt": "Honey bees pollinate about a third of the crops we eat. A colony has one queen, "
    "thousands of female workers and a few hundred male drones in summer.",
    "rust.txt": "Rust is a systems programming language focused on memory safety without a "
    "garbage collector. Its borrow checker rejects data races at compile time.",
}
QUESTIONS = ["How long until solar panels pay for themselves?", "Who pollinates our crops?"]


def gather(files: Files, paths: list[str]) -> None:
    """Put the documents in /home/docs (written through the kernel, so they are indexed)."""
    if paths:
        docs = {Path(p).name: Path(p).read_text() for p in paths}
    else:
        try:
            docs = {
                e.name: str(files.read(f"/mnt/docs/{e.name}"))
                for e in files.list("/mnt/docs")
                if e.type == "file"
            }
        except SyscallError:  # no such mount
            docs = {}
        if not docs and any(e.type == "file" for e in files.list("/home/docs")):
            return
    for name, text in (docs or SAMPLES).items():
        files.write(f"/home/docs/{name}", text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "docs", nargs="*", help="host files to load (default: /mnt/docs, /home/docs or samples)"
    )
    ap.add_argument("-q", "--question", action="append", help="a question (default: built-in ones)")
    args = ap.parse_args()

    me = llmos.this_process()
    files = me.files
    files.mkdir("/home/docs")
    gather(files, args.docs)

    summaries = []
    for entry in files.list("/home/docs"):
        text = files.read(f"/home/docs/{entry.name}", length=2000)
        if not isinstance(text, str):  # not UTF-8 text: nothing to summarise
            continue
        me.clear()  # one document at a time
        summary = me.chat(
            f"Summarise this document in one sentence:\n\n{text}", max_tokens=40, temperature=0.0
        )
        summaries.append(f"- **{entry.name}**: {summary.strip()}")
        print(f"[docs] {entry.name} ({entry.size} bytes): {summary.strip()}")
    files.write("/home/summaries.md", "# Summaries\n\n" + "\n".join(summaries) + "\n")
    print(f"[docs] wrote /home/summaries.md ({len(summaries)} documents)")

    for question in args.question or QUESTIONS:
        hits = files.search(question, k=2)
        print(f"[docs] question: {question}")
        print("[docs] sources:", ", ".join(f"{h.path} ({h.score:.2f})" for h in hits))
        context = "\n".join(h.text for h in hits)
        me.clear()
        answer = me.chat(
            f"Using these notes:\n{context}\n\nAnswer briefly: {question}",
            max_tokens=40,
            temperature=0.0,
        )
        print(f"[docs] answer: {answer.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
