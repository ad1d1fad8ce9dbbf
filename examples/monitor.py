"""monitor.py — a system monitor that asks the model whether the kernel looks abnormal.

Shows ``sys.stat`` (the system state vector: slots, run queue, process states, token
rates, host CPU and memory) feeding a model whose answer is constrained by
``response_format`` to the JSON schema of ``Verdict``, so it always parses, and the
program's file home: every check is logged to ``/home/alerts.log`` (abnormal ones as
ALERT).

    llmos run examples/monitor.py [--samples 3] [--interval 1.0]

With ``llmos run --namespace NAME`` the log outlives the run: a later program with the
same namespace reads it at ``/home/alerts.log``.
"""

import argparse
import sys
import time

from pydantic import BaseModel, ValidationError

import llmos
from syscalls.models import StatResult

LOG = "/home/alerts.log"


class Verdict(BaseModel):
    abnormal: bool
    reason: str


def summary(s: StatResult) -> str:
    """One line of the state, in words the model can read."""
    m = s.models[0]
    states = ", ".join(f"{n} {state}" for state, n in s.states.items() if n)
    mem_free = 100 * s.host.mem_available / max(s.host.mem_total, 1)
    return (
        f"{m.busy}/{m.slots} slots busy, {m.queued} queued; processes: {states or 'none'}; "
        f"{s.tokens.output_tps:.1f} tokens/s; CPU {s.host.cpu_percent:.0f}% of {s.host.cpus} "
        f"cores; load {s.host.load_avg[0]:.2f}; memory free {mem_free:.0f}%"
    )


def check(me: llmos.Process, state: str) -> Verdict:
    """Ask the model for a verdict on ``state`` (a fresh context each time)."""
    me.clear()
    prompt = (
        f"You monitor a server. Current state: {state}.\n"
        "Is this abnormal (overloaded, stuck or out of memory)? Answer in JSON."
    )
    result = me.generate(
        [{"role": "user", "content": prompt}],
        response_format=Verdict,
        max_tokens=64,
        temperature=0.0,
    )
    try:
        return Verdict.model_validate_json(result.text)
    except ValidationError:  # cut by max_tokens: the JSON is incomplete
        return Verdict(abnormal=False, reason=f"no verdict (output {result.finish_reason})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    args = ap.parse_args()

    me = llmos.this_process()
    alerts = 0
    for i in range(args.samples):
        if i:
            time.sleep(args.interval)
        state = summary(me.client.stat())
        verdict = check(me, state)
        level = "ALERT" if verdict.abnormal else "ok"
        alerts += verdict.abnormal
        line = f"{time.strftime('%H:%M:%S')} {level} {state} | {verdict.reason}"
        me.files.append(LOG, line + "\n")
        print(f"[monitor] sample {i + 1}: {state}")
        print(f"[monitor]   verdict: abnormal={verdict.abnormal} reason={verdict.reason!r}")

    written = me.files.stat(LOG)
    print(
        f"[monitor] {args.samples} checks, {alerts} alerts, logged to {LOG} "
        f"({written.size} bytes, version {written.versions})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
