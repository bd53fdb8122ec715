// Drives JupyterLab and Notebook 7 in headless Chromium the way a user
// would: launcher -> "Python 3 (notebookos)", cells typed in and run,
// a widget moved, a sleeping cell interrupted, the kernel restarted.
// Started by run.sh, which provides the server and the environment below.
// Writes results.json (one entry per step) and screenshots to E2E_OUT;
// exits 1 if any step failed.

import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const { JUPYTER_URL, JUPYTER_TOKEN, E2E_OUT, CHROMIUM, E2E_PROFILE, NOTEBOOK } = process.env;
const KERNEL = "Python 3 (notebookos)";
// Liveness bounds, not expectations: a debug kernel on a busy machine is slow.
const STARTUP_MS = 90_000;
const CELL_MS = 60_000;

const cells = JSON.parse(readFileSync(NOTEBOOK, "utf8"))
  .cells.filter((c) => c.cell_type === "code")
  .map((c) => [].concat(c.source).join(""));

const results = [];
let page;

// Steps build on each other, so after a failure the rest are skipped.
async function step(name, fn) {
  if (results.some((r) => !r.ok)) {
    results.push({ name, ok: false, detail: "skipped after an earlier failure" });
    return;
  }
  try {
    const detail = await fn();
    results.push({ name, ok: true, detail: detail ?? "" });
  } catch (e) {
    results.push({ name, ok: false, detail: String(e.stack || e) });
    await page?.screenshot({ path: join(E2E_OUT, `failed-${name}.png`) }).catch(() => {});
  }
}

async function shot(name) {
  await page.screenshot({ path: join(E2E_OUT, `${name}.png`), fullPage: true });
}

// The notebook panel the user is looking at (JupyterLab has one per tab).
const notebook = () => page.locator(".jp-NotebookPanel:visible");
const cell = (i) => notebook().locator(".jp-Notebook .jp-Cell").nth(i);

// Types code into cell i and runs it with Shift+Enter, as a user does.
// insertText, unlike key presses, bypasses the editor's auto-indent and
// bracket closing, so the cell holds exactly `code`.
async function runCell(i, code, { wait = true } = {}) {
  const editor = cell(i).locator(".cm-content");
  await editor.click();
  await page.keyboard.insertText(code);
  await page.keyboard.press("Shift+Enter");
  if (wait) await finished(i);
}

// A cell has finished when its prompt shows a number instead of "*".
async function finished(i) {
  await cell(i)
    .locator(".jp-InputPrompt")
    .filter({ hasText: /\[\d+\]/ })
    .waitFor({ timeout: CELL_MS });
}

const outputText = (i) => cell(i).locator(".jp-OutputArea").innerText();

// Waits for the current notebook's kernel to be connected and in `status`.
// What the page shows lags the session: a cell run before the kernel is
// connected is silently not run, so this asks the app (run.sh exposes it).
async function kernel(status) {
  await page.waitForFunction(
    (status) => {
      const k = window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel;
      return k?.connectionStatus === "connected" && k.status === status;
    },
    status,
    { timeout: STARTUP_MS },
  );
}

function pidOf(notebookosOutput) {
  const m = /replica \d+: talks to Jupyter[^\n]*?\spid (\d+)/.exec(notebookosOutput);
  if (!m) throw new Error(`no replica line in %notebookos output:\n${notebookosOutput}`);
  return Number(m[1]);
}

function expect(cond, what) {
  if (!cond) throw new Error(what);
}

const context = await chromium.launchPersistentContext(E2E_PROFILE, {
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1280, height: 1000 },
});
let kernelPid;
try {
  page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(CELL_MS);

  await step("launcher", async () => {
    await page.goto(`${JUPYTER_URL}/lab?token=${JUPYTER_TOKEN}`);
    await page.locator(".jp-Launcher").waitFor({ timeout: STARTUP_MS });
    await shot("01-launcher");
  });

  await step("pick-kernel", async () => {
    const section = page.locator(".jp-Launcher-section").filter({ hasText: "Notebook" });
    await section.locator(".jp-LauncherCard").filter({ hasText: KERNEL }).first().click();
    await kernel("idle");
    const name = await notebook().locator(".jp-Toolbar-kernelName").innerText();
    expect(name.trim() === KERNEL, `toolbar shows kernel ${JSON.stringify(name)}`);
    return name.trim();
  });

  // The notebook's cells: parameters, print, plot, slider, %notebookos.
  await step("print", async () => {
    await runCell(0, cells[0]);
    await runCell(1, cells[1]);
    const out = await outputText(1);
    expect(out.includes("hello from notebookos"), `print cell shows ${JSON.stringify(out)}`);
    return out.trim();
  });

  await step("matplotlib", async () => {
    await runCell(2, cells[2]);
    const img = cell(2).locator(".jp-OutputArea img");
    await img.waitFor();
    const src = await img.getAttribute("src");
    expect(src.startsWith("data:image/png"), `plot is ${src.slice(0, 40)}`);
    const width = await img.evaluate((el) => el.naturalWidth);
    expect(width > 100, `plot image is ${width} px wide`);
    return `png, ${width} px wide`;
  });

  await step("ipywidgets", async () => {
    await runCell(3, cells[3]);
    const slider = cell(3).locator(".widget-slider");
    await slider.waitFor();
    const readout = slider.locator(".widget-readout");
    expect((await readout.innerText()).trim() === "7", "slider does not show 7");
    // Moving the slider in the page must reach the kernel over the comm.
    await slider.locator(".noUi-handle").focus();
    await page.keyboard.press("ArrowRight");
    await page.locator(".widget-slider .widget-readout", { hasText: "8" }).waitFor();
    await runCell(4, 'print("slider value:", slider.value)');
    const out = await outputText(4);
    expect(out.includes("slider value: 8"), `kernel sees ${JSON.stringify(out)}`);
    await shot("02-print-plot-widget");
    return out.trim();
  });

  await step("notebookos-magic", async () => {
    await runCell(5, cells[4]);
    const out = await outputText(5);
    for (const line of ["replica 1: talks to Jupyter", "Last cell: [", "GPU grant: "]) {
      expect(out.includes(line), `%notebookos shows no ${JSON.stringify(line)}:\n${out}`);
    }
    kernelPid = pidOf(out);
    await cell(5).scrollIntoViewIfNeeded();
    await shot("03-notebookos-magic");
    return out;
  });

  await step("interrupt", async () => {
    await runCell(6, "import time\ntime.sleep(600)", { wait: false });
    await kernel("busy");
    // Let the cell get into the sleep before interrupting it.
    await cell(6).locator(".jp-InputPrompt", { hasText: "[*]" }).waitFor();
    await notebook().locator("[data-command='notebook:interrupt-kernel']").click();
    await finished(6);
    const out = await outputText(6);
    expect(out.includes("KeyboardInterrupt"), `interrupted cell shows ${JSON.stringify(out)}`);
    await kernel("idle");
    await shot("04-interrupted");
    return out.trim().split("\n").slice(-1)[0];
  });

  await step("restart", async () => {
    // The kernel is idle before the restart too: wait for the restart itself.
    await page.evaluate(() => {
      const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
      k.statusChanged.connect((_, status) => {
        if (status === "restarting") window.e2eRestarting = true;
      });
    });
    await notebook().locator("[data-command='notebook:restart-kernel']").click();
    await page.locator(".jp-Dialog .jp-mod-accept").click();
    await page.waitForFunction(() => window.e2eRestarting === true, null, { timeout: STARTUP_MS });
    await kernel("idle");
    // The new kernel has a fresh namespace and is a new process.
    await runCell(7, "print('slider' in dir())\n%notebookos");
    const out = await outputText(7);
    expect(out.startsWith("False"), `after restart: ${JSON.stringify(out)}`);
    const pid = pidOf(out);
    expect(pid !== kernelPid, `kernel pid ${pid} is unchanged by the restart`);
    await shot("05-restarted");
    return `pid ${kernelPid} -> ${pid}`;
  });

  await step("notebook7", async () => {
    await page.goto(`${JUPYTER_URL}/notebooks/frontends.ipynb`);
    await kernel("idle");
    const name = await notebook().locator(".jp-Toolbar-kernelName").innerText();
    expect(name.trim() === KERNEL, `Notebook 7 shows kernel ${JSON.stringify(name)}`);
    await page.locator(".lm-MenuBar").getByText("Run", { exact: true }).click();
    await page.locator(".lm-Menu").getByText("Run All Cells", { exact: true }).click();
    const last = notebook().locator(".jp-Notebook .jp-Cell").last();
    await last.locator(".jp-InputPrompt").filter({ hasText: /\[\d+\]/ }).waitFor({ timeout: CELL_MS });
    const out = await last.locator(".jp-OutputArea").innerText();
    expect(out.includes("replica 1: talks to Jupyter"), `last cell shows ${JSON.stringify(out)}`);
    await notebook().locator(".widget-slider").waitFor();
    await notebook().locator(".jp-OutputArea img").waitFor();
    await last.scrollIntoViewIfNeeded();
    await shot("06-notebook7");
  });
} finally {
  await context.close();
  writeFileSync(join(E2E_OUT, "results.json"), JSON.stringify(results, null, 2));
}

for (const r of results) console.log(`${r.ok ? "ok  " : "FAIL"} ${r.name}${r.ok ? "" : `\n${r.detail}`}`);
process.exit(results.length && results.every((r) => r.ok) ? 0 : 1);
