"""Retrieval throughput of the web page's *Open from PACS* (``io/dicom_query.retrieve_series``)
against dcmtk's ``getscu``, out of a real Orthanc.

One command::

    python benchmarks/bench_retrieve.py [--slices 100] [--size 512]

Writes a CT series of ``--slices`` slices of ``--size``² with the project's exporter, stores it in
Debian's Orthanc on free loopback ports (``Testing/orthanc_server.py``, the test fixture's
launcher), then fetches it three times each with our C-GET, our WADO-RS and dcmtk's ``getscu``
(C-GET, the baseline), each into a fresh folder. Prints instances/s and MB/s (median of the
three) and the ratio ours / getscu. The baseline runs on the same machine at the same time, so the
ratio is fair on a busy machine.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "IPv2Denoise"))
sys.path.insert(0, str(ROOT / "Testing"))

from bench_send import series_arguments, synthetic_series  # noqa: E402  (the same series and options)
from orthanc_server import start_orthanc  # noqa: E402

from IPv2DenoiseLib.io.dicom_net import parse_node, send_instances  # noqa: E402
from IPv2DenoiseLib.io.dicom_query import retrieve_series  # noqa: E402


def main() -> int:
    args = series_arguments(__doc__.splitlines()[0])
    getscu = shutil.which("getscu")
    if getscu is None:
        sys.exit("getscu (Debian dcmtk) is needed for the baseline: apt-get install dcmtk")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, megabytes = synthetic_series(tmp / "series", args.slices, args.size)
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        orthanc = start_orthanc(tmp / "orthanc")
        try:
            node = parse_node(orthanc.node)
            assert send_instances(files, node).ok
            times: dict[str, list[float]] = {"C-GET (ours)": [], "WADO-RS (ours)": [], "dcmtk getscu": []}
            for repeat in range(args.repeats):
                start = time.perf_counter()
                got = retrieve_series(node, study, series, tmp / f"cget-{repeat}")
                times["C-GET (ours)"].append(time.perf_counter() - start)
                assert len(got) == len(files)
                start = time.perf_counter()
                got = retrieve_series(orthanc.dicomweb_url, study, series, tmp / f"wado-{repeat}")
                times["WADO-RS (ours)"].append(time.perf_counter() - start)
                assert len(got) == len(files)
                out = tmp / f"getscu-{repeat}"
                out.mkdir()
                start = time.perf_counter()
                cmd = [
                    getscu,
                    "-S",
                    "-aec",
                    orthanc.aet,
                    "-od",
                    str(out),
                    "127.0.0.1",
                    str(orthanc.dicom_port),
                ]
                keys = ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}"]
                subprocess.run(
                    [*cmd, *keys, "-k", f"SeriesInstanceUID={series}"], check=True, capture_output=True
                )
                times["dcmtk getscu"].append(time.perf_counter() - start)
                assert len(list(out.iterdir())) == len(files)
        finally:
            orthanc.stop()
    print(
        f"Retrieval of {len(files)} CT instances ({args.size}², {megabytes:.1f} MB) from Orthanc on loopback"
    )
    print("| retriever | median s | instances/s | MB/s |")
    print("|---|---|---|---|")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.2f} | {len(files) / seconds:.0f} | {megabytes / seconds:.1f} |")
    for name in ("C-GET (ours)", "WADO-RS (ours)"):
        print(f"ratio ({name} speed / getscu speed): {medians['dcmtk getscu'] / medians[name]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
