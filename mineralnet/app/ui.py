"""`mineralnet app MODEL [--host 127.0.0.1] [--port 7860]`: the Gradio page over `mineralnet.app.page`.

Uploads live only in a temporary folder made for this server (GRADIO_TEMP_DIR) and removed when it
stops (Ctrl-C or SIGTERM); each is capped in size (--max-mb) and a request in photos (--max-photos).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager

from mineralnet.app.page import MAX_PHOTOS, Page, answers_html, card_markdown
from mineralnet.errors import MineralNetError

MAX_MB = 25
INSTALL = 'pip install "mineralnet[app]"  (or pip install gradio)'


def require_gradio():
    try:
        import gradio
    except ImportError:
        raise MineralNetError(f"`mineralnet app` needs Gradio, which is not installed: {INSTALL}") from None
    return gradio


def build(page: Page, *, max_photos: int = MAX_PHOTOS, coverage: float = 0.9):
    """The gr.Blocks page: model card, photo drop (several files) and camera, coverage, answers."""
    gr = require_gradio()

    def respond(files, camera, cov):
        paths = [os.fspath(f) for f in (files or [])] + ([os.fspath(camera)] if camera else [])
        cov = float(cov) if page.calibrated else None
        return answers_html(page.answer_all(paths, coverage=cov, max_photos=max_photos), cov)

    with gr.Blocks(title="MineralNet", analytics_enabled=False, delete_cache=(300, 600)) as demo:
        gr.Markdown("## MineralNet: which mineral is this?\n\n" + card_markdown(page.card), elem_id="card")
        with gr.Row():
            files = gr.File(label=f"Photos (up to {max_photos} at a time)", file_count="multiple",
                            type="filepath", elem_id="photos")
            camera = gr.Image(label="or take one with the camera (where the browser allows)", sources=["webcam"],
                              type="filepath", elem_id="camera")
        cov = gr.Slider(0.5, 0.99, value=coverage, step=0.01, visible=page.calibrated, elem_id="coverage",
                        label="coverage: the candidate set holds the true mineral this often")
        out = gr.HTML(answers_html([]), elem_id="answers")
        files.change(respond, [files, camera, cov], out)
        camera.change(respond, [files, camera, cov], out)
        cov.release(respond, [files, camera, cov], out)
    return demo


@contextmanager
def upload_folder():
    """A fresh temporary folder as Gradio's upload/cache folder for the block; removed afterwards, also
    when the server is stopped with SIGTERM (turned into KeyboardInterrupt, which Gradio shuts down on)."""
    folder = tempfile.mkdtemp(prefix="mineralnet-app-")
    saved = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = folder

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old_handler = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield folder
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        if saved is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved
        shutil.rmtree(folder, ignore_errors=True)


def serve(model, *, host: str = "127.0.0.1", port: int = 7860, max_photos: int = MAX_PHOTOS,
          max_mb: float = MAX_MB, device: str | None = None) -> None:
    """Open the model, then serve the page until interrupted."""
    require_gradio()
    page = Page(model, device=device)  # a wrong model fails here, before any server starts
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool
    with upload_folder():
        demo = build(page, max_photos=max_photos)  # Gradio is imported after GRADIO_TEMP_DIR is set
        demo.queue(default_concurrency_limit=1)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"note: serving on {host}: anyone who can reach this machine on port {port} can upload photos",
                  file=sys.stderr)
        try:
            demo.launch(server_name=host, server_port=port, max_file_size=f"{max_mb}mb", share=False,
                        inbrowser=False, quiet=False)
        except OSError as e:
            raise MineralNetError(f"cannot serve on {host}:{port} ({e}); choose another --port or --host") from None
        finally:
            demo.close()
