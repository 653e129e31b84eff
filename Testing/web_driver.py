"""Drive ``ipv2-denoise web`` the way a person does: a real server process on a free loopback port
and a page in Debian's Chromium (playwright). Shared by ``Testing/app/test_web.py`` and
``benchmarks/bench_web.py``, so the benchmark measures exactly what the tests watch."""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil

#: Generous bounds for waits (never asserted as speed): a slow shared machine must still pass.
START_S = 180.0
JOB_S = 240.0


class WebServer:
    """One ``ipv2-denoise web`` process on a free loopback port."""

    def __init__(self, root: Path, args: list[str], log: Path, *, threads: int = 1) -> None:
        self.root = root
        self.log = log
        self.began = time.monotonic()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("DISPLAY", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "IPv2DenoiseLib", "web", "--port", "0", "--data-root", str(root), *args],
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=env,
        )
        self.url = self._wait_for_url()
        self.ready_s = time.monotonic() - self.began

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"web server exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            ready, _, _ = select.select([self.process.stdout], [], [], 1.0)
            if ready:
                line = self.process.stdout.readline()
                if "serving http://" in line:
                    return line.split("serving ", 1)[1].split(" ", 1)[0]
        raise RuntimeError(f"web server did not start within {START_S:g} s:\n{self.log.read_text()[-3000:]}")

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def wait_until(condition: Callable[[], object], timeout: float = JOB_S, what: str = "condition"):
    """Poll ``condition`` until it is truthy (its value is returned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def view_pixels(page, title: str) -> np.ndarray:
    """What the view titled ``title`` shows now (its streamed image, as RGB)."""
    from PIL import Image

    image = page.locator(f"#title-{title}").locator("xpath=..").locator("img.image-display-area")
    return np.asarray(Image.open(io.BytesIO(image.screenshot())).convert("RGB"), dtype=np.int16)


def lit(pixels: np.ndarray) -> float:
    """Share of a view's pixels that are not (nearly) black: the title and slider overlays are small."""
    return float((pixels.max(axis=2) > 30).mean())


def graininess(pixels: np.ndarray) -> float:
    """Mean absolute grey-level jump between horizontal neighbours inside the scan."""
    grey = pixels.mean(axis=2)
    inside = (grey[:, 1:] > 30) & (grey[:, :-1] > 30)
    return float(np.abs(np.diff(grey, axis=1))[inside].mean())


def open_page(browser, server: WebServer):
    """A new page at the address the server printed (its access token included)."""
    page = browser.new_page(viewport={"width": 1400, "height": 860})
    page.goto(server.url)
    return page


def shows_scan(page) -> bool:
    """The original view holds a scan (not only black)."""
    try:
        return lit(view_pixels(page, "original")) > 0.2
    except Exception:
        return False


def choose_and_open(page, path: str) -> None:
    """Type a path into the scan chooser and click Open (Escape closes the list of suggestions,
    which would otherwise lie over the button)."""
    page.locator("#input-path").fill(path)
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.click("#open-btn")


def page_synced(page) -> bool:
    """The page has sent every change to the server and has no call waiting for an answer."""
    return page.evaluate(
        "() => !!window.trame.state && !window.trame.client.isBusy() && window.trame.state.dirtyKeys.size === 0"
    )


@contextlib.contextmanager
def server_busy(server: WebServer, page) -> Iterator[None]:
    """The server stops answering for a moment while the page waits for one of its answers, as when
    it renders or reads a slow disk: what the user does meanwhile reaches it only on resuming.

    trame's client (4.1.4) holds back state updates while a call of it is unanswered, but sends a
    click at once; so here a click reaches the server before the fields changed just before it,
    deterministically (on a loaded server this happens by chance).
    """
    wait_until(lambda: page_synced(page), timeout=60, what="the page to be in step with the server")
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        # a call in flight (the one the page makes on connecting), unanswered while the server is stopped
        page.evaluate("() => { window.trame.client.getRemote().Trame.getState(); }")
        yield
        page.wait_for_timeout(100)  # the last click's call leaves the page before the server resumes
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def denoise_and_wait(page) -> float:
    page.click("#denoise-btn")
    clicked = time.monotonic()
    wait_until(lambda: "denoise: done" in page.inner_text("#job-message"), what="the denoise job")
    page.wait_for_selector("#metrics")
    wait_until(lambda: lit(view_pixels(page, "denoised")) > 0.2, what="the denoised view")
    return time.monotonic() - clicked
