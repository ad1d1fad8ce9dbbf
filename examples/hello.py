"""hello.py — the smallest llmos agent program.

Run it with ``llmos run examples/hello.py``: the kernel gives this program its own LLM
process (pid and token in the environment). It asks the model a question, streams the
answer, asks a follow-up that needs the first turn (the kernel keeps the context), and
exits 0.
"""

import sys

import llmos


def main() -> int:
    me = llmos.this_process()
    info = me.client.info()
    print(f"[hello] I am LLM process {me.pid} on {info.models[0].name} (kernel {info.version})")

    print("[hello] user: What is the capital of France?")
    print("[hello] model: ", end="", flush=True)
    for piece in me.stream(
        "What is the capital of France? Answer in one sentence.", max_tokens=48, temperature=0.0
    ):
        print(piece, end="", flush=True)
    print()

    answer = me.chat("Repeat your previous answer in French.", max_tokens=48, temperature=0.0)
    print("[hello] user: Repeat your previous answer in French.")
    print(f"[hello] model: {answer}")

    turns = [m["role"] for m in me.context()]
    usage = me.client.ps(me.pid)[0]
    print(
        f"[hello] context: {' -> '.join(turns)}; tokens in {usage.prompt_tokens}, "
        f"out {usage.output_tokens}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
