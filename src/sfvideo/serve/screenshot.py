"""A screenshot of a running ``sfvideo serve`` page, taken with headless Chromium (docs/serve.png is one).

    sfvideo serve --port 8765 &
    python -m sfvideo.serve.screenshot http://127.0.0.1:8765/ docs/serve.png \\
        --prompt "a red circle moving left on a dark background" \\
        --switch "a blue square moving up on a light background"

Types the prompt, lets the stream run for ``--seconds``, optionally switches the prompt and lets it run again,
then writes the PNG (temporary file + rename). Needs Debian's chromium and chromium-driver (``make browser``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sfvideo.serve.screenshot", description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("out", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--switch", default=None, help="A second prompt, typed while the first plays.")
    p.add_argument("--seconds", type=float, default=4.0, help="Seconds of streaming before (each) capture step.")
    p.add_argument("--size", default="1100,760", help="Window size W,H.")
    args = p.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        raise SystemExit("needs Debian's chromium and chromium-driver (make browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={args.size}", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(args.url)
        deadline = time.monotonic() + 30
        while "Ready" not in driver.find_element(By.ID, "status").text:
            if time.monotonic() > deadline:
                raise SystemExit(f"the page at {args.url} did not connect")
            time.sleep(0.1)
        ActionChains(driver).send_keys(args.prompt, Keys.ENTER).perform()
        time.sleep(args.seconds)
        if args.switch:
            ActionChains(driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys(
                args.switch, Keys.ENTER).perform()
            time.sleep(args.seconds)
        tmp = args.out.with_name(f".{args.out.name}.partial")
        tmp.write_bytes(driver.get_screenshot_as_png())
        os.replace(tmp, args.out)
    finally:
        driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
