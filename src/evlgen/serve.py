"""`evlgen serve`: a web page to caption an uploaded image or short video, or to ask a question about it.

Built with Gradio (the `serve` extra). Every upload goes through `validate_upload` first, a pure function
of the file and the `Limits` (size, pixels, video length), so a bad or oversized file is answered with a
clear message in the page and the server keeps serving. Captions and answers come from `evlgen.infer`,
the same code as `evlgen caption|vqa`; generation stops at the request time limit. The server binds
127.0.0.1 unless told otherwise, runs one request at a time (a model is not thread-safe) and queues a
bounded number of others.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from evlgen.data.transforms import ImageLoadError, load_image
from evlgen.infer import is_video

log = logging.getLogger(__name__)

PREVIEW_SIDE = 384  # the preview is a thumbnail: the page never receives the full-size upload back


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_bytes: int = 20_000_000
    max_pixels: int = 25_000_000  # per image or video frame
    max_video_seconds: float = 60.0
    max_video_frames: int = 3000
    timeout_s: float = 60.0  # wall time of one request
    max_question_chars: int = 300

    def describe(self) -> str:
        return (
            f"files up to {self.max_bytes / 1e6:g} MB and {self.max_pixels / 1e6:g} megapixels, videos "
            f"up to {self.max_video_seconds:g} s ({self.max_video_frames} frames), "
            f"{self.timeout_s:g} s per request"
        )


class UploadError(ValueError):
    """An upload or question the demo refuses; the message is shown to the user as it is."""


@dataclass(frozen=True)
class Upload:
    path: str
    name: str  # the file name the user sees (uploads arrive under temporary names)
    image: Image.Image | None  # decoded, upright RGB; None for a video
    seconds: float | None = None  # video duration, when the container states it
    frames: int | None = None


def validate_upload(path: str | os.PathLike[str] | None, limits: Limits, name: str | None = None) -> Upload:
    """Check an uploaded file against the limits; images are decoded here (once), videos only probed.

    Raises UploadError with a message meant for the person who uploaded the file.
    """
    if path is None:
        raise UploadError("Upload an image or a short video first.")
    p = Path(path)
    name = name or p.name
    if not p.is_file():
        raise UploadError(f"{name}: the upload did not arrive; please try again.")
    size = p.stat().st_size
    if size == 0:
        raise UploadError(f"{name}: the file is empty.")
    if size > limits.max_bytes:
        raise UploadError(
            f"{name}: the file is {size / 1e6:.1f} MB; this demo takes files up to "
            f"{limits.max_bytes / 1e6:g} MB."
        )
    if is_video(p):
        return _validate_video(p, name, limits)
    try:
        image = load_image(p, limits.max_pixels, name=name)
    except ImageLoadError as e:
        if "pixel limit" in str(e):
            raise UploadError(f"{e}. Downscale the image and try again.") from None
        # The decoder's own words name temporary paths; the exception type is what helps.
        cause = type(e.__cause__).__name__ if e.__cause__ is not None else "unreadable"
        raise UploadError(
            f"{name}: not an image this demo can read ({cause}). Upload a JPEG, PNG, WebP, GIF or BMP "
            "image, or an MP4/WebM/AVI/MOV video."
        ) from None
    return Upload(path=str(p), name=name, image=image)


def _validate_video(p: Path, name: str, limits: Limits) -> Upload:
    from evlgen.data.video import video_length

    try:
        seconds, frames = video_length(str(p), limits.max_pixels, limits.max_video_frames)
    except ImportError:
        raise UploadError(
            "this server cannot read videos (PyAV is not installed): upload an image."
        ) from None
    except ImageLoadError as e:
        detail = str(e).removeprefix(str(p) + ": ")
        raise UploadError(f"{name}: not a video this demo can read ({detail}).") from None
    if seconds is not None and seconds > limits.max_video_seconds:
        raise UploadError(
            f"{name}: the video is {seconds:.1f} s long; this demo takes videos up to "
            f"{limits.max_video_seconds:g} s. Trim it and try again."
        )
    if frames > limits.max_video_frames:
        raise UploadError(
            f"{name}: the video has more than {limits.max_video_frames} frames, the most this demo takes."
        )
    return Upload(path=str(p), name=name, image=None, seconds=seconds, frames=frames)


def validate_question(question: str | None, limits: Limits) -> str:
    q = (question or "").strip()
    if not q:
        raise UploadError("Type a question first (or press Caption).")
    if len(q) > limits.max_question_chars:
        raise UploadError(
            f"The question is {len(q)} characters long; the limit is {limits.max_question_chars}."
        )
    return q


def preview(upload: Upload, frames: int, max_pixels: int) -> Image.Image:
    """A thumbnail of what the model sees: the image, or the clip's sampled frames side by side."""
    if upload.image is not None:
        shown = [upload.image]
    else:
        from evlgen.data.video import load_video_frames

        shown = load_video_frames(upload.path, frames, train=False, generator=None, max_pixels=max_pixels)
    thumbs = []
    for im in shown:
        im = im.copy()
        im.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        thumbs.append(im)
    strip = Image.new("RGB", (sum(t.width for t in thumbs), max(t.height for t in thumbs)), "white")
    x = 0
    for t in thumbs:
        strip.paste(t, (x, 0))
        x += t.width
    return strip


class RequestTimeout(UploadError):
    pass


class Predictor:
    """Validation + inference for one request at a time (the page's handlers call this)."""

    def __init__(self, vlm: Any, limits: Limits) -> None:
        self.vlm = vlm
        self.limits = limits

    def _run(self, path: str | None, question: str | None, name: str | None) -> tuple[str, Image.Image]:
        start = time.monotonic()
        q = None if question is None else validate_question(question, self.limits)
        upload = validate_upload(path, self.limits, name)
        item = upload.image if upload.image is not None else upload.path
        left = self.limits.timeout_s - (time.monotonic() - start)
        if left <= 0:
            raise RequestTimeout(
                f"reading {upload.name} took longer than the {self.limits.timeout_s:g} s limit."
            )
        try:
            if q is None:
                text = self.vlm.caption([item], max_time=left)[0]
            else:
                text = self.vlm.answer([item], [q], max_time=left)[0]
        except ImageLoadError as e:  # a video that probed fine but fails to decode later
            raise UploadError(f"{upload.name}: could not be decoded ({e}).") from None
        elapsed = time.monotonic() - start
        if elapsed > self.limits.timeout_s:
            raise RequestTimeout(
                f"the model took longer than the {self.limits.timeout_s:g} s limit for one request; "
                "try a smaller file or a shorter video."
            )
        log.info("%s %s in %.2f s: %s", "answered" if q else "captioned", upload.name, elapsed, text)
        return text, preview(upload, self.vlm.config.data.frames, self.limits.max_pixels)

    def caption(self, path: str | None, name: str | None = None) -> tuple[str, Image.Image]:
        return self._run(path, None, name)

    def answer(self, path: str | None, question: str, name: str | None = None) -> tuple[str, Image.Image]:
        return self._run(path, question, name)


def _import_gradio() -> Any:
    # Gradio's usage analytics would phone home; this demo is meant to run offline and privately.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError('the web demo needs Gradio: pip install "evlgen[serve]"') from e
    return gr


def build_app(predictor: Predictor, title: str = "evlgen") -> Any:
    """The Gradio Blocks page: file, optional question, Caption / Answer buttons, result and preview."""
    gr = _import_gradio()

    def handle(call: Any, *args: Any) -> tuple[str, Image.Image]:
        try:
            return call(*args)
        except UploadError as e:
            raise gr.Error(str(e), duration=None, print_exception=False) from None
        except Exception as e:  # never let one bad request take the page down
            log.exception("request failed")
            raise gr.Error(f"the request failed: {type(e).__name__}: {e}", duration=None) from None

    def caption(file: str | None) -> tuple[str, Image.Image]:
        return handle(predictor.caption, file, _shown_name(file))

    def answer(file: str | None, question: str) -> tuple[str, Image.Image]:
        return handle(predictor.answer, file, question, _shown_name(file))

    # Uploads are kept in Gradio's cache; files older than an hour are removed every 10 minutes.
    with gr.Blocks(title=f"{title} · evlgen", delete_cache=(600, 3600)) as app:
        gr.Markdown(
            f"## {title}\nUpload an image or a short video, then press **Caption**, or type a question and "
            f"press **Answer**. Limits: {predictor.limits.describe()}."
        )
        with gr.Row():
            with gr.Column():
                file = gr.File(
                    label="Image or video", file_types=["image", "video"], type="filepath", elem_id="upload"
                )
                question = gr.Textbox(
                    label="Question (optional)",
                    placeholder="what colour is the shape on the left?",
                    elem_id="question",
                )
                with gr.Row():
                    cap = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    ask = gr.Button("Answer", elem_id="answer-button")
            with gr.Column():
                result = gr.Textbox(label="Result", interactive=False, elem_id="result")
                seen = gr.Image(label="What the model sees", interactive=False, type="pil", elem_id="preview")

        def clear() -> tuple[str, None]:
            return "", None

        # Clear first, so an error never sits next to the previous file's result.
        cap.click(clear, None, [result, seen], queue=False).then(caption, [file], [result, seen])
        ask.click(clear, None, [result, seen], queue=False).then(answer, [file, question], [result, seen])
        question.submit(clear, None, [result, seen], queue=False).then(
            answer, [file, question], [result, seen]
        )
    return app


def _shown_name(path: str | None) -> str | None:
    return None if path is None else Path(path).name


def serve(
    checkpoint: str,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    limits: Limits | None = None,
    queue_size: int = 16,
    block: bool = True,
) -> Any:
    """Load a model (folder or hub repo id) and serve the page; returns the Gradio app when not blocking."""
    import torch

    import evlgen

    limits = limits or Limits()
    gr = _import_gradio()
    vlm = evlgen.load(checkpoint).eval()
    if torch.cuda.is_available():
        vlm = vlm.to("cuda")
    app = build_app(Predictor(vlm, limits), title=vlm.config.name)
    app.queue(default_concurrency_limit=1, max_size=queue_size)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this machine can use the demo", host)
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=limits.max_bytes,
        share=False,
        show_error=True,
        prevent_thread_lock=not block,
        footer_links=[],
        # System fonts: the default theme would fetch web fonts, which an offline machine cannot.
        theme=gr.themes.Default(
            font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
        ),
    )
    return app
