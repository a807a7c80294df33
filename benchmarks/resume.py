"""What an interrupt late in a classify run costs: Ctrl-C at ~80%, then the same command again.

    python benchmarks/resume.py [--images 3200] [--checkpoint_every 10]

Side by side in one run, whole processes (DirectRunner, default workers),
mobilenet_v2 at 224 with random weights over photo-like 640x480 JPEGs:

(a) the run uninterrupted;
(b) the same run, sent SIGINT once its progress line passes 80%;
(c) the rerun of (b)'s command, which keeps (b)'s flushed rows.

Before rows were flushed as parts, (c) classified every image again: it
cost (a). Reported: seconds, images classified again by (c), and the ratio
(b) + (c) over (a): the whole price of the interrupt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import BEAMVISION, make_jpegs, random_model, run_process  # noqa: E402

PROGRESS = re.compile(r"classify: ([\d,]+)/([\d,]+) images")


def _interrupted_run(args: list[str], at: float) -> tuple[float, int, str]:
    """Runs ``args`` and sends SIGINT once its progress passes ``at``; (seconds, done then, last line)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    lines: list[str] = []
    done = 0
    for line in proc.stderr:
        lines.append(line)
        found = PROGRESS.search(line)
        if found:
            done, total = (int(g.replace(",", "")) for g in found.groups())
            if done >= at * total:
                proc.send_signal(signal.SIGINT)
                break
    rest = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    rest.start()
    status = proc.wait()
    rest.join(5)
    if status != 130:
        sys.stderr.write("".join(lines[-20:]))
        raise SystemExit(f"the interrupted run ended with {status}, not 130")
    return time.perf_counter() - started, done, lines[-1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3200)
    parser.add_argument("--checkpoint_every", type=float, default=10.0)
    parser.add_argument("--workdir", default="/tmp/beamvision-bench-resume")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    print(f"preparing {args.images:,} 640x480 JPEGs in {args.workdir} ...", flush=True)
    photos = os.path.join(args.workdir, "photos")
    make_jpegs(photos, args.images, (640, 480))
    model = random_model(args.workdir)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"cpu: {cpu}, {os.cpu_count()} cores", flush=True)

    def classify(output: str) -> list[str]:
        flags = ["--input", photos, "--model", model, "--output", output, "--progress_every", "1"]
        return [*BEAMVISION, "classify", *flags, "--checkpoint_every", str(args.checkpoint_every)]

    print("(a) uninterrupted ...", flush=True)
    out_a = os.path.join(args.workdir, "out-a")
    shutil.rmtree(out_a, ignore_errors=True)
    full = run_process(classify(out_a))
    out_b = os.path.join(args.workdir, "out-b")
    shutil.rmtree(out_b, ignore_errors=True)
    print("(b) interrupted at 80% ...", flush=True)
    seconds_b, done_b, line_b = _interrupted_run(classify(out_b), 0.8)
    print(f"    {line_b}", flush=True)
    print("(c) the same command again ...", flush=True)
    rerun = run_process(classify(out_b))
    with open(os.path.join(out_b, "summary.json")) as f:
        summary = json.load(f)
    again = summary["results"] + summary["errors"] - summary["resumed"]
    print()
    print(f"{args.images:,} images, --checkpoint_every {args.checkpoint_every:g}; cpu: {cpu}")
    print("| run | seconds | images classified |\n|---|---|---|")
    print(f"| (a) uninterrupted | {full.seconds:.1f} | {args.images:,} |")
    print(f"| (b) Ctrl-C at {done_b / args.images:.0%} | {seconds_b:.1f} | {done_b:,} (then interrupted) |")
    print(
        f"| (c) the same command again | {rerun.seconds:.1f} | {again:,} ({summary['resumed']:,} rows kept) |"
    )
    print(
        f"\n(c) / (a) = {rerun.seconds / full.seconds:.2f}; "
        f"((b) + (c)) / (a) = {(seconds_b + rerun.seconds) / full.seconds:.2f} "
        f"(before: (c) classified all {args.images:,} again, ((b) + (c)) / (a) = "
        f"{(seconds_b + full.seconds) / full.seconds:.2f})"
    )


if __name__ == "__main__":
    main()
