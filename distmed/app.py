"""`python -m distmed.app --model best_model.pt`: a local web page that predicts uploaded images.

Per image: the predicted class, every class's probability as bars, the decision at the saved
threshold (binary) and a Grad-CAM overlay, beside the model card. A multi-label model shows a
bar per finding with its threshold and decision, and Grad-CAM for the finding chosen in a
menu (default: each image's most probable finding). Predictions go through
`distmed.predict`'s own functions, so the page and the CSV agree. Needs `distmed[app]`.

Uploads are bounded (`--max-upload-mb`, per file) and kept in a private temporary folder
that is removed when the page stops (Ctrl-C, SIGTERM): Gradio's own default,
`$TMPDIR/gradio`, is shared and never emptied.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distmed.cli import (
    add_debug_option,
    add_model_option,
    bounded,
    model_path,
    run_command,
)
from distmed.errors import UserError

if TYPE_CHECKING:  # for annotations; imported where used, after parsing
    import numpy as np
    import torch
    from PIL import Image

    from distmed.data import DecodeSettings
    from distmed.inference import Prediction
    from distmed.savedmodel import SavedModel

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BATCH_SIZE = 16
# Per uploaded file. A DICOM image is well under this (a CT slice ~0.5 MB, a mammogram
# ~50 MB); a larger upload is refused (HTTP 413) before it fills the disk.
# Seconds the server gets to stop after Ctrl-C before the app exits without it.
CLOSE_TIMEOUT_S = 15.0
MAX_UPLOAD_MB = 100
MAX_UPLOAD_LIMIT_MB = 1_000_000  # --max-upload-mb: a terabyte, past any image
CSS = """
.distmed-result { border: 1px solid #ccc; border-radius: 8px; padding: 12px; margin: 8px 0; }
.distmed-result .bar { background: #eee; width: 220px; height: 14px; display: inline-block; }
.distmed-result .bar span { background: #3b82f6; height: 14px; display: block; }
.distmed-result img { max-width: 320px; }
.distmed-error { color: #b91c1c; }
.notice { color: #b45309; }
"""

EPILOG = """The page has no login: keep the default --host 127.0.0.1 unless the network is trusted.

example:
  python -m distmed.app --model runs/pneu/best_model.pt     # then open http://127.0.0.1:7860
"""


@dataclass(frozen=True)
class Predictor:
    """The loaded model and what turning an upload into a displayed result needs."""

    model: torch.nn.Module
    saved: SavedModel
    threshold: float | None

    @property
    def options(self) -> DecodeSettings:
        """The decoding the model was trained with (intensity, resize mode, size)."""
        return self.saved.preprocessing.decode_settings()

    @property
    def multilabel(self) -> bool:
        return self.saved.multilabel is not None

    def predict(
        self, paths: list[Path], finding: int | None = None
    ) -> list[tuple[Prediction, Image.Image | None]]:
        """Each file's prediction (as `distmed.predict` makes it) and its Grad-CAM overlay
        (a multi-label model: for output `finding`, else each image's most probable one)."""
        from distmed.inference import choose_device, gradcam_pictures, predict_batches

        results = []
        options = self.options
        device = choose_device()
        task = self.saved.task
        for batch in predict_batches(self.model, paths, options, BATCH_SIZE, device, task):
            readable = [r for r in batch if r.probs is not None]
            pictures = iter(
                gradcam_pictures(self.model, readable, options, finding) if readable else []
            )
            results += [(r, next(pictures).picture if r.probs is not None else None) for r in batch]
        return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distmed.app",
        description="Serve a local web page that predicts uploaded images with a best_model.pt.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument(
        "--port", type=bounded(int, 1, 65535, "7860"), default=7860, help="port to serve on (7860)"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=bounded(int, 1, MAX_UPLOAD_LIMIT_MB, str(MAX_UPLOAD_MB)),
        default=MAX_UPLOAD_MB,
        help=f"largest file accepted, in MB (2^20 bytes) per file ({MAX_UPLOAD_MB}); a larger "
        "upload is refused",
    )
    add_debug_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, _run)


def _run(args: argparse.Namespace) -> int:
    with private_upload_folder():
        page = serve(args)
        previous = signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C
        try:
            page.block_thread()  # until Ctrl-C (which it catches)
        finally:
            signal.signal(signal.SIGTERM, previous)
            close_page(page)
    return 0


def close_page(page: Any, within_s: float = CLOSE_TIMEOUT_S) -> bool:
    """Stop serving `page`, waiting at most `within_s` seconds; False when it did not stop.

    Why bounded: Gradio's `close` waits for its server thread, which can wait for ever on a
    connection that never closes: the app once did not exit 120 s after a Ctrl-C in CI. Its
    server threads are daemons, so the process still exits once the uploads are removed.
    """
    closer = threading.Thread(target=page.close, name="distmed-app-close", daemon=True)
    closer.start()
    closer.join(within_s)
    if closer.is_alive():
        print(
            f"the web server did not stop within {within_s:g} s; exiting without it",
            file=sys.stderr,
            flush=True,
        )
        return False
    return True


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def private_upload_folder() -> Iterator[Path]:
    """A new temporary folder for Gradio's uploads while open (GRADIO_TEMP_DIR), removed
    with everything uploaded into it on the way out (also on Ctrl-C or an error).

    Pages built inside it keep their uploads there: Gradio reads GRADIO_TEMP_DIR when a
    page's components are made and when it is launched.
    """
    folder = Path(tempfile.mkdtemp(prefix="distmed-app-"))
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


def serve(args: argparse.Namespace) -> Any:
    """Load the model, build the page and start serving it; returns the running Blocks."""
    from distmed.inference import choose_device, load_inference_model, saved_threshold
    from distmed.modelcard import model_card

    path = model_path(args)
    gr = _import_gradio()
    model, saved = load_inference_model(path, args.ensemble)
    predictor = Predictor(model.to(choose_device()), saved, saved_threshold(saved))
    page = build_page(gr, predictor, model_card(path, saved))
    if args.host not in LOCAL_HOSTS:
        print(
            f"warning: serving on {args.host}: anyone who can reach this address can upload "
            "images and see predictions (there is no login)",
            file=sys.stderr,
        )
    # A system font stack: the default theme would fetch web fonts from the internet.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"])
    page.launch(
        server_name=args.host,
        server_port=args.port,
        theme=theme,
        css=CSS,
        share=False,
        prevent_thread_lock=True,
        max_file_size=args.max_upload_mb * 2**20,  # bytes; Gradio answers 413 above it
    )
    return page


def _import_gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a clinic
    try:
        import gradio
    except ImportError as exc:
        raise UserError("the web page needs gradio: pip install 'distmed[app]'") from exc
    return gradio


MOST_PROBABLE = "(most probable finding)"  # the Grad-CAM menu's default entry


def build_page(gr: Any, predictor: Predictor, card: str) -> Any:
    """The Blocks page: uploads and results on the left, the model card on the right; a
    multi-label model adds a menu choosing the finding Grad-CAM explains."""
    from distmed.data.decode import DICOM_EXTENSIONS, IMAGE_EXTENSIONS
    from distmed.modelcard import NOTICE

    with gr.Blocks(title="distmed", analytics_enabled=False) as page:
        gr.Markdown(f"## distmed: predict medical images\n**{NOTICE}**")
        with gr.Row():
            with gr.Column(scale=3):
                files = gr.File(
                    label="Images (PNG, JPEG, TIFF, BMP or DICOM; several at once)",
                    file_count="multiple",
                    file_types=[*IMAGE_EXTENSIONS, *DICOM_EXTENSIONS],  # what the decoder reads
                    elem_id="uploads",
                )
                choices = [MOST_PROBABLE, *predictor.saved.class_names]
                finding = gr.Dropdown(
                    choices,
                    value=MOST_PROBABLE,
                    label="Grad-CAM for finding",
                    elem_id="finding",
                    visible=predictor.multilabel,
                )
                results = gr.HTML(elem_id="results")
            with gr.Column(scale=2):
                gr.HTML(card, elem_id="model-card")

        def render(paths: Sequence[Any] | None, chosen: str | None) -> str:
            chosen = chosen or MOST_PROBABLE
            target = None if chosen == MOST_PROBABLE else choices.index(chosen) - 1
            return render_results(predictor, predictor.predict(_paths(paths), target), chosen)

        # On every change (upload, removal, clear), so results always match the listed files.
        # One at a time: Grad-CAM hooks the shared model, and 2 requests would cross them.
        for trigger in (files, finding) if predictor.multilabel else (files,):
            trigger.change(render, inputs=[files, finding], outputs=results, concurrency_limit=1)
    return page


def _paths(uploaded: Sequence[Any] | None) -> list[Path]:
    """Gradio hands over file paths (str) or objects with a `.name` path, by version."""
    return [Path(getattr(item, "name", item)) for item in uploaded or []]


def render_results(
    predictor: Predictor,
    results: list[tuple[Prediction, Image.Image | None]],
    finding: str = MOST_PROBABLE,
) -> str:
    """Each file's result as HTML; `finding`: what a multi-label model's Grad-CAM shows."""
    return "".join(
        _error_html(r)
        if r.probs is None
        else (
            _findings_html(predictor, r, picture, finding)
            if predictor.multilabel
            else _result_html(predictor, r, picture)
        )
        for r, picture in results
    )


def _error_html(result: Prediction) -> str:
    name = html.escape(result.path.name)
    # The upload's temporary path means nothing to the person who dropped the file.
    reason = html.escape(result.error.replace(str(result.path), result.path.name))
    return (
        f"<div class='distmed-result distmed-error' data-file='{name}'>"
        f"<b>{name}</b>: could not read this file as an image ({reason})</div>"
    )


def _result_html(predictor: Predictor, result: Prediction, picture: Image.Image | None) -> str:
    names = predictor.saved.class_names
    probs = result.probs
    assert probs is not None
    rows = "".join(
        f"<tr class='prob' data-class='{html.escape(n)}'><td>{html.escape(n)}</td>"
        f"<td><div class='bar'><span style='width:{100 * p:.1f}%'></span></div></td>"
        f"<td class='value'>{p:.4f}</td></tr>"
        for n, p in zip(names, probs, strict=True)
    )
    name = html.escape(result.path.name)
    predicted = html.escape(names[int(probs.argmax())])
    return (
        f"<div class='distmed-result' data-file='{name}'><b>{name}</b>"
        f"<p>Predicted class: <b class='predicted'>{predicted}</b></p>"
        f"<table>{rows}</table>{_decision_html(predictor, probs)}"
        f"<p>Grad-CAM (predicted class):</p>{_image_html(picture)}</div>"
    )


def _findings_html(
    predictor: Predictor, result: Prediction, picture: Image.Image | None, finding: str
) -> str:
    """A multi-label result: a bar per finding, its threshold and decision (as the CSV's
    `label_<finding>`), the findings present, and Grad-CAM for `finding`."""
    from distmed.inference import saved_finding_thresholds
    from distmed.task.multilabel import MultilabelTask

    saved, probs, task = predictor.saved, result.probs, predictor.saved.task
    assert probs is not None and isinstance(task, MultilabelTask)
    names = saved.class_names
    cuts = task.thresholds_of(saved_finding_thresholds(saved))
    present = task.decide(probs[None, :], cuts)[0]
    rows = "".join(
        f"<tr class='prob' data-class='{html.escape(n)}'><td>{html.escape(n)}</td>"
        f"<td><div class='bar'><span style='width:{100 * p:.1f}%'></span></div></td>"
        f"<td class='value'>{p:.4f}</td><td class='threshold'>{cut:.4f}</td>"
        f"<td class='decision'>{'present' if d else 'absent'}</td></tr>"
        for n, p, cut, d in zip(names, probs, cuts, present, strict=True)
    )
    found = ", ".join(n for n, d in zip(names, present, strict=True) if d) or "none"
    explained = names[int(probs.argmax())] if finding == MOST_PROBABLE else finding
    name = html.escape(result.path.name)
    source = "saved per finding" if saved.finding_thresholds else "0.5 each, none saved"
    return (
        f"<div class='distmed-result' data-file='{name}'><b>{name}</b>"
        f"<p>Findings present: <b class='predicted'>{html.escape(found)}</b></p>"
        "<table><tr><th>finding</th><th></th><th>probability</th>"
        f"<th>threshold ({source})</th><th>decision</th></tr>{rows}</table>"
        f"<p>Grad-CAM (finding <span class='cam-finding'>{html.escape(explained)}</span>):</p>"
        f"{_image_html(picture)}</div>"
    )


def _decision_html(predictor: Predictor, probs: np.ndarray) -> str:
    from distmed.inference import label_at_threshold

    saved = predictor.saved
    if saved.positive_class is None:  # multi-class: decisions are the argmax shown above
        return ""
    if predictor.threshold is None:
        return "<p>No operating threshold saved with the model (its search chose none).</p>"
    positive = saved.positive_class
    label = label_at_threshold(probs, saved, predictor.threshold)
    return (
        f"<p>At the saved threshold {predictor.threshold:.4f} on P({html.escape(positive)}): "
        f"<b class='decision'>{html.escape(label)}</b></p>"
    )


def _image_html(picture: Image.Image | None) -> str:
    if picture is None:
        return ""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"<img class='gradcam' alt='Grad-CAM overlay' src='data:image/png;base64,{data}'>"


if __name__ == "__main__":
    sys.exit(main())
