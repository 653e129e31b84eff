"""C-STORE throughput of ``ipv2-denoise send`` (pynetdicom) against dcmtk's ``storescu``, into a real Orthanc.

One command::

    python benchmarks/bench_send.py [--slices 100] [--size 512]

Writes a derived CT series of ``--slices`` slices of ``--size``² (int16, as ``denoise --dicom``
writes them) with the project's own exporter, starts Debian's Orthanc on free loopback ports
(``Testing/orthanc_server.py``, the test fixture's launcher) and stores the series three times with
each sender (fresh SOP Instance UIDs each time, so Orthanc really stores every file). Prints
instances/s and MB/s of each (median of the three) and the ratio ours / storescu. The baseline
runs in the same process tree on the same machine at the same time, so the ratio is fair even on a
busy machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "IPv2Denoise"))
sys.path.insert(0, str(ROOT / "Testing"))

from orthanc_server import start_orthanc  # noqa: E402

from IPv2DenoiseLib.core.volume import Volume  # noqa: E402
from IPv2DenoiseLib.io.dicom_export import export_derived_series  # noqa: E402
from IPv2DenoiseLib.io.dicom_net import parse_node, send_instances  # noqa: E402


def _fresh_uids(files: list[Path]) -> None:
    series = generate_uid()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f, enforce_file_format=True)


def series_arguments(description: str) -> argparse.Namespace:
    """``--slices``, ``--size``, ``--repeats``: the series and repeats of the PACS benchmarks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def synthetic_series(folder: Path, slices: int, size: int) -> tuple[list[Path], float]:
    """A CT series of ``slices`` × ``size``² written by the project's exporter; (files, MB)."""
    rng = np.random.default_rng(0)
    hu = rng.normal(-600, 200, (slices, size, size)).astype(np.float32)
    files = export_derived_series(Volume(hu, spacing=(0.7, 0.7, 1.0)), folder)
    return files, sum(f.stat().st_size for f in files) / 1e6


def main() -> int:
    args = series_arguments(__doc__.splitlines()[0])
    storescu = shutil.which("storescu")
    if storescu is None:
        sys.exit("storescu (Debian dcmtk) is needed for the baseline: apt-get install dcmtk")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, megabytes = synthetic_series(tmp / "series", args.slices, args.size)
        orthanc = start_orthanc(tmp / "orthanc")
        try:
            node = parse_node(f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}")
            times: dict[str, list[float]] = {"ipv2-denoise send": [], "dcmtk storescu": []}
            for _ in range(args.repeats):
                _fresh_uids(files)
                start = time.perf_counter()
                report = send_instances(files, node)
                times["ipv2-denoise send"].append(time.perf_counter() - start)
                assert report.ok, report.summary()
                _fresh_uids(files)
                start = time.perf_counter()
                cmd = [storescu, "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port)]
                subprocess.run(cmd + [str(f) for f in files], check=True, capture_output=True)
                times["dcmtk storescu"].append(time.perf_counter() - start)
        finally:
            orthanc.stop()
    print(f"C-STORE of {len(files)} CT instances ({args.size}², {megabytes:.1f} MB) into Orthanc on loopback")
    print("| sender | median s | instances/s | MB/s |")
    print("|---|---|---|---|")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.2f} | {len(files) / seconds:.0f} | {megabytes / seconds:.1f} |")
    ratio = medians["dcmtk storescu"] / medians["ipv2-denoise send"]
    print(f"ratio (ipv2-denoise send speed / storescu speed): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
