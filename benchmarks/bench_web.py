"""The browser front end (``ipv2-denoise web``) against the command line on the same volume (issue #23).

One command::

    python benchmarks/bench_web.py [--runs 2] [--threads 2] [--input Resources/SampleData/sample_uldct.nrrd]

Each run first denoises ``--input`` with ``ipv2-denoise denoise`` (the baseline: wall time and
peak RSS of the process, polled every 50 ms), then starts ``ipv2-denoise web`` on a free loopback
port with the same volume, opens the page in Debian's Chromium (playwright, no browser download)
and clicks **Denoise**, driven by ``Testing/web_driver.py``, the tests' own driver. It prints, per
run and as the median: server start to the first frame in the browser, click to the denoised view,
and the server's RSS before a browser attaches, with one, and after denoising; each with its ratio
to the command line's wall time or peak RSS measured in the same run. Same model, device and
thread count on both sides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "IPv2Denoise"))
sys.path.insert(0, str(ROOT / "Testing"))

from web_driver import WebServer, denoise_and_wait, open_page, shows_scan, wait_until  # noqa: E402

SAMPLE = ROOT / "Resources" / "SampleData" / "sample_uldct.nrrd"


def command_line_run(source: Path, out: Path, threads: int) -> tuple[float, float]:
    """``ipv2-denoise denoise source out``: (wall seconds, peak RSS in MB)."""
    env = {"OMP_NUM_THREADS": str(threads)}
    began = time.monotonic()
    process = psutil.Popen(
        [sys.executable, "-m", "IPv2DenoiseLib", "denoise", str(source), str(out), "--device", "cpu"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak = 0.0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, process.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, err = process.communicate(timeout=900)
    seconds = time.monotonic() - began
    done.set()
    watcher.join()
    if process.returncode != 0:
        sys.exit(f"bench_web: ipv2-denoise denoise failed: {err.decode()[-2000:]}")
    return seconds, peak


def web_run(browser, source: Path, work: Path, threads: int) -> dict[str, float]:
    """One server and one page: the figures of one run."""
    root = work / "root"
    root.mkdir()
    shutil.copy(source, root / source.name)
    server = WebServer(root, [source.name, "--device", "cpu"], work / "server.log", threads=threads)
    try:
        figures = {"server ready (s)": server.ready_s, "RSS, no browser (MB)": server.rss_mb()}
        page = open_page(browser, server)
        wait_until(lambda: shows_scan(page), what="the first frame of the original view")
        figures["start to first frame (s)"] = time.monotonic() - server.began
        figures["RSS, one browser (MB)"] = server.rss_mb()
        figures["click to denoised view (s)"] = denoise_and_wait(page)
        figures["RSS after denoising (MB)"] = server.rss_mb()
        page.close()
    finally:
        server.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=SAMPLE, help="a volume (default: the bundled sample)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each side (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads on both sides (default 2)")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("bench_web: chromium is needed: run scripts/setup.sh --test (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        for run in range(args.runs):
            work = Path(tmp) / f"run{run}"
            work.mkdir()
            cli_s, cli_mb = command_line_run(args.input, work / "cli.nrrd", args.threads)
            figures = web_run(browser, args.input, work, args.threads)
            rows.append({"CLI denoise wall (s)": cli_s, "CLI peak RSS (MB)": cli_mb, **figures})
            print(f"run {run + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows[-1].items()), flush=True)
        browser.close()
    median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    cli_s, cli_mb = median["CLI denoise wall (s)"], median["CLI peak RSS (MB)"]
    print(f"\n{args.input.name}, {args.runs} runs, {args.threads} threads, medians:\n")
    print("| figure | web | baseline: ipv2-denoise denoise | web / baseline |")
    print("|---|---:|---:|---:|")
    for key in ("start to first frame (s)", "click to denoised view (s)"):
        print(f"| {key} | {median[key]:.1f} | {cli_s:.1f} s wall | {median[key] / cli_s:.2f} |")
    for key in ("RSS, no browser (MB)", "RSS, one browser (MB)", "RSS after denoising (MB)"):
        print(f"| {key} | {median[key]:.0f} | {cli_mb:.0f} MB peak | {median[key] / cli_mb:.2f} |")
    print(f"| server ready (s) | {median['server ready (s)']:.1f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
