"""office_assistant.py — a planner that farms sub-tasks out to worker processes in parallel.

Shows process-level parallelism: the planner splits a task into sub-tasks (asking the model
for a JSON list with ``response_format``, or using a built-in plan if that fails), spawns
one child LLM process per sub-task, and drives each from its own thread. Workers write
their results into the program's shared ``/home/results`` and exit with a status; the
planner reaps each with ``proc.wait``, reads the results and writes ``/home/report.md``.

    llmos run examples/office_assistant.py ["Prepare the quarterly team meeting"]
"""

import sys
import threading
from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

import llmos

DEFAULT_PLAN = ["Draft an agenda", "Write the invitation email", "List snacks to order"]


class Plan(BaseModel):
    subtasks: list[Annotated[str, Field(min_length=10, max_length=60)]] = Field(
        min_length=2, max_length=3
    )


def plan(me: llmos.Process, task: str) -> list[str]:
    """Sub-tasks for ``task``, from the model when its JSON parses, else the built-in plan."""
    result = me.generate(
        [{"role": "user", "content": f"Split this task into 3 short sub-tasks: {task}"}],
        response_format=Plan,
        max_tokens=80,
        temperature=0.0,
    )
    try:
        proposed = [s.strip() for s in Plan.model_validate_json(result.text).subtasks]
    except ValidationError:
        proposed = []
    subtasks = list(
        dict.fromkeys(s for s in proposed if s and s.lower() != task.lower())
    )  # distinct, new
    return subtasks if len(subtasks) >= 2 else DEFAULT_PLAN


def work(worker: llmos.Process, n: int, subtask: str, task: str) -> None:
    """A worker's job: one generation, its result in /home/results, then exit."""
    try:
        text = worker.chat(
            f"Overall task: {task}\nDo this part, in at most three lines: {subtask}",
            max_tokens=48,
            temperature=0.0,
        )
        worker.files.write(f"/home/results/{n}.md", f"## {subtask}\n\n{text.strip()}\n")
        worker.exit(0)
    except llmos.SyscallError as exc:
        print(f"[office] worker {worker.pid} failed: {exc}", file=sys.stderr)
        worker.exit(1)


def main() -> int:
    task = " ".join(sys.argv[1:]) or "Prepare the quarterly team meeting"
    me = llmos.this_process()
    subtasks = plan(me, task)
    print(f"[office] task: {task}")
    print(f"[office] plan: {subtasks}")

    workers = {}
    for n, subtask in enumerate(subtasks, 1):
        worker = me.spawn(f"worker{n}", system="You are a concise office assistant.")
        workers[worker.pid] = (n, subtask)
        threading.Thread(target=work, args=(worker, n, subtask, task), daemon=True).start()

    # TODO(ipc): when ipc.send/recv lands, workers send their results to the planner
    # instead of writing /home/results; proc.wait stays for their exit statuses.
    sections, failed = [], 0
    for _ in workers:
        done = me.wait(timeout=120)  # any worker: they finish in whatever order they run
        n, subtask = workers[done.pid]
        print(f"[office] worker {done.pid} ({subtask!r}) exited with status {done.exit_status}")
        if done.exit_status == 0:
            sections.append((n, str(me.files.read(f"/home/results/{n}.md"))))
        else:
            failed += 1

    report = f"# Report: {task}\n\n" + "\n".join(text for _, text in sorted(sections))
    me.files.write("/home/report.md", report)
    print(f"[office] wrote /home/report.md ({len(sections)} sections, {failed} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
