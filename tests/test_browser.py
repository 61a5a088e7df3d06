"""The latent browser in a real headless Chromium, opened straight from disk (file://).

Chromium is driven over the DevTools protocol on `--remote-debugging-pipe` (fds 3 and 4, JSON
messages ending in NUL) with the standard library only. Skipped where no chromium is installed,
except under CI (`CI` set), where `.ci/run` installs it and a skip would hide a broken browser.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import time

import pytest

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-pipe",
]  # fmt: skip


def chromium_path() -> str | None:
    found = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )
    if found is None and os.environ.get("CI"):
        pytest.fail("CI is set but chromium is not installed (.ci/run should install it)")
    return found


class Chromium:
    """A headless Chromium page; `events` collects every protocol event received."""

    def __init__(self, exe: str, profile: pathlib.Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds():  # Chromium reads commands on fd 3 and writes replies and events on fd 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError("no message from chromium")
            self._buf += os.read(self._from_chrome, 1 << 16)
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(max(0.1, deadline - time.monotonic())))

    def eval(self, expression: str):
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def load(self, action) -> None:
        """Run `action` (navigate or click) and wait until the new page has loaded."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        action()
        self.wait_for("Page.loadEventFired")

    def errors(self) -> list[str]:
        out = []
        for ev in self.events:
            method, params = ev.get("method"), ev.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:300])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                out.append(json.dumps(params["args"])[:300])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
        return out

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.mark.slow
def test_browser_opens_from_disk(rendered, tmp_path):
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    index = rendered / "index.html"
    expected_ids = [int(m) for m in re.findall(r'<tr data-id="(\d+)"', index.read_text())]
    assert len(expected_ids) > 5
    page = Chromium(exe, tmp_path / "profile")
    try:
        page.load(lambda: page.call("Page.navigate", session=True, url=index.as_uri()))
        assert page.eval("document.querySelectorAll('#latents tbody tr').length") == len(
            expected_ids
        )
        assert page.eval("document.querySelectorAll('#scatter circle.chosen').length") == len(
            expected_ids
        )
        assert page.eval("document.getElementById('count').textContent") == (
            f"{len(expected_ids)} of {len(expected_ids)} latents shown"
        )
        # Sorting by a header click, then filtering by the id box, in the page's own script.
        page.eval("document.querySelector('th[data-key=\"id\"]').click()")
        ids = page.eval(
            "[...document.querySelectorAll('#latents tbody tr')].map(r => +r.dataset.id)"
        )
        assert ids == sorted(expected_ids)
        box = "document.getElementById('ids')"
        page.eval(f"{box}.value = '{ids[1]} {ids[3]}'; {box}.dispatchEvent(new Event('input'))")
        visible = page.eval(
            "[...document.querySelectorAll('#latents tbody tr')]"
            ".filter(r => r.style.display !== 'none').map(r => +r.dataset.id)"
        )
        assert visible == [ids[1], ids[3]]
        # Opening a latent shows its images: every crop and heatmap file loads.
        page.load(
            lambda: page.eval(
                f"document.querySelector('a.latent[href=\"latents/{ids[3]}.html\"]').click()"
            )
        )
        assert page.eval("document.querySelector('h1').textContent") == f"Latent {ids[3]}"
        images = page.eval(
            "[...document.images].map(i => [i.className, i.complete && i.naturalWidth > 0])"
        )
        n_figures = len(
            re.findall("<figure", (rendered / "latents" / f"{ids[3]}.html").read_text())
        )
        assert n_figures >= 1 and len(images) == 2 * n_figures
        assert [c for c, _ in images] == ["crop", "heatmap"] * n_figures
        assert all(ok for _, ok in images), images
        assert page.errors() == []
    finally:
        page.close()
