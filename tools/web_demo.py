"""A web page to ask a trained policy about a video (Gradio, as the original's public demo).

  python tools/web_demo.py --checkpoint=runs/demo/export --videos=runs/demo/data/videos
  # then open http://127.0.0.1:7860

Pick one of the videos in `--videos` or upload one, type a question (and options, one per line,
for a multiple-choice question), press Ask: the page shows the frames the model saw, its
`<think>` reasoning and its answer. The policy (`--workdir`: a run's newest; `--checkpoint`: an
HF export or LongVILA / Qwen checkpoint) answers through the rollout server started from it
(`--rollout_address`: a running one); each video is embedded once by the policy's vision tower
and kept in the embedding cache (`--cache_dir`), so asking again about it costs only the answer.
"""

from __future__ import annotations

import glob
import os
import sys
import threading

from absl import app, flags

WORKDIR = flags.DEFINE_string("workdir", None, "a training run's --workdir (its newest policy)")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "an HF export or LongVILA/Qwen checkpoint")
VIDEOS = flags.DEFINE_string("videos", None, "a directory of videos to pick from")
HOST = flags.DEFINE_string("host", "127.0.0.1", "address to serve the page on")
PORT = flags.DEFINE_integer("port", 7860, "port to serve the page on")
NUM_FRAMES = flags.DEFINE_integer("num_frames", 16, "frames per video, uniform")
THINKING = flags.DEFINE_boolean("thinking", True, "ask for <think> reasoning before the answer")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "response length cap")
CACHE_DIR = flags.DEFINE_string("cache_dir", None, "video embedding cache (default: temporary)")
ROLLOUT_ADDRESS = flags.DEFINE_string("rollout_address", None, "a running rollout server")

VIDEO_PATTERNS = ("*.mp4", "*.mkv", "*.webm", "*.avi", "*.mov")


def list_videos(directory: str | None) -> list[str]:
    if not directory:
        return []
    return sorted(p for pat in VIDEO_PATTERNS for p in glob.glob(os.path.join(directory, pat)))


def build_page(qa, videos: list[str]):
    """The Gradio page around `qa` (a `longrl_jax.answerer.VideoQA`)."""
    import gradio as gr
    lock = threading.Lock()     # one question at a time through the model and the server

    def ask(video, question, options_text):
        if not video:
            raise gr.Error("Pick or upload a video first.")
        if not (question or "").strip():
            raise gr.Error("Type a question.")
        options = [o.strip() for o in (options_text or "").splitlines() if o.strip()] or None
        try:
            with lock:
                got = qa.ask(video, question.strip(), options)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        frames = [(f, f"frame {i + 1}") for i, f in enumerate(got.frames)]
        return frames, got.reasoning, got.answer, f"Answered ({len(got.frames)} frames)."

    with gr.Blocks(title="longrl_jax: ask a video") as page:
        gr.Markdown("## Ask a trained policy about a video\nPick or upload a video, ask a "
                    "question (options one per line for multiple choice), press **Ask**.")
        with gr.Row():
            with gr.Column():
                pick = gr.Dropdown(choices=[(os.path.basename(v), v) for v in videos],
                                   value=videos[0] if videos else None, label="Example videos",
                                   elem_id="pick")
                video = gr.Video(value=videos[0] if videos else None, label="Video",
                                 sources=["upload"], height=260, elem_id="video")
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                options = gr.Textbox(label="Options (one per line; empty: open-ended)", lines=4,
                                     elem_id="options")
                button = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                status = gr.Markdown("", elem_id="status")
                frames = gr.Gallery(label="Frames the model saw", columns=8, height=220,
                                    elem_id="frames")
                reasoning = gr.Textbox(label="Reasoning (<think>)", lines=6,
                                       elem_id="reasoning")
                answer = gr.Textbox(label="Answer", elem_id="answer")
        pick.change(lambda v: v, inputs=pick, outputs=video)
        button.click(ask, inputs=[video, question, options],
                     outputs=[frames, reasoning, answer, status])
    return page


def main(argv):
    del argv
    from longrl_jax.answerer import VideoQA
    if bool(WORKDIR.value) == bool(CHECKPOINT.value):
        raise SystemExit("web_demo: give exactly one of --workdir and --checkpoint")
    if VIDEOS.value and not os.path.isdir(VIDEOS.value):
        raise SystemExit(f"web_demo: --videos {VIDEOS.value}: no such directory")
    videos = list_videos(VIDEOS.value)
    try:
        qa = VideoQA(workdir=WORKDIR.value, checkpoint=CHECKPOINT.value,
                     num_frames=NUM_FRAMES.value, thinking=THINKING.value,
                     max_tokens=MAX_TOKENS.value, temperature=TEMPERATURE.value,
                     rollout_address=ROLLOUT_ADDRESS.value or "", cache_dir=CACHE_DIR.value)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"web_demo: {e}") from None
    with qa:
        page = build_page(qa, videos)
        print(f"web_demo: serving http://{HOST.value}:{PORT.value}", flush=True)
        page.queue().launch(server_name=HOST.value, server_port=PORT.value,
                            allowed_paths=[os.path.abspath(VIDEOS.value)] if VIDEOS.value
                            else None, show_error=True, quiet=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
