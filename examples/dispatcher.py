"""dispatcher.py — a warehouse dispatcher: jobs as child processes with priorities.

Shows the kernel's scheduler at work. Each job is a child LLM process that writes a
short work order, spawned with a nice value: urgent 0 (the dispatcher's own; a child is
never above its parent), routine 10. The routine jobs are submitted first and take the
free slots; the urgent ones arrive last. The program
records when each job got its first token and when it finished, reads the kernel's own
accounting (wait, service, preemptions) from ``sys.stat`` rows, and prints a table.

    llmos run examples/dispatcher.py

Under the ``priority`` policy (``llmos kernel start --policy priority``) the urgent jobs
jump the queue and preempt routine ones. Under the default ``fair`` policy nice values
do not reorder processes of one program (it shares slots by service received), and
the table shows that too.
"""

import sys
import threading
import time

import llmos

JOBS = [  # (job, nice), in the order they are submitted
    ("restock aisle 4 with paper towels", 10),
    ("count pallets in bay B", 10),
    ("move empty crates to the dock", 10),
    ("label returns from yesterday", 10),
    ("URGENT: forklift blocking the fire exit", 0),
    ("URGENT: spilled chemicals in aisle 7", 0),
]


def run_job(child: llmos.Process, job: str, times: dict[str, float], t0: float) -> None:
    """Stream the job's work order, noting the first token and the finish (seconds from t0)."""
    for _ in child.stream(
        f"Write a one-line work order for: {job}", max_tokens=24, temperature=0.0
    ):
        times.setdefault("first", time.monotonic() - t0)
    times["done"] = time.monotonic() - t0
    times.setdefault("first", times["done"])  # an empty answer: its only "token" is the end


def main() -> int:
    me = llmos.this_process()
    stat = me.stat(procs=False)
    print(f"[dispatch] policy {stat.policy}; {stat.models[0].slots} slots on {stat.models[0].name}")

    t0 = time.monotonic()
    jobs, threads = [], []
    for name, nice in JOBS:
        child = me.spawn(f"job{len(jobs) + 1}", nice=nice)
        times: dict[str, float] = {"submitted": time.monotonic() - t0}
        jobs.append((child, name, nice, times))
        threads.append(threading.Thread(target=run_job, args=(child, name, times, t0)))
        threads[-1].start()
        while me.client.ps(child.pid)[0].state in (
            "NEW",
            "WAITING",
        ):  # queued before the next comes
            time.sleep(0.01)
    waiting = {
        p.pid for p in me.stat().procs if p.state == "READY"
    }  # queued when the last job came
    for t in threads:
        t.join()

    rows = {p.pid: p for p in me.stat().procs}  # the kernel's accounting of each job
    print(
        f"{'pid':>4} {'nice':>4} {'sub':>5} {'first':>6} {'done':>6} {'wait_s':>6} "
        f"{'preempt':>7}  job"
    )
    for child, name, nice, times in sorted(jobs, key=lambda j: j[3]["first"]):
        r = rows[child.pid]
        print(
            f"{child.pid:>4} {nice:>4} {times['submitted']:>5.2f} {times['first']:>6.2f} "
            f"{times['done']:>6.2f} {r.wait_s:>6.2f} {r.preemptions:>7}  {name}"
        )
    finish = [name for _, name, _, times in sorted(jobs, key=lambda j: j[3]["done"])]
    print(f"[dispatch] finish order: {' | '.join(finish)}")
    urgent = [times for _, _, nice, times in jobs if nice == 0]
    queued = [t for child, _, nice, t in jobs if nice > 0 and child.pid in waiting]
    verdict = (
        "n/a"
        if not queued
        else "yes"
        if max(t["first"] for t in urgent) < min(t["first"] for t in queued)
        else "no"
    )
    print(
        f"[dispatch] urgent jobs got a slot before the {len(queued)} routine jobs queued "
        f"ahead of them: {verdict} (policy {stat.policy})"
    )
    for child, *_ in jobs:  # jobs are done: end and reap them
        child.exit()
        me.wait(child.pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
