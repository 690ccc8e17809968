"""The web page end to end: served in-process from a small trained model, driven by chromium;
its uploads (size bound, private folder removed on Ctrl-C) through `python -m distmed.app`."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port, write_image_folder

from distmed import app, inference, predict
from distmed.config import ExperimentConfig
from distmed.data import to_model_input
from distmed.inference import TEST_PREDICTIONS
from distmed.model import build_model
from distmed.modelcard import NOTICE
from distmed.savedmodel import save_model, save_threshold
from distmed.summary import DataSummary, RunSummary
from distmed.task import BinaryTask, task_for

BINARY = BinaryTask(("neg", "pos"))  # class 1 scored, as the binary tests label it

SIZE = 28
CLASSES = ["normal", "pneumonia"]


def _train_tiny_run(root: Path) -> Path:
    """A ResNet-18 whose head is fitted a few steps on dark-vs-bright images, saved as tune does.

    Only the head trains: full backward passes cost seconds on a busy 2-core CI machine.
    """
    images_dir = write_image_folder(root / "images", {c: 8 for c in CLASSES}, size=SIZE)
    paths = sorted(images_dir.rglob("*.png"))
    images = np.stack([inference.decode_file(p, SIZE) for p in paths])
    labels = torch.tensor([CLASSES.index(p.parent.name) for p in paths])
    cfg = ExperimentConfig.model_validate(
        {"data": {"root": "x", "image_size": SIZE}, "model": {"weights": "none"}}
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, len(CLASSES)).eval()
    with torch.no_grad():
        features = torch.nn.Sequential(*list(model.children())[:-1])(
            to_model_input(torch.from_numpy(images))
        ).flatten(1)
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model.fc(features), labels).backward()
        optimizer.step()
    with torch.no_grad():
        probs = torch.softmax(model.fc(features), dim=1).numpy()

    run = root / "run"
    run.mkdir()
    save_model(run / "best_model.pt", model.state_dict(), cfg, task_for(CLASSES), 1, "refit-t1")
    save_threshold(
        run / "best_model.pt",
        {"value": 0.4, "method": "youden", "chosen_on": "out-of-fold predictions",
         "positive_class": CLASSES[1], "num_samples": 16},
    )  # fmt: skip
    np.savez(run / TEST_PREDICTIONS, labels=labels.numpy(), probs=probs)
    test_metrics = BINARY.metrics(labels.numpy(), probs)
    summary = RunSummary(
        name="tiny",
        num_trials=1,
        trials_by_status={"completed": 1},
        data=DataSummary(name="tiny-synthetic", classes=CLASSES, num_images=16),
        best_cv_roc_auc=0.9123,
        best_cv_roc_auc_std=0.0456,
        best_cv_roc_auc_se=0.0789,
        test_metrics={**test_metrics, "num_samples": 16},
    )
    summary.save(run / "summary.json")
    return run


def _predict_csv(model: Path, image: Path, out: Path) -> dict[str, str]:
    assert predict.main(["--model", str(model), str(image), "--output", str(out)]) == 0
    with out.open(newline="") as handle:
        return next(csv.DictReader(handle))


def test_page_predicts_like_the_cli_and_survives_a_broken_upload(tmp_path: Path):
    chromium = shutil.which("chromium")
    if chromium is None:  # dev.sh test installs it; a silent skip would hide the page
        pytest.fail("no chromium on PATH: apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    run = _train_tiny_run(tmp_path)
    good = sorted((tmp_path / "images" / "pneumonia").glob("*.png"))[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    args = app.build_parser().parse_args(
        ["--model", str(run / "best_model.pt"), "--port", str(free_port())]
    )
    server = app.serve(args)  # what `python -m distmed.app` runs, minus blocking
    try:
        expected = _predict_csv(run / "best_model.pt", good, tmp_path / "preds.csv")
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.local_url)
            # Gradio renders the page client-side after its "Loading...": on a busy 2-core CI
            # host that took over playwright's default 5 s once (the card was never absent).
            expect(page.locator("#model-card")).to_contain_text(NOTICE, timeout=30_000)
            expect(page.locator("#model-card .cv-auc")).to_have_text("0.9123 ± 0.0456")
            expect(page.locator("#model-card .cv-se")).to_have_text("0.0789")

            uploads = page.locator("#uploads input[type=file]")
            uploads.set_input_files(str(good))
            result = page.locator(f".distmed-result[data-file='{good.name}']")
            expect(result).to_be_visible(timeout=30_000)
            assert result.locator(".predicted").inner_text() == expected["predicted_class"]
            assert result.locator(".decision").inner_text() == expected["label_at_threshold"]
            for name in CLASSES:
                shown = float(result.locator(f"tr[data-class='{name}'] .value").inner_text())
                assert shown == pytest.approx(float(expected[f"prob_{name}"]), abs=5.1e-5)
            expect(result.locator("img.gradcam")).to_be_visible()

            uploads.set_input_files(str(broken))
            error = page.locator(".distmed-error[data-file='broken.png']")
            expect(error).to_contain_text("could not read this file as an image", timeout=30_000)
            expect(result).to_be_visible()  # still serving: the good image was predicted again
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            browser.close()
        assert (tmp_path / "app.png").stat().st_size > 10_000
    finally:
        server.close()


def test_app_without_a_model_is_one_line(tmp_path: Path, capsys):
    assert app.main(["--model", str(tmp_path / "no.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: --model")


def _wait_until_served(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s  # a bound, not a timing assertion
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the app did not serve {url} within {timeout_s} s")


def _ctrl_c_as_in_a_terminal() -> None:
    """In the app's process before it starts: SIGINT as a terminal delivers it. A suite
    started in the background (`cmd &` in a script) ignores SIGINT, every child inherits
    that, and Python then installs no KeyboardInterrupt handler: the app never saw the
    test's Ctrl-C (its 120 s timeouts in background CI runs, with no shutdown line)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.serial  # the app's Ctrl-C shutdown within its bound needs the cores
def test_uploads_are_bounded_private_and_removed_on_ctrl_c(tmp_path: Path):
    """`python -m distmed.app` as a user runs it: a file over --max-upload-mb is refused
    (HTTP 413) and not kept; an accepted one lands in the app's own folder under $TMPDIR,
    which is gone once Ctrl-C stopped the app (Gradio's default folder is never emptied)."""
    run = _train_tiny_run(tmp_path)
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distmed.app", "--model", str(run / "best_model.pt"),
         "--port", str(port), "--max-upload-mb", "1"],
        env={**os.environ, "TMPDIR": str(temp), "GRADIO_TEMP_DIR": ""},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(url, proc)
        (folder,) = temp.glob("distmed-app-*")
        upload = f"{url}gradio_api/upload"
        image = sorted((tmp_path / "images" / "normal").glob("*.png"))[0]
        small = httpx.post(upload, files={"files": (image.name, image.read_bytes())})
        assert small.status_code == 200, small.text
        (stored,) = small.json()
        assert Path(stored).is_file() and folder in Path(stored).parents

        big = httpx.post(upload, files={"files": ("big.dcm", b"\0" * (2 * 2**20))})
        assert big.status_code == 413, big.text
        assert not [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 2**20]

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        # communicate, not wait: an app whose output fills the pipe while nobody reads it
        # blocks on its write and never exits (a 120 s timeout seen once in CI).
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(temp.iterdir()) == []  # the app's folder and every upload in it


def test_max_upload_mb_must_be_a_positive_whole_number(capsys):
    for bad in ("0", "-5", "1.5", "lots"):
        with pytest.raises(SystemExit) as exc:
            app.build_parser().parse_args(["--model", "m.pt", "--max-upload-mb", bad])
        assert exc.value.code == 2
        assert "--max-upload-mb" in capsys.readouterr().err
    args = app.build_parser().parse_args(["--model", "m.pt"])
    assert args.max_upload_mb == app.MAX_UPLOAD_MB == 100


def test_a_server_that_does_not_stop_lets_the_app_exit_after_the_bound():
    """Gradio's close can wait for ever on a connection that never closes; the app waits
    for it only so long (then exits: its server threads are daemons)."""
    import threading

    from distmed.app import close_page

    release = threading.Event()

    class StuckPage:
        def close(self) -> None:
            release.wait()  # a server thread that never finishes

    class QuickPage:
        closed = False

        def close(self) -> None:
            QuickPage.closed = True

    assert close_page(StuckPage(), within_s=0.2) is False
    release.set()
    assert close_page(QuickPage(), within_s=5) is True and QuickPage.closed
