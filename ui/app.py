"""The page and its JSON API: query by upload or by an indexed post, see neighbours, open an explanation.

``GET /`` is one HTML page with its script inline (nothing to build). The API:

- ``POST /api/similar`` (multipart ``image``, ``text``, or ``post_id`` of the corpus): the
  neighbours, each with its score, four score parts and thumbnail URL;
- ``POST /api/explain`` (the same query fields, and ``target``: an indexed post id): the
  explanation as JSON with its picture as a PNG data URL;
- ``GET /api/image/{post_id}``: a corpus post's image; for a video post, the frame at the
  middle of the video as a JPEG (a browser's ``<img>`` shows no MP4 or WebM).

Bad input answers 400 with ``{"error": message}``, which the page shows. It binds
127.0.0.1 unless told otherwise: it has no authentication.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aiohttp import web

from postsim.client.api import AsyncPostSimClient
from postsim.client.posts import Post
from postsim.client.settings import DEFAULT_URL
from postsim.core.errors import PostSimError
from postsim.corpus.posts import CorpusPost, read_posts
from postsim.explanation.render import explanation_json, png_bytes
from postsim.explanation.targets import ExplainableIndex
from postsim.model_repository.contract import SCORE_PARTS
from postsim.model_repository.video import VideoSampling, decode_video_frames, sniff_video

logger = logging.getLogger("postsim")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
NEIGHBOURS = 12
MAX_UPLOAD_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class UiSettings:
    corpus: Path
    """The corpus the index was built from: its posts' images and texts (thumbnails, "more like this")."""
    index_dir: Path
    url: str = DEFAULT_URL
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT


_SETTINGS = web.AppKey("settings", UiSettings)
_POSTS = web.AppKey("posts", dict[str, CorpusPost])
_INDEX = web.AppKey("index", ExplainableIndex)


def make_app(settings: UiSettings) -> web.Application:
    """The application; the corpus and the index are read (and checked) before it serves."""
    app = web.Application(client_max_size=MAX_UPLOAD_BYTES)
    app[_SETTINGS] = settings
    app[_POSTS] = {post.id: post for post in read_posts(settings.corpus)}
    app[_INDEX] = ExplainableIndex.open(settings.index_dir)
    app.router.add_get("/", _page)
    app.router.add_get("/api/posts", _posts)
    app.router.add_get("/api/image/{post_id}", _image)
    app.router.add_post("/api/similar", _similar)
    app.router.add_post("/api/explain", _explain)
    return app


def run_ui(settings: UiSettings) -> None:
    """Serve the page until interrupted."""
    logger.info("postsim ui on http://%s:%d over the server at %s", settings.host, settings.port, settings.url)
    web.run_app(make_app(settings), host=settings.host, port=settings.port, print=None)


async def _page(request: web.Request) -> web.Response:
    html = resources.files("postsim.ui").joinpath("page.html").read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html")


async def _posts(request: web.Request) -> web.Response:
    posts: dict[str, CorpusPost] = request.app[_POSTS]
    return web.json_response([_card(post) for post in list(posts.values())[:60]])


def _card(post: CorpusPost) -> dict[str, object]:
    return {"id": post.id, "text": post.text, "image": f"/api/image/{post.id}" if post.image_path else None}


async def _image(request: web.Request) -> web.StreamResponse:
    post = request.app[_POSTS].get(request.match_info["post_id"])
    if post is None or post.image_path is None:
        raise web.HTTPNotFound(text="no such image")
    with post.image_path.open("rb") as file:
        is_video = sniff_video(file.read(_SNIFF_BYTES)) is not None
    if not is_video:
        return web.FileResponse(post.image_path)
    try:
        # Decoding takes tens of milliseconds: off the event loop, so other requests go on.
        poster = await asyncio.to_thread(_poster_frame, post.image_path, post.image_path.stat().st_mtime_ns)
    except PostSimError as error:
        return _error(error)
    return web.Response(body=poster, content_type="image/jpeg")


_SNIFF_BYTES = 64
"""Enough of a file's start for :func:`~postsim.model_repository.video.sniff_video` (MP4, WebM); an
animated GIF or WebP needs the whole file and is served as it is (a browser plays those)."""


@functools.lru_cache(maxsize=256)
def _poster_frame(path: Path, modified_ns: int) -> bytes:
    """The frame at the middle of the video at ``path``, as a JPEG (cached per file version)."""
    (frame,) = decode_video_frames(path.read_bytes(), VideoSampling(frames=1))
    buffer = io.BytesIO()
    frame.convert("RGB").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


async def _query(request: web.Request) -> tuple[Post, dict[str, str]]:
    """The query post of a form: an uploaded image and a text, or a corpus post by id."""
    form = await request.post()
    fields = {name: value for name, value in form.items() if isinstance(value, str)}
    post_id = fields.get("post_id", "")
    if post_id:
        post = request.app[_POSTS].get(post_id)
        if post is None:
            raise PostSimError(f"post id {post_id!r} is not in the corpus {request.app[_SETTINGS].corpus}")
        return post.to_post(), fields
    upload = form.get("image")
    image = upload.file.read() if isinstance(upload, web.FileField) else b""
    text = fields.get("text", "").strip()
    if not image and not text:
        raise PostSimError("choose an image or type a text (or click a post)")
    return Post(image=image or None, text=text or None), fields


def _error(error: PostSimError) -> web.Response:
    return web.json_response({"error": str(error)}, status=400)


async def _similar(request: web.Request) -> web.Response:
    try:
        query, _ = await _query(request)
        async with AsyncPostSimClient(request.app[_SETTINGS].url) as client:
            neighbours = await client.similar(query, k=NEIGHBOURS)
    except PostSimError as error:
        return _error(error)
    posts = request.app[_POSTS]
    return web.json_response(
        [
            {
                **(_card(posts[n.id]) if n.id in posts else {"id": n.id, "text": n.text, "image": None}),
                "score": n.score,
                "parts": {name: getattr(n.parts, name) for name in SCORE_PARTS} if n.parts else None,
            }
            for n in neighbours
        ]
    )


async def _explain(request: web.Request) -> web.Response:
    try:
        query, fields = await _query(request)
        target = request.app[_INDEX].post(fields.get("target", ""))
        async with AsyncPostSimClient(request.app[_SETTINGS].url) as client:
            explanation = await client.explain(query, target.embedding)
        image = query.image_bytes() if query.has_image else None
        # Drawing takes a few hundred milliseconds: off the event loop, so other requests go on.
        picture = await asyncio.to_thread(png_bytes, explanation, image, title=f"why similar to {target.id}")
    except PostSimError as error:
        return _error(error)
    data = explanation_json(explanation)
    data["png"] = "data:image/png;base64," + base64.b64encode(picture).decode("ascii")
    data["target"] = target.id
    return web.json_response(data)
