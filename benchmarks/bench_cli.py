"""Wall-clock time of the `pdm` command as a user runs it: whole processes, started fresh each time.

    python -m benchmarks.bench_cli                      # the bundled model, 5 runs of each command
    python -m benchmarks.bench_cli --model PIPELINE_DIR --repeats 3 --md cli.md

Times `pdm --help` and `pdm generate PROMPT --out FILE` (in a temporary folder), each run in a new process: what a
user waits for, interpreter start and imports included. `pdm generate --timings` reports the seconds of its own
phases (argument checks, imports, loading the pipeline, generating, decoding the codes to pixels, saving); "start +
exit" is the rest of the process's wall time (starting the interpreter and the `pdm` module, and ending them). The
median over the runs is printed, with the machine's CPU count and load average: other processes on the CPU slow
every number down.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO_ROOT / "progressive_denoising" / "bundled" / "pdm-shapes"
PHASES = ("start + exit", "checks", "imports", "load", "generate", "decode", "save")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="pipeline folder (default: the bundled model)")
    parser.add_argument("--prompt", default="a large red circle left of a small blue square")
    parser.add_argument("--repeats", type=int, default=5, help="processes per command; the median is reported")
    parser.add_argument("--md", default=None, help="also write the table as Markdown to this file")
    return parser.parse_args(argv)


def pdm_command(*arguments):
    """The `pdm` entry point of this checkout, whether or not it is installed."""
    return [sys.executable, "-m", "progressive_denoising.cli", *arguments]


def timed_run(command, cwd):
    """(wall seconds, stdout) of one process."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def phase_seconds(stdout, wall):
    """{phase: seconds} from the `timings (s): name seconds, ...` line of `pdm generate --timings`."""
    line = next(line for line in stdout.splitlines() if line.startswith("timings (s):"))
    phases = {name: float(value) for name, value in re.findall(r"(\w+) ([0-9.]+)", line.split(":", 1)[1])}
    phases["start + exit"] = wall - sum(phases.values())
    return phases


def bench_generate(args, folder):
    command = pdm_command("generate", args.prompt, "--model", args.model, "--out", "bench.png", "--overwrite",
                          "--timings")
    runs = []
    for _ in range(args.repeats):
        wall, stdout = timed_run(command, folder)
        runs.append({"total": wall, **phase_seconds(stdout, wall)})
    return command, {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def bench_help(args, folder):
    command = pdm_command("--help")
    return command, statistics.median(timed_run(command, folder)[0] for _ in range(args.repeats))


def shown(command):
    """The command as a user would type it."""
    words = ["pdm", *command[3:]]
    return " ".join(f'"{word}"' if " " in word else word for word in words).replace(str(REPO_ROOT) + os.sep, "")


def table(help_command, help_seconds, generate_command, generate):
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    lines = [
        f"{os.cpu_count()} CPUs, load average {load} (1, 5, 15 min) when the runs ended; "
        f"median of the runs, seconds per process",
        "",
        "| command | total | " + " | ".join(PHASES) + " |",
        "|---|---:|" + "---:|" * len(PHASES),
        f"| `{shown(help_command)}` | {help_seconds:.2f} |" + " - |" * len(PHASES),
        f"| `{shown(generate_command)}` | {generate['total']:.2f} | "
        + " | ".join(f"{generate[phase]:.2f}" for phase in PHASES) + " |",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    folder = tempfile.mkdtemp(prefix="bench_cli_")
    try:
        help_command, help_seconds = bench_help(args, folder)
        generate_command, generate = bench_generate(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = table(help_command, help_seconds, generate_command, generate)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
