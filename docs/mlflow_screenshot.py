"""Screenshot of a sweep in the MLflow UI, grouped by cell (the README's picture), taken with headless Chromium.

    python docs/mlflow_screenshot.py --url http://127.0.0.1:5000 --experiment-id 1 --out docs/mlflow-runs-by-cell.png

Opens the runs table of the experiment filtered to completed trials, sets the page's saved view (group by the
`cell` tag; columns val_avg_acc, test_avg_acc, test_forgetting, tuned.alpha, status) the way the UI stores it
in the browser, reloads and captures the page over Chromium's DevTools protocol (aiohttp's websocket client).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import aiohttp

TRIALS = "tags.role = 'trial' and tags.status = 'completed'"
VIEW = {  # the MLflow 3.17 experiment page's saved state (local storage)
    "searchFilter": TRIALS, "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
    "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
    "selectedColumns": ["metrics.`val_avg_acc`", "metrics.`test_avg_acc`", "metrics.`test_forgetting`", "params.`tuned.alpha`", "tags.`status`"],
    "columnOrder": [], "columnWidths": {}, "runsExpanded": {}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
    "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
    "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
    "groupBy": {"aggregateFunction": "max", "groupByKeys": [{"mode": "tag", "groupByData": "cell"}]},
    "groupsExpanded": {}, "autoRefreshEnabled": False,
    "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
}


async def capture(debugger: str, url: str, experiment_id: str, out: str) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(debugger, max_msg_size=0)
        counter = 0

        async def call(method: str, **params):
            nonlocal counter
            counter += 1
            await ws.send_json({"id": counter, "method": method, "params": params})
            while True:
                message = await ws.receive_json()
                if message.get("id") == counter:
                    return message.get("result", message)

        async def evaluate(expression: str):
            result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
            return result.get("result", {}).get("value")

        await call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=url)
        await asyncio.sleep(5)
        key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState'
        await evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(VIEW))})")
        await call("Page.reload")
        await asyncio.sleep(8)
        # close the assistant side panel, which would cover the table
        await evaluate("[...document.querySelectorAll('button')].find(b => (b.getAttribute('aria-label') || '').toLowerCase().includes('close'))?.click()")
        await asyncio.sleep(2)
        shot = await call("Page.captureScreenshot", format="png")
        with open(out, "wb") as file:
            file.write(base64.b64decode(shot["data"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the MLflow server, e.g. http://127.0.0.1:5000")
    p.add_argument("--experiment-id", required=True)
    p.add_argument("--out", default="docs/mlflow-runs-by-cell.png")
    p.add_argument("--port", type=int, default=9333, help="Chromium's DevTools port")
    args = p.parse_args()
    url = (f"{args.url}/#/experiments/{args.experiment_id}/runs?workflowType=machine_learning"
           f"&searchFilter={urllib.parse.quote(TRIALS)}")
    with tempfile.TemporaryDirectory() as profile:
        chromium = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={args.port}",
             f"--user-data-dir={profile}", "--window-size=1600,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{args.port}/json"))
                    break
                except OSError:
                    time.sleep(0.2)
            page = next(t for t in targets if t["type"] == "page")
            asyncio.run(capture(page["webSocketDebuggerUrl"], url, args.experiment_id, args.out))
        finally:
            chromium.terminate()
            chromium.wait()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
