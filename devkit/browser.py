"""Drive the REAL ComfyUI frontend in Debian's headless Chromium (Playwright, no browser download).

    with FrontendSession(server) as ui:
        report = ui.load_workflow(workflow_dict, "name")
        ui.screenshot(path)

The server must run the real frontend (ComfyServer(real_frontend=True)).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


def browser_available() -> str | None:
    """None when Playwright + Chromium + the frontend package are importable/installed, else what is missing."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("pip package playwright")
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        missing.append("pip package comfyui-frontend-package")
    if chromium_path() is None:
        missing.append("Debian package chromium")
    return ", ".join(missing) or None


def skip_intro(base_dir: Path) -> None:
    """A fresh user folder opens a full-screen Templates dialog first; mark the tutorial done."""
    settings = Path(base_dir) / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(settings.read_text()) if settings.exists() else {}
    current.update({"Comfy.TutorialCompleted": True})
    settings.write_text(json.dumps(current))


READY_JS = ("() => !!(window.app && app.graph && window.LiteGraph && "
            "Object.keys(LiteGraph.registered_node_types).length > 100)")

# Everything the test needs to know after a load, gathered in the page.
INSPECT_JS = """async () => {
  const nodes = app.graph.nodes;
  const missing = nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type);
  const errored = nodes.filter(n => n.has_errors).map(n => n.type + ' #' + n.id);
  const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const dialogs = [...document.querySelectorAll('.p-dialog')].filter(visible).map(d => d.innerText.slice(0, 400));
  const toasts = [...document.querySelectorAll('.p-toast-message')].filter(visible).map(t => t.innerText.slice(0, 400));
  const widgets = {};
  for (const n of nodes) widgets[n.id] = (n.widgets || []).map(w => [w.name, w.value]);
  let prompt = null, promptError = null;
  try { prompt = (await app.graphToPrompt()).output; } catch (e) { promptError = String(e); }
  return {missing, errored, dialogs, toasts, widgets, prompt, promptError, count: nodes.length,
          version: window.__COMFYUI_FRONTEND_VERSION__ || null};
}"""


class FrontendSession:
    def __init__(self, url: str, viewport=(2200, 1240)):
        self.url = url
        self.viewport = viewport
        self.console_errors: list[str] = []

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._profile = tempfile.mkdtemp(prefix="indomain_chromium_")
        self.context = self._pw.chromium.launch_persistent_context(
            self._profile, executable_path=chromium_path(), args=CHROMIUM_ARGS,
            viewport={"width": self.viewport[0], "height": self.viewport[1]})
        # The UI asks external hosts for release/registry info; nothing outside loopback is reachable here.
        self.context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
            ("http://127.0.0.1", "http://localhost", "data:", "blob:")) else route.abort())
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=120_000)
        self.page.wait_for_function(READY_JS, timeout=120_000, polling=500)
        return self

    def __exit__(self, *exc):
        try:
            self.context.close()
        finally:
            self._pw.stop()
            shutil.rmtree(self._profile, ignore_errors=True)

    def clear(self) -> None:
        """Close leftover dialogs/toasts and start from an empty graph."""
        self.page.evaluate("() => { app.graph.clear(); document.querySelectorAll('.p-toast-message').forEach(t => t.remove()); }")

    def load_workflow(self, workflow: dict, name: str, settle_ms: int = 1500) -> dict:
        self.clear()
        self.page.evaluate("async ([wf, name]) => { await app.loadGraphData(wf, true, true, name); }", [workflow, name])
        self.page.wait_for_timeout(settle_ms)
        self.page.evaluate("() => { app.canvas.setDirty(true, true); app.canvas.draw(true, true); }")
        return self.page.evaluate(INSPECT_JS)

    def fit_view(self) -> None:
        """Zoom so the whole graph is on screen (the frontend's own 'Fit view' command), banners closed."""
        self.page.evaluate("""async () => {
          for (const b of document.querySelectorAll('button')) {
            const bar = b.parentElement;  // the 'Introducing ...' announcement bar's close button
            if (bar && (bar.innerText || '').includes('Introducing') && b.className.includes('absolute')) b.click();
          }
          await app.extensionManager.command.execute('Comfy.Canvas.FitView');
          // draw node titles and widgets even when zoomed out (the docs screenshots must be readable)
          const c = app.canvas;
          if ('low_quality_zoom_threshold' in c) c.low_quality_zoom_threshold = 0.05;
          try { await app.extensionManager.setting.set('LiteGraph.Canvas.LowQualityRenderingZoomThreshold', 0.05); } catch (e) {}
          c.setDirty(true, true); c.draw(true, true);
        }""")
        self.page.wait_for_timeout(600)

    def open_node_help(self, node_type: str, expect: str, timeout_ms: int = 60_000) -> dict:
        """Select the first node of `node_type` on the canvas and press the selection toolbox's Info button (the
        frontend's own way to its node help panel); wait until `expect` shows on the page. Returns the help's
        images (src, loaded) and the page's text around `expect`."""
        found = self.page.evaluate("""(type) => {
          const n = app.graph.nodes.find(n => n.type === type);
          if (!n) return false;
          app.canvas.deselectAll();
          app.canvas.selectNode(n);
          app.canvas.setDirty(true, true); app.canvas.draw(true, true);
          return true;
        }""", node_type)
        if not found:
            raise ValueError(f"no {node_type} node on the canvas")
        self.page.click('[data-testid="info-button"]', timeout=timeout_ms)
        self.page.wait_for_function("(t) => document.body.innerText.includes(t)", arg=expect, timeout=timeout_ms,
                                    polling=250)
        self.page.wait_for_timeout(500)  # let the page's images load
        return self.page.evaluate("""(t) => {
          const text = document.body.innerText, at = text.indexOf(t);
          const images = [...document.querySelectorAll('img')].filter(i => i.src.includes('/docs/'))
            .map(i => ({src: i.src, loaded: i.complete && i.naturalWidth > 0}));
          return {text: text.slice(Math.max(0, at - 2000), at + 500), images};
        }""", expect)

    def screenshot(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fit_view()
        self.page.screenshot(path=str(path))
        return path
