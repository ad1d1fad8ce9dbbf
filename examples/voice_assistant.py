"""voice_assistant.py — a multi-turn dialogue manager that speaks its answers.

Shows a program serving a tool through the kernel: a child process ``tts`` registers the
``speak`` tool (text-to-speech with ``espeak-ng`` or ``espeak``, when installed) and
answers its calls from a thread; the dialogue process keeps the conversation in its
context and calls ``speak`` with ``tool.call`` after every answer, like any other tool.
Without a speech engine the tool says so and the program prints that speech is skipped
(install one with ``apt install espeak-ng``).

    llmos run examples/voice_assistant.py                 # built-in turns
    llmos run examples/voice_assistant.py "Hi!" "What can you do?"
    llmos run examples/voice_assistant.py -i              # type turns; an empty line ends
"""

import shutil
import subprocess
import sys
import threading

import llmos

TURNS = ["Hello! My name is Sam.", "What is a good name for a cat?", "What is my name?"]
ENGINE = shutil.which("espeak-ng") or shutil.which("espeak")
SPEAK_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 2000}},
    "required": ["text"],
}


def speak(text: str) -> dict[str, object]:
    """The tool: say ``text`` aloud, or explain why it cannot."""
    if ENGINE is None:
        return {"spoken": False, "reason": "no text-to-speech engine (apt install espeak-ng)"}
    done = subprocess.run([ENGINE, "--", text], capture_output=True, text=True, timeout=60)
    return {"spoken": done.returncode == 0, "engine": ENGINE, "reason": done.stderr.strip()[:200]}


def turns() -> list[str]:
    if sys.argv[1:] == ["-i"]:
        return list(iter(lambda: input("you> ").strip(), ""))
    return sys.argv[1:] or TURNS


def main() -> int:
    me = llmos.this_process()
    tts = me.spawn("tts")
    tts.tools.register("speak", "Say a text aloud through the speakers.", SPEAK_SCHEMA)
    stop = threading.Event()
    server = threading.Thread(target=tts.tools.serve, args=({"speak": speak}, stop.is_set, 0.2))
    server.start()
    print(
        "[voice] speech engine: "
        + (ENGINE or "none: speech is skipped (install it with `apt install espeak-ng`)")
    )

    try:
        for text in turns():
            print(f"[voice] you: {text}")
            answer = me.chat(
                text, max_tokens=40, temperature=0.0
            ).strip()  # the context keeps the turns
            print(f"[voice] assistant: {answer}")
            said = me.tools.call("speak", {"text": answer})
            if said["spoken"]:
                print(f"[voice] (spoken with {said['engine']})")
            else:
                print(f"[voice] (speech skipped: {said['reason']})")
    finally:
        stop.set()
        server.join()
        tts.exit(0)
        me.wait(tts.pid)
    print(f"[voice] {len(me.context()) // 2} turns; the tts server answered through tool.call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
