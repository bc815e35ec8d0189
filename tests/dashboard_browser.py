"""The Ray dashboard's Serve page, seen through a real headless Chromium.

`serve_page(url, token, png)` starts Debian's `chromium` (`apt-get install chromium`) with a
throw-away profile, drives it over the Chrome DevTools Protocol (a websocket; the
`websockets` package Ray already depends on, nothing else), and does what a person does:

1. opens `<dashboard>/#/serve`;
2. when the dashboard answers 401, its UI opens the "Authentication Token Required" dialog;
   we click the dialog's "Authentication Token" field, paste the token into it
   (`Input.insertText`, what a paste does) and press Enter. The UI then POSTs
   `/api/authenticate` with `Authorization: Bearer <token>`, the server sets an HttpOnly
   cookie, and the UI reloads itself (ray/dashboard/client: authentication/*.ts, App.tsx);
3. waits until the "Applications / Deployments" table shows every deployment row with its
   replica count, in a settled state (no application DEPLOYING, no deployment UPDATING),
   and the System preview (controller, proxies, application status) has loaded;
4. saves a PNG screenshot and returns `document.body.innerText`.

No test functions here: tests import it. Chromium (and every process it started) is
killed on the way out, success or not.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ChromiumNotFound", "DashboardAuthError", "chromium_path", "serve_page"]

# Launchers first (Debian's /usr/bin/chromium is a shell script that execs the real binary
# under the same pid), then the real binary and other distributions' names.
_CANDIDATES = ("chromium", "/usr/bin/chromium", "/usr/lib/chromium/chromium", "chromium-browser", "/snap/bin/chromium")
_WINDOW = (1600, 1200)
# The dialog's one text field (authentication/TokenAuthenticationDialog.tsx).
_TOKEN_FIELD = '[aria-labelledby="token-auth-dialog-title"] input, input[placeholder="Enter your authentication token"]'


class ChromiumNotFound(RuntimeError):
    pass


class DashboardAuthError(RuntimeError):
    """The dashboard's token dialog rejected the token (or there was none to give it)."""


def chromium_path() -> str | None:
    """The Chromium executable: $CHROMIUM if set, else `chromium` on PATH, else the usual places."""
    for name in (os.environ.get("CHROMIUM"), *_CANDIDATES):
        if not name:
            continue
        path = shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


def serve_page(dashboard_url: str, token: str, screenshot: Path, timeout_s: float = 90) -> str:
    """Open the dashboard's Serve page, log in with `token` through its dialog, wait for the
    deployments and their replicas, save a PNG to `screenshot`; returns the page's visible text.

    Raises ChromiumNotFound, DashboardAuthError (token rejected), TimeoutError (page never
    settled: the message carries the page's text, and a screenshot of that moment is saved
    next to `screenshot` as `<stem>.failed.png`).
    """
    binary = chromium_path()
    if binary is None:
        raise ChromiumNotFound(
            "no Chromium found (tried $CHROMIUM, "
            + ", ".join(_CANDIDATES)
            + "); on Debian: apt-get install -y chromium"
        )
    screenshot = Path(screenshot)
    token = (token or "").strip()  # `ray get-auth-token` ends with a newline; the dialog trims too
    base = dashboard_url.rstrip("/")
    deadline = time.monotonic() + timeout_s
    with _chromium(binary, urllib.parse.urlsplit(base).hostname or "127.0.0.1", deadline) as page:
        page.call("Page.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": _WINDOW[0], "height": _WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
        )
        nav = page.call("Page.navigate", {"url": f"{base}/#/serve"})
        if nav.get("errorText"):
            raise ConnectionError(f"Chromium could not open {base}: {nav['errorText']}")
        state: dict = {}
        submitted_at = None
        while True:
            state = page.evaluate(_STATE_JS) or {}
            if state.get("authError"):
                raise DashboardAuthError(f"the dashboard's token dialog says: {state['authError']}")
            if state.get("dialog"):
                if submitted_at is None:
                    if not token:
                        raise DashboardAuthError("the dashboard asks for a token and none was given")
                    if _enter_token(page, token):
                        submitted_at = time.monotonic()
                elif time.monotonic() - submitted_at > 15:
                    raise DashboardAuthError("the token dialog is still open 15 s after submitting the token")
            # After a login the UI reloads itself: the page that took the token may show data
            # for a moment before it goes, so wait for the reloaded one (or 10 s, should a
            # later dashboard stop reloading).
            elif _settled(state) and not (state.get("beforeReload") and time.monotonic() - (submitted_at or 0) < 10):
                page.evaluate("document.fonts.ready.then(() => true)", await_promise=True)  # bundled Roboto
                _save_png(page, screenshot)
                after = page.evaluate(_STATE_JS) or {}
                if _settled(after) and after.get("beforeReload") == state.get("beforeReload"):
                    return after["text"]
                continue  # the page changed under the screenshot: take it again
            if time.monotonic() > deadline:
                failed = screenshot.with_name(screenshot.stem + ".failed.png")
                try:
                    _save_png(page, failed)
                except Exception as exc:  # noqa: BLE001 - the timeout is the news
                    failed = f"none: {exc}"
                raise TimeoutError(
                    f"Serve page of {base} not settled after {timeout_s}s (screenshot {failed}): "
                    f"{json.dumps(_summary(state))}\n--- page text ---\n{state.get('text', '')}"
                )
            time.sleep(0.25)


def _enter_token(page: _Session, token: str) -> bool:
    """Click the dialog's token field, paste the token, press Enter (the dialog submits on Enter).
    False when the field went away meanwhile (the caller looks again)."""
    rect = page.evaluate(
        f"(() => {{ const e = document.querySelector('{_TOKEN_FIELD}'); if (!e) return null;"
        " e.scrollIntoView({block: 'center'});"
        " const r = e.getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
    )
    if not rect:
        return False
    page.evaluate("window.__dashboardBrowserLogin = true")  # gone once the UI reloads the page
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        page.call(
            "Input.dispatchMouseEvent",
            {
                "type": kind,
                "x": rect["x"],
                "y": rect["y"],
                "button": "left" if kind != "mouseMoved" else "none",
                "clickCount": 1,
            },
        )
    page.call("Input.insertText", {"text": token})
    typed = page.evaluate(f"document.querySelector('{_TOKEN_FIELD}').value")
    if typed != token:
        raise DashboardAuthError(
            f"pasting the token into the dialog failed (field holds {len(typed or '')} characters)"
        )
    enter = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}
    page.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **enter})
    page.call("Input.dispatchKeyEvent", {"type": "keyUp", **enter})
    return True


_TRANSITIONAL = {"DEPLOYING", "NOT_STARTED", "DELETING", "UPDATING", "UPSCALING", "DOWNSCALING", "STARTING"}


def _settled(state: dict) -> bool:
    deployments, apps = state.get("deployments") or [], state.get("apps") or []
    return (
        bool(deployments)
        and state.get("systemLoaded", False)
        and all(d["replicas"].isdigit() and d["status"] and d["status"] not in _TRANSITIONAL for d in deployments)
        and all(a["status"] and a["status"] not in _TRANSITIONAL for a in apps)
    )


def _summary(state: dict) -> dict:
    return {k: state.get(k) for k in ("url", "dialog", "systemLoaded", "apps", "deployments")}


def _save_png(page: _Session, path: Path) -> None:
    data = page.call("Page.captureScreenshot", {"format": "png"})["data"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(data))


# What the page shows, read from the DOM the dashboard renders (ServeDeploymentsListPage.tsx:
# columns "", Name, Status, Status message, Replicas, ...; an application row links to
# #/serve/applications/<app>, its deployment rows to #/serve/applications/<app>/<deployment>).
_STATE_JS = r"""
(() => {
  const visible = (e) => !!e && e.getClientRects().length > 0;
  const field = document.querySelector('INPUT_SELECTOR');
  const dialog = visible(field);
  let authError = '';
  if (dialog) {
    const alert = field.closest('[role="dialog"]')?.querySelector('.MuiAlert-message');
    authError = alert ? alert.innerText.trim() : '';
  }
  const apps = [], deployments = [];
  for (const row of document.querySelectorAll('tr')) {
    const cells = row.querySelectorAll('td');
    const link = row.querySelector('a[href*="#/serve/applications/"]');
    if (!link || cells.length < 5) continue;
    const path = decodeURIComponent(link.getAttribute('href').split('#/serve/applications/')[1] || '');
    const entry = {name: cells[1].innerText.trim(), status: cells[2].innerText.trim()};
    if (path.includes('/')) deployments.push({...entry, replicas: cells[4].innerText.trim()});
    else apps.push(entry);
  }
  const text = document.body ? document.body.innerText : '';
  return {url: location.href, dialog, authError, apps, deployments, beforeReload: !!window.__dashboardBrowserLogin,
          systemLoaded: text.includes('Controller status'), text};
})()
""".replace("INPUT_SELECTOR", _TOKEN_FIELD.replace("'", "\\'"))


class _Session:
    """One CDP connection (to a page target): calls by id; events are not needed and dropped."""

    CALL_TIMEOUT_S = 30  # one command; serve_page keeps the overall deadline itself

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self._ws = connect(ws_url, max_size=None, open_timeout=self.CALL_TIMEOUT_S, compression=None, proxy=None)
        self._next_id = 0

    def call(self, method: str, params: dict | None = None) -> dict:
        self._next_id += 1
        msg_id = self._next_id
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        end = time.monotonic() + self.CALL_TIMEOUT_S
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"Chromium did not answer {method} in time")
            try:
                reply = json.loads(self._ws.recv(timeout=remaining))
            except TimeoutError:
                raise TimeoutError(f"Chromium did not answer {method} in time") from None
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str, await_promise: bool = False):
        # A page mid-reload (the UI reloads itself after the login) has no document for a
        # moment: Chromium answers with an error or an exception; report nothing then.
        try:
            result = self.call(
                "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": await_promise}
            )
        except RuntimeError:
            return None
        if "exceptionDetails" in result:
            return None
        return result.get("result", {}).get("value")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the browser may already be gone
            self._ws.close()


_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # we run as root: Chromium refuses to start sandboxed
    "--remote-debugging-port=0",  # Chromium picks a free port, writes it to <profile>/DevToolsActivePort
    "--remote-debugging-address=127.0.0.1",
    "--no-proxy-server",  # straight to the dashboard, whatever $http_proxy says
    f"--window-size={_WINDOW[0]},{_WINDOW[1]}",
    "--disable-gpu",  # no GPU here; software compositing is plenty for a screenshot
    "--disable-dev-shm-usage",  # containers' /dev/shm is often 64 MB: renderers crash
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-breakpad",
    "--disable-crash-reporter",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=Translate,MediaRouter,OptimizationHints,DialMediaRouteProvider",
    "--metrics-recording-only",
    "--no-pings",
    "--password-store=basic",
    "--use-mock-keychain",
    "--mute-audio",
    "--hide-scrollbars",
)


@contextlib.contextmanager
def _chromium(binary: str, dashboard_host: str, deadline: float) -> Iterator[_Session]:
    """A headless Chromium with a profile of its own; yields a CDP session on its page. On the
    way out, whatever happened, Chromium's whole tree is killed and the profile removed."""
    workdir = Path(tempfile.mkdtemp(prefix="dashboard-chromium-"))
    profile, log_path = workdir / "profile", workdir / "chromium.log"
    proc = page = None

    def log_tail() -> str:
        try:
            return log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    try:
        args = [
            binary,
            *_FLAGS,
            f"--user-data-dir={profile}",
            # No name resolves but the dashboard's host: the browser talks to nothing else.
            f"--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE {dashboard_host}",
            "about:blank",
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        port_file = profile / "DevToolsActivePort"
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if proc.poll() is not None:
                raise RuntimeError(f"{binary} exited with {proc.returncode} at start:\n{log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{binary} did not open its DevTools port:\n{log_tail()}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never $http_proxy
        page_ws = None
        while page_ws is None:
            with (
                contextlib.suppress(OSError, ValueError),
                direct.open(f"http://127.0.0.1:{port}/json/list", timeout=5) as rsp,
            ):
                page_ws = next(
                    (
                        t["webSocketDebuggerUrl"]
                        for t in json.load(rsp)
                        if t.get("type") == "page" and t.get("webSocketDebuggerUrl")
                    ),
                    None,
                )
            if page_ws is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{binary} opened no page target:\n{log_tail()}")
                time.sleep(0.1)
        page = _Session(page_ws)
        yield page
    finally:
        if page is not None:
            page.close()
        if proc is not None:
            _kill_tree(proc, marker=str(workdir))
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_tree(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM, then SIGKILL, Chromium, every process in its process group, their descendants,
    and any process whose command line names our profile directory (zygote, renderers, GPU and
    utility processes all carry it), so nothing outlives us even when reparented to init."""

    def ours() -> set[int]:
        table, pids = {}, set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                ppid, pgid = int(fields[1]), int(fields[2])
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            table[int(entry)] = ppid
            # A group id is never reused while the group has members, so this is our tree.
            if pgid == proc.pid or marker.encode() in cmdline:
                pids.add(int(entry))
        if proc.returncode is None:  # once reaped, its pid could belong to someone else
            pids.add(proc.pid)
        while True:
            children = {pid for pid, ppid in table.items() if ppid in pids} - pids
            if not children:
                break
            pids |= children
        pids.discard(os.getpid())
        return {pid for pid in pids if _alive(pid)}

    def signal_all(sig: int) -> None:
        for pid in ours():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    signal_all(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    end = time.monotonic() + 10
    while True:
        signal_all(signal.SIGKILL)
        if proc.returncode is None:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if (proc.returncode is not None and not ours()) or time.monotonic() > end:
            return
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"
